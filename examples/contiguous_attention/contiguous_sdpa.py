#!/usr/bin/env python3
"""Non-paged attention over a vmmpp KV cache: the sequence_contiguous layout gives each sequence
one dense [tokens, kv_heads, head_dim] run per layer for K and for V, in address space reserved
for the longest sequence allowed (max_tokens_per_sequence); physical memory is committed as the
sequence grows and given back when it shrinks or ends. So a standard attention call reads the
cache as it is: no block table, no gather.

    VMMPP_KV_LIB=build/dev/interop/libvmmpp_kv_capi.so python3 examples/contiguous_attention/contiguous_sdpa.py

On CUDA VMM growing 2 MiB at a time (the C ABI's "elastic_pages", so committed memory can be
checked to the byte) it:
  1. prefills three sequences, writing K and V into the cache through the slot mapping;
  2. decodes 40 steps, one token per sequence a step: appends, writes the new token's K/V into
     the sequence's dense view (torch.from_dlpack of the run, exported again after the append:
     same address, one token longer), then runs scaled_dot_product_attention on the views
     themselves and checks it against the same attention over plain tensors;
  3. truncates one sequence (rejected speculative tokens) and frees another, checking that
     committed memory follows, and that the views still read what was written.
Exits 77 (skipped) without torch or a CUDA device, 0 when every check passes, 1 otherwise.
"""
import gc
import os
import sys

SKIP = 77
LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK_TOKENS = 2, 8, 32, 128, 16
MAX_TOKENS = 4096           # per sequence: 256 blocks of address space each
MAX_BLOCKS = 8 * 256        # 8 sequence slots
PROMPTS = (300, 1000, 77)
DECODE_STEPS = 40


def main():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch is not installed: skipping")
        return SKIP
    if not torch.cuda.is_available():
        print("no CUDA device: skipping")
        return SKIP
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "capi", "python"))
    import vmmpp_kv

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    failures = []

    def check(ok, what):
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    torch.manual_seed(0)
    cuda = torch.device("cuda", torch.cuda.current_device())
    dt = torch.float16
    cache = vmmpp_kv.KVCache(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_blocks=MAX_BLOCKS,
                             dtype="f16", block_tokens=BLOCK_TOKENS, config="elastic_pages", layout="sequence_contiguous",
                             max_tokens_per_sequence=MAX_TOKENS, device=cuda.index)
    page = 2 << 20
    token_bytes = KV_HEADS * HEAD_DIM * 2  # one token of one layer's K (or V)

    def views(seq):
        """The dense [1, tokens, heads, dim] runs of seq, K and V of every layer (DLPack, no copy)."""
        return ([torch.from_dlpack(cache.sequence(seq, l, vmmpp_kv.KEY)) for l in range(LAYERS)],
                [torch.from_dlpack(cache.sequence(seq, l, vmmpp_kv.VALUE)) for l in range(LAYERS)])

    # 1. Prefill through the paged view and the slot mapping (as an engine's reshape_and_cache).
    K = [torch.from_dlpack(cache.key(l)) for l in range(LAYERS)]
    V = [torch.from_dlpack(cache.value(l)) for l in range(LAYERS)]
    seqs, plain = [], {}
    for n in PROMPTS:
        seq = cache.add_sequence()
        cache.append(seq, n)
        slots = torch.tensor(list(cache.slot_mapping(seq)), dtype=torch.long, device=cuda)
        k = torch.randn(LAYERS, n, KV_HEADS, HEAD_DIM, device=cuda, dtype=dt)
        v = torch.randn(LAYERS, n, KV_HEADS, HEAD_DIM, device=cuda, dtype=dt)
        for l in range(LAYERS):
            K[l][slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = k[l]
            V[l][slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = v[l]
        seqs.append(seq)
        plain[seq] = [k, v]
    del K, V
    committed = cache.stats()["committed_bytes"]
    # Each sequence's run of a layer's K: its own pages (a slot is 256 blocks, 8 MiB: page aligned).
    need = sum(2 * LAYERS * -(-n * token_bytes // page) * page for n in PROMPTS)
    check(committed == need, f"prefill committed {committed >> 20} MiB: the pages under the prompts' tokens "
                             f"({need >> 20} MiB), not the {MAX_TOKENS}-token slots")
    base = {seq: cache.sequence_tensor(seq, 0, vmmpp_kv.KEY)[0] for seq in seqs}
    addr, shape, strides = cache.sequence_tensor(seqs[1], 1, vmmpp_kv.VALUE)
    check(shape == (1, PROMPTS[1], KV_HEADS, HEAD_DIM) and strides[1:] == (KV_HEADS * HEAD_DIM, HEAD_DIM, 1),
          f"sequence_tensor: shape {shape}, strides {strides} (dense [tokens, heads, dim])")

    # 2. Decode: grow in place; attention on the views, no gather.
    worst = 0.0
    for step in range(DECODE_STEPS):
        for seq in seqs:
            first = cache.append(seq, 1)
            Kv, Vv = views(seq)
            k = torch.randn(LAYERS, 1, KV_HEADS, HEAD_DIM, device=cuda, dtype=dt)
            v = torch.randn(LAYERS, 1, KV_HEADS, HEAD_DIM, device=cuda, dtype=dt)
            for l in range(LAYERS):
                Kv[l][0, first] = k[l, 0]  # written through the dense view itself
                Vv[l][0, first] = v[l, 0]
            plain[seq][0] = torch.cat([plain[seq][0], k], dim=1)
            plain[seq][1] = torch.cat([plain[seq][1], v], dim=1)
            q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, device=cuda, dtype=dt)
            for l in range(LAYERS):
                out = F.scaled_dot_product_attention(q, Kv[l].transpose(1, 2), Vv[l].transpose(1, 2),
                                                     enable_gqa=True)
                ref = F.scaled_dot_product_attention(q.float(), plain[seq][0][l].transpose(0, 1)[None].float(),
                                                     plain[seq][1][l].transpose(0, 1)[None].float(),
                                                     enable_gqa=True)
                worst = max(worst, (out.float() - ref).abs().max().item())
            if step in (0, DECODE_STEPS - 1):
                check(Kv[0].data_ptr() == base[seq], f"step {step} seq {seq}: the run grew in place")
    check(worst < 1e-2, f"{DECODE_STEPS} decode steps x {len(seqs)} sequences x {LAYERS} layers: attention on the "
                        f"dense views matches plain tensors (max error {worst:.2e})")
    lengths = {seq: n + DECODE_STEPS for seq, n in zip(seqs, PROMPTS)}
    # Causal prefill-style attention over a whole run, too.
    Kv, Vv = views(seqs[1])
    n = lengths[seqs[1]]
    q = torch.randn(1, Q_HEADS, n, HEAD_DIM, device=cuda, dtype=dt)
    out = F.scaled_dot_product_attention(q, Kv[0].transpose(1, 2), Vv[0].transpose(1, 2), is_causal=True,
                                         enable_gqa=True)
    ref = F.scaled_dot_product_attention(q.float(), plain[seqs[1]][0][0].transpose(0, 1)[None].float(),
                                         plain[seqs[1]][1][0].transpose(0, 1)[None].float(), is_causal=True,
                                         enable_gqa=True)
    err = (out.float() - ref).abs().max().item()
    check(err < 1e-2, f"causal attention over a {n}-token run matches (max error {err:.2e})")
    del Kv, Vv, out

    # 3. Shrink and end: memory follows.
    before = cache.stats()["committed_bytes"]
    stream = torch.cuda.current_stream().cuda_stream
    cache.truncate(seqs[1], 100, stream=stream)  # 1040 tokens -> 100: most of its pages go back
    cache.synchronize()
    after_truncate = cache.stats()["committed_bytes"]
    freed = 2 * LAYERS * (-(-lengths[seqs[1]] * token_bytes // page) - (-(-100 * token_bytes // page))) * page
    check(before - after_truncate == freed, f"truncate gave back {(before - after_truncate) >> 20} MiB "
                                            f"(expected {freed >> 20} MiB)")
    Kv, Vv = views(seqs[1])
    check(Kv[1].shape[1] == 100 and torch.equal(Kv[1][0], plain[seqs[1]][0][1][:100]),
          "after the truncate the run reads its first 100 tokens")
    del Kv, Vv
    gc.collect()
    for seq in seqs:
        cache.free(seq, stream=stream)
    cache.synchronize()
    stats = cache.stats()
    check(stats["committed_bytes"] == 0 and stats["sequences"] == 0,
          f"after freeing every sequence nothing is committed ({stats['committed_bytes']} bytes)")
    cache.close()
    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
