"""Throughput of moving KV blocks from GPU 0 to GPU 1, batches of 1, 16 and 256 blocks, by every
path in one run:

  nixl-vmm          vmmpp caches on both sides, their extents registered with NIXL (UCX), READ
  nixl-cudamalloc   the same descriptors over two cudaMalloc buffers (PyTorch) registered with NIXL
  shared-pages      vmmpp's fd-exported pages imported by the reader, then one cudaMemcpyBatchAsync
  shared-pages-1by1 the same, one cudaMemcpyAsync per piece
  copy_blocks       vmmpp::copy_blocks between two caches of one process (peer copy)
  peer-cudamalloc   one cudaMemcpyPeerAsync between two cudaMalloc buffers (the link's rate)
  nixl-torch_expandable, nixl-torch_cudaMallocAsync
                    the same NIXL READ between buffers of PyTorch's other allocators (expandable
                    segments, cudaMallocAsync), what an engine on them would move (PyTorch's
                    default allocator is nixl-cudamalloc: a large torch.empty is one cudaMalloc)

Two-process paths run a "owner" process (GPU 0) and a "reader" (GPU 1); each batch is timed from
post to completion, `--reps` times after warm-up; the table reports the median. Writes JSON
lines and a Markdown table to --out.

    python3 bench_transfer.py --out results/ [--label wheel-ucx]
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import transfer_common as tc  # noqa: E402
from kv_nixl import NixlKV, import_nixl, vmmpp_kv  # noqa: E402

# 32 layers x 8 heads x 128 dims x f16 x 16 tokens: a block is 2 MiB (block_major, one piece).
GEOMETRY = dict(layers=32, kv_heads=8, head_dim=128, dtype="f16", block_tokens=16, max_blocks=640)
BLOCK_BYTES = 32 * 2 * 8 * 128 * 2 * 16
LIVE_BLOCKS = 512
BATCHES = (1, 16, 256)


def make_cache(device, peers=()):
    return vmmpp_kv.KVCache(**GEOMETRY, config="elastic", layout="block_major", device=device, peers=peers)


def fill_sequence(cache):
    """One sequence of LIVE_BLOCKS blocks, as a prompt would make them; its block ids."""
    seq = cache.add_sequence()
    cache.append(seq, LIVE_BLOCKS * GEOMETRY["block_tokens"])
    return list(cache.block_table(seq))


def batch_positions(n):
    """Positions in the sequence of a batch of n blocks: every other one (a scheduler's picks are
    seldom one contiguous run), so each block is its own descriptor."""
    step = max(1, min(2, LIVE_BLOCKS // max(n, 1)))
    return list(range(0, LIVE_BLOCKS, step))[:n]


def batch_ids(blocks, n):
    return [blocks[p] for p in batch_positions(n)]


def timed(run, reps, warmup=2, budget_s=4.0):
    """Seconds per call of run(): medians over reps (fewer when one call is slow)."""
    for _ in range(warmup):
        run()
    first = time.perf_counter()
    run()
    one = time.perf_counter() - first
    reps = max(3, min(reps, int(budget_s / max(one, 1e-6))))
    samples = [one]
    for _ in range(reps - 1):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples), len(samples)


def record(out, rows, path, batch, nbytes, median, best, reps, label, extra=None):
    row = {"path": path, "label": label, "blocks": batch, "bytes": nbytes, "median_s": median, "best_s": best,
           "reps": reps, "GBps": nbytes / median / 1e9}
    row.update(extra or {})
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(out, "transfer.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# --- two-process paths: the owner serves, the reader measures ---

def owner(args, ctl, pages):
    import torch
    torch.cuda.set_device(0)
    tc.allow_peer_to_take_descriptors()
    cache = make_cache(0)
    blocks = fill_sequence(cache)
    arrays = tc.Arrays(cache)
    arrays.fill(blocks, lambda i: i)
    endpoint = NixlKV(cache, "owner")
    endpoint.sync_registration()
    # The cudaMalloc twin: one buffer the size of the span, registered whole.
    plain = torch.empty(cache.span()[1], dtype=torch.uint8, device="cuda:0")
    plain_reg = endpoint.agent.register_memory(
        endpoint.agent.get_reg_descs([(plain.data_ptr(), plain.numel(), 0, "")], "VRAM"))
    described = {n: endpoint.describe(batch_ids(blocks, n)) for n in BATCHES}
    ctl.send({"described": described, "plain_base": plain.data_ptr(),
              "extents": len(cache.committed_extents())})
    cache.send_shared_pages(pages.sock.fileno())
    ctl.recv()  # the reader is done
    endpoint.agent.deregister_memory(plain_reg)
    endpoint.close()
    return 0


def reader(args, ctl, pages):
    import torch
    torch.cuda.set_device(1)
    cache = make_cache(1)
    blocks = fill_sequence(cache)
    endpoint = NixlKV(cache, "reader")
    endpoint.sync_registration()
    plain = torch.empty(cache.span()[1], dtype=torch.uint8, device="cuda:1")
    plain_reg = endpoint.agent.register_memory(
        endpoint.agent.get_reg_descs([(plain.data_ptr(), plain.numel(), 1, "")], "VRAM"))
    message = ctl.recv()
    imported = vmmpp_kv.ImportedPages(pages.sock.fileno(), 1)
    arrays = tc.Arrays(cache)
    stream = torch.cuda.Stream(device=1)
    rows = []
    for n in BATCHES:
        remote = message["described"][n]
        mine = batch_ids(blocks, n)
        nbytes = n * BLOCK_BYTES
        local, far = endpoint.pair(remote, mine)
        info = {"descriptors": len(local), "owner_extents": message["extents"]}

        request = endpoint.prepare_pull(remote, mine)
        median, best, reps = timed(lambda: endpoint.run(request), args.reps)
        endpoint.agent.release_xfer_handle(request)
        tags = batch_positions(n)  # the owner tagged each block with its position
        bad = arrays.mismatches(mine, lambda i: tags[i])
        record(args.out, rows, "nixl-vmm", n, nbytes, median, best, reps, args.label,
               dict(info, blocks_differ=len(bad)))

        # The same descriptors, offsets shifted onto the cudaMalloc buffers.
        plain_local = [(plain.data_ptr() + (a - endpoint.base), size, 1) for a, size, _ in local]
        plain_far = [(message["plain_base"] + (a - remote["base"]), size, 0) for a, size, _ in far]
        request = endpoint.agent.initialize_xfer("READ", endpoint.agent.get_xfer_descs(plain_local, "VRAM"),
                                                 endpoint.agent.get_xfer_descs(plain_far, "VRAM"), remote["agent"])
        median, best, reps = timed(lambda: endpoint.run(request), args.reps)
        endpoint.agent.release_xfer_handle(request)
        record(args.out, rows, "nixl-cudamalloc", n, nbytes, median, best, reps, args.label, info)

        pairs = vmmpp_kv.pair_pieces(cache.block_pieces(mine), remote["pieces"])

        for path, one_by_one in (("shared-pages", False), ("shared-pages-1by1", True)):
            def pull_pages():
                vmmpp_kv.copy_piece_pairs(endpoint.base, imported.base, pairs, stream.cuda_stream, one_by_one)
                stream.synchronize()
            arrays.fill(mine, lambda i: -1)
            median, best, reps = timed(pull_pages, args.reps)
            bad = arrays.mismatches(mine, lambda i: tags[i])
            record(args.out, rows, path, n, nbytes, median, best, reps, args.label, dict(info, blocks_differ=len(bad)))
    imported.close()
    endpoint.agent.deregister_memory(plain_reg)
    ctl.send({"done": True})
    endpoint.close()
    return 0


# --- one-process paths ---

def local_paths(args):
    import torch
    torch.cuda.set_device(1)  # the copies run on GPU 1's stream, as the reader's do
    rows = []
    src = make_cache(0, peers=(1,))
    dst = make_cache(1, peers=(0,))
    src_blocks, dst_blocks = fill_sequence(src), fill_sequence(dst)
    stream = torch.cuda.Stream(device=1)
    a = torch.empty(LIVE_BLOCKS * BLOCK_BYTES, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(LIVE_BLOCKS * BLOCK_BYTES, dtype=torch.uint8, device="cuda:1")
    for n in BATCHES:
        s_ids, d_ids = batch_ids(src_blocks, n), batch_ids(dst_blocks, n)

        def copy():
            vmmpp_kv.copy_blocks(src, s_ids, dst, d_ids, stream.cuda_stream)
            stream.synchronize()
        median, best, reps = timed(copy, args.reps)
        record(args.out, rows, "copy_blocks", n, n * BLOCK_BYTES, median, best, reps, args.label)

        def peer():
            with torch.cuda.stream(stream):
                b[:n * BLOCK_BYTES].copy_(a[:n * BLOCK_BYTES], non_blocking=True)
            stream.synchronize()
        median, best, reps = timed(peer, args.reps)
        record(args.out, rows, "peer-cudamalloc", n, n * BLOCK_BYTES, median, best, reps, args.label)


# --- the peers: buffers from PyTorch's other allocators, moved by NIXL ---

PEER_ALLOCATORS = {"torch_expandable": "expandable_segments:True", "torch_cudaMallocAsync": "backend:cudaMallocAsync"}


def allocator_buffer(device):
    """A span-sized buffer from the allocator PYTORCH_CUDA_ALLOC_CONF picked, with a pattern."""
    import torch
    torch.cuda.set_device(device)
    nbytes = (LIVE_BLOCKS + 1) * BLOCK_BYTES
    buffer = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
    buffer.copy_((torch.arange(nbytes, device=f"cuda:{device}") * (device + 7) % 251).to(torch.uint8))
    torch.cuda.synchronize(device)
    return buffer


def peer_owner(args, ctl, pages):
    buffer = allocator_buffer(0)
    agent = NixlKV.make_agent("peer-owner")
    registration = agent.register_memory(agent.get_reg_descs([(buffer.data_ptr(), buffer.numel(), 0, "")], "VRAM"))
    ctl.send({"metadata": agent.get_agent_metadata(), "base": buffer.data_ptr()})
    ctl.recv()  # the reader is done
    agent.deregister_memory(registration)
    return 0


def peer_reader(args, ctl, pages):
    import torch
    buffer = allocator_buffer(1)
    agent = NixlKV.make_agent("peer-reader")
    registration = agent.register_memory(agent.get_reg_descs([(buffer.data_ptr(), buffer.numel(), 1, "")], "VRAM"))
    message = ctl.recv()
    owner_name = agent.add_remote_agent(message["metadata"])
    owner_name = owner_name.decode() if isinstance(owner_name, bytes) else owner_name
    rows = []
    for n in BATCHES:
        # Block k of the sequence at k * BLOCK_BYTES on both sides, as in the vmmpp paths.
        spans = [(p * BLOCK_BYTES, BLOCK_BYTES) for p in batch_positions(n)]
        local = agent.get_xfer_descs([(buffer.data_ptr() + o, b, 1) for o, b in spans], "VRAM")
        far = agent.get_xfer_descs([(message["base"] + o, b, 0) for o, b in spans], "VRAM")
        request = agent.initialize_xfer("READ", local, far, owner_name)

        def run():
            state = agent.transfer(request)
            while state == "PROC":
                state = agent.check_xfer_state(request)
            if state != "DONE":
                raise RuntimeError(f"transfer ended in state {state}")
        median, best, reps = timed(run, args.reps)
        agent.release_xfer_handle(request)
        # The owner's bytes arrived: its pattern is (i * 7) % 251, the reader's own was (i * 8) % 251.
        differ = sum(int(not torch.equal(buffer[o:o + b],
                                         (torch.arange(o, o + b, device=buffer.device) * 7 % 251).to(torch.uint8)))
                     for o, b in spans)
        record(args.out, rows, f"nixl-{args.peer_allocator}", n, n * BLOCK_BYTES, median, best, reps, args.label,
               {"descriptors": len(spans), "blocks_differ": differ})
    agent.remove_remote_agent(owner_name)
    agent.deregister_memory(registration)
    ctl.send({"done": True})
    return 0


def peer_paths(args):
    """The peer allocators' runs: one process pair each, the allocator set before CUDA starts."""
    codes = []
    for name, conf in PEER_ALLOCATORS.items():
        env_before = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
        try:
            codes += tc.run_roles(os.path.abspath(__file__), ["peer-owner", "peer-reader"],
                                  sys.argv[1:] + ["--peer-allocator", name])
        finally:
            if env_before is None:
                del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
            else:
                os.environ["PYTORCH_CUDA_ALLOC_CONF"] = env_before
    return codes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".")
    parser.add_argument("--label", default="")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only-nixl", action="store_true", help="skip the one-process paths")
    parser.add_argument("--skip-peers", action="store_true", help="skip PyTorch's other allocators")
    parser.add_argument("--role", choices=["owner", "reader", "peer-owner", "peer-reader"])
    parser.add_argument("--peer-allocator", choices=sorted(PEER_ALLOCATORS))
    parser.add_argument("--ctl-fd", type=int)
    parser.add_argument("--pages-fd", type=int)
    args = parser.parse_args()
    if args.role is not None:
        ctl, pages = tc.Channel(args.ctl_fd), tc.Channel(args.pages_fd)
        roles = {"owner": owner, "reader": reader, "peer-owner": peer_owner, "peer-reader": peer_reader}
        return roles[args.role](args, ctl, pages)
    import_nixl()
    import torch
    if torch.cuda.device_count() < 2:
        print(f"skipped: {torch.cuda.device_count()} CUDA device(s); two are needed")
        return tc.SKIP
    os.makedirs(args.out, exist_ok=True)
    if not args.only_nixl:
        local_paths(args)
    codes = tc.run_roles(os.path.abspath(__file__), ["owner", "reader"], sys.argv[1:])
    if not args.skip_peers:
        codes += peer_paths(args)
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
