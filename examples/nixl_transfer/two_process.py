"""Two processes, two caches: a "prefill" process fills blocks while its pool grows (and gives
pages back between rounds); a "decode" process pulls them into its own cache and checks every
bit; then the prefill side frees everything, its pages go back, and the decode side still holds
its copy.

    python3 two_process.py --config elastic --path nixl           # GPU 0 -> GPU 1 through NIXL
    python3 two_process.py --config elastic --path shared-pages   # vmmpp's fd-exported pages + copy
    python3 two_process.py --config host --path nixl              # host memory (no GPU): NIXL DRAM

Exit status 0 when every check passed, 77 (skipped) when NIXL, PyTorch or two GPUs are missing
for the chosen mode, 1 otherwise. VMMPP_KV_LIB names the C ABI library.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import transfer_common as tc  # noqa: E402
from kv_nixl import NixlKV, import_nixl, vmmpp_kv  # noqa: E402

# 4 layers x 8 heads x 128 dims x f16 x 16 tokens: a block is 64 KiB x 4 = 256 KiB (block_major).
GEOMETRY = dict(layers=4, kv_heads=8, head_dim=128, dtype="f16", block_tokens=16, max_blocks=2048)
# (blocks in the round's sequence, whether the first round's sequence is freed before it)
ROUNDS = [(40, False), (300, False), (700, True), (9, False)]


def log(role, *what):
    print(f"[{role}]", *what, flush=True)


def device_free_bytes(cache):
    device = cache.span()[2]
    if device < 0:
        return None
    import torch
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # PyTorch's own cached blocks (the test pattern's) are not the cache's
    return torch.cuda.mem_get_info(device)[0]


def make_cache(args, device):
    if args.config != "host":
        import torch
        torch.cuda.set_device(device)  # the copies and checks run on this process's GPU
    return vmmpp_kv.KVCache(**GEOMETRY, config=args.config, layout="block_major", device=device)


def prefill(args, ctl, pages):
    tc.allow_peer_to_take_descriptors()
    cache = make_cache(args, args.prefill_device)
    arrays = tc.Arrays(cache)
    endpoint = NixlKV(cache, "prefill") if args.path == "nixl" else None
    seqs = []
    peak = 0
    for r, (n_blocks, free_first) in enumerate(ROUNDS):
        if free_first:
            cache.free(seqs[0][0])  # its extents go back; the next append may commit at their offsets
            cache.synchronize()
            seqs[0] = (None, [])
        seq = cache.add_sequence()
        cache.append(seq, n_blocks * GEOMETRY["block_tokens"] - 3)  # the last block partly filled
        blocks = list(cache.block_table(seq))
        seqs.append((seq, blocks))
        arrays.fill(blocks, lambda i, r=r: r * 10_000 + i)
        peak = max(peak, cache.stats()["committed_bytes"])
        message = {"round": r, "blocks": len(blocks), "committed": cache.stats()["committed_bytes"]}
        if endpoint is not None:
            changed = endpoint.sync_registration()
            message["remote"] = endpoint.describe(blocks)
            message["registered"] = len(endpoint.registered_extents())
            log("prefill", f"round {r}: {len(blocks)} blocks, {len(cache.committed_extents())} extents, "
                           f"registration changed: {changed} (+{endpoint.registrations} -{endpoint.deregistrations})")
        else:
            message["pieces"] = cache.block_pieces(blocks)
        ctl.send(message)
        if endpoint is None:
            cache.send_shared_pages(pages.sock.fileno())
        reply = ctl.recv()
        if not reply.get("ok"):
            log("prefill", f"decode failed round {r}: {reply}")
            return 1
    committed_before_free = cache.stats()["committed_bytes"]
    free_before = device_free_bytes(cache)
    ctl.send({"done": True})
    assert ctl.recv().get("released"), "decode did not release the prefill memory"

    # Free everything: the pool gives its pages back, and the registrations follow.
    for seq, _ in seqs:
        if seq is not None:
            cache.free(seq)
    cache.synchronize()
    cache.trim()
    if endpoint is not None:
        endpoint.sync_registration()
    stats = cache.stats()
    free_at_end = device_free_bytes(cache)
    report = {"committed_bytes": stats["committed_bytes"], "peak_committed": peak,
              "committed_before_free": committed_before_free,
              "registered": len(endpoint.registered_extents()) if endpoint else 0,
              "device_free_before_free": free_before, "device_free_after_free": free_at_end}
    log("prefill", f"after free: {report}")
    ok = stats["committed_bytes"] == 0 and report["registered"] == 0
    if free_before is not None:
        # The driver got the pages back: free device memory rose by what the cache held (within
        # 8 MiB of other allocations the process made meanwhile).
        ok = ok and free_at_end - free_before >= committed_before_free - (8 << 20)
    ctl.send({"prefill_freed": report, "ok": ok})
    final = ctl.recv()
    if endpoint is not None:
        endpoint.close()
    return 0 if ok and final.get("ok") else 1


def decode(args, ctl, pages):
    cache = make_cache(args, args.decode_device)
    arrays = tc.Arrays(cache)
    endpoint = NixlKV(cache, "decode") if args.path == "nixl" else None
    stream = None
    if args.config != "host":
        import torch
        stream = torch.cuda.Stream().cuda_stream  # the batched copy refuses the legacy stream
    kept = []  # (blocks, tag_of) of every round, checked again at the end
    while True:
        message = ctl.recv()
        if message.get("done"):
            break
        r = message["round"]
        seq = cache.add_sequence()
        cache.append(seq, message["blocks"] * GEOMETRY["block_tokens"] - 3)
        blocks = list(cache.block_table(seq))
        start = time.perf_counter()
        if endpoint is not None:
            endpoint.sync_registration()  # the blocks it reads into must be registered too
            moved = endpoint.pull(message["remote"], blocks)
        else:
            imported = vmmpp_kv.ImportedPages(pages.sock.fileno(), cache.span()[2])
            pairs = vmmpp_kv.pair_pieces(cache.block_pieces(blocks), message["pieces"])
            vmmpp_kv.copy_piece_pairs(cache.span()[0], imported.base, pairs, stream)
            arrays.synchronize()  # every stream of the device
            imported.close()  # the owner's pages may go back from now on
            moved = sum(n for _, _, n in pairs)
        seconds = time.perf_counter() - start
        arrays.synchronize()
        tag_of = (lambda i, r=r: r * 10_000 + i)
        bad = arrays.mismatches(blocks, tag_of)
        kept.append((blocks, tag_of))
        log("decode", f"round {r}: {len(blocks)} blocks, {moved / 2**20:.1f} MiB in {seconds * 1e3:.1f} ms, "
                      f"{len(bad)} blocks differ")
        ctl.send({"ok": not bad, "bad": bad[:10]})
        if bad:
            return 1
    if endpoint is not None:
        endpoint.close()  # the remote agent goes: nothing here maps the prefill memory any more
    ctl.send({"released": True})
    freed = ctl.recv()
    bad = [i for blocks, tag_of in kept for i in arrays.mismatches(blocks, tag_of)]
    log("decode", f"prefill freed its memory ({freed['prefill_freed']}); copies still intact: {not bad}")
    ctl.send({"ok": not bad})
    return 0 if freed.get("ok") and not bad else 1


def preconditions(args):
    """None when the mode can run here, else why not (the test is skipped)."""
    if args.path == "nixl":
        try:
            import_nixl()
        except ImportError as e:
            return f"NIXL is not importable ({e}); bash scripts/nixl/install"
    if args.config == "host":
        if args.path != "nixl":
            return "shared pages need vmm (GPU) memory"
        return None
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if torch.cuda.device_count() < 2:
        return f"{torch.cuda.device_count()} CUDA device(s); this test needs two"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="elastic", choices=["elastic", "elastic_pages", "host"])
    parser.add_argument("--path", default="nixl", choices=["nixl", "shared-pages"])
    parser.add_argument("--prefill-device", type=int, default=0)
    parser.add_argument("--decode-device", type=int, default=1)
    parser.add_argument("--role", choices=["prefill", "decode"])
    parser.add_argument("--ctl-fd", type=int)
    parser.add_argument("--pages-fd", type=int)
    args = parser.parse_args()
    if args.role is None:
        why = preconditions(args)
        if why is not None:
            print(f"skipped: {why}")
            return tc.SKIP
        passed = [a for a in sys.argv[1:]]
        codes = tc.run_roles(os.path.abspath(__file__), ["prefill", "decode"], passed)
        print(f"prefill exit {codes[0]}, decode exit {codes[1]}")
        return 0 if codes == [0, 0] else 1
    ctl, pages = tc.Channel(args.ctl_fd), tc.Channel(args.pages_fd)
    return (prefill if args.role == "prefill" else decode)(args, ctl, pages)


if __name__ == "__main__":
    sys.exit(main())
