#!/usr/bin/env python3
"""PyTorch over a vmmpp KV cache: K and V of every layer as torch tensors (torch.from_dlpack),
filled through the slot mapping, gathered back through the block tables, attention over the
paged blocks checked against the same attention over plain tensors.

    VMMPP_KV_LIB=build/dev/interop/libvmmpp_kv_capi.so python3 examples/torch_kv/torch_kv.py

For each configuration (elastic = vmm in every layout, static = cudaMalloc, gh200 = managed
memory exported as kDLCUDA) it:
  1. builds a cache and appends three sequences (37, 16 and 70 tokens);
  2. wraps each layer's K and V with torch.from_dlpack: [max_blocks, block_tokens, kv_heads,
     head_dim] views with the layout's strides, on the cache's memory (mla: one latent of
     kv_heads x head_dim per token, K only, also used as V below; packed_kv: K and V are strided
     views of one per-layer tensor; HND layouts: heads before tokens in memory);
  3. writes random keys and values at the slots of the slot mapping;
  4. gathers each sequence's blocks through its block table and compares with what it wrote;
  5. forks a sequence and appends to the fork (copy-on-write of the shared half-full block;
     sequence_contiguous refuses the fork, and reads each sequence through its dense run
     instead: scaled_dot_product_attention on the DLPack view itself, no gather);
  6. runs a batched decode step with scaled_dot_product_attention over the gathered paged
     blocks (padded block tables, a length mask, grouped-query heads) and a causal prefill per
     sequence, against the same attention over the plain tensors;
  7. frees the sequences and checks that the cache's memory went back (static: stays whole).
Only blocks of live sequences are touched: the rest of each view is unbacked address space.
Exits 77 (skipped) without torch or a CUDA device, 0 when every check passes, 1 otherwise.
"""
import gc
import os
import sys

SKIP = 77
LAYERS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS, MAX_BLOCKS = 2, 4, 64, 16, 256
Q_HEADS = 8  # two query heads per KV head
LENGTHS = (37, 16, 70)
MAX_TOKENS_PER_SEQUENCE = 128  # sequence_contiguous: 8 blocks a slot (the other layouts ignore it)
BF16_LAYOUTS = ("block_major", "mla")  # on elastic these run in bf16, the other layouts in f16
OTHER_CASES = (  # configuration, layout, dtype: the static and managed backings
    ("static", "layer_major", "f16"),
    ("static", "sequence_contiguous", "f16"),
    ("gh200", "block_major", "f16"),
    ("gh200", "sequence_contiguous", "f16"),
)


def cases(vmmpp_kv):
    """(configuration, layout, dtype): every layout the library has (vmmpp::kv_layouts) on elastic,
    then OTHER_CASES."""
    every = [("elastic", layout, "bf16" if layout in BF16_LAYOUTS else "f16") for layout in vmmpp_kv.layout_names()]
    return every + list(OTHER_CASES)


def expected_strides(layout, heads, dim):
    """Element strides of a layer's K view, [block, token, head, dim], as the layout lays it out."""
    block = BLOCK_TOKENS * heads * dim
    if layout in ("layer_major", "sequence_contiguous", "mla"):
        return (block, heads * dim, dim, 1)
    if layout == "layer_major_hnd":
        return (block, dim, BLOCK_TOKENS * dim, 1)
    if layout == "block_major":
        return (2 * LAYERS * block, heads * dim, dim, 1)
    if layout == "block_major_hnd":
        return (2 * LAYERS * block, dim, BLOCK_TOKENS * dim, 1)
    if layout == "packed_kv":  # [blocks, heads, tokens, K dim | V dim]
        return (2 * block, 2 * dim, BLOCK_TOKENS * 2 * dim, 1)
    raise ValueError(layout)


class LegacyOnly:
    """A producer seen through the legacy protocol only (no max_version: a "dltensor" capsule)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        return self.tensor.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


def run_case(torch, vmmpp_kv, config, layout, dtype, check):
    import torch.nn.functional as F

    torch.manual_seed(0)
    tdtype = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    tol = {"f16": 1e-2, "bf16": 3e-2}[dtype]
    device = torch.cuda.current_device()
    cuda = torch.device("cuda", device)
    name = f"{config}/{layout}/{dtype}"
    exports_before = vmmpp_kv.live_exports()
    # mla: one latent per token (kv_heads 1, the latent as wide as the other layouts' heads together).
    KV_HEADS, HEAD_DIM = (1, 4 * 64) if layout == "mla" else (4, 64)
    slotted = layout == "sequence_contiguous"
    try:
        cache = vmmpp_kv.KVCache(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_blocks=MAX_BLOCKS,
                                 dtype=dtype, block_tokens=BLOCK_TOKENS, config=config, layout=layout,
                                 device=device, max_tokens_per_sequence=MAX_TOKENS_PER_SEQUENCE)
    except vmmpp_kv.VmmppError as e:
        if config == "gh200" and e.status in ("invalid_argument", "out_of_memory"):
            print(f"skip  {name}: {e}")  # no concurrent managed access on this device
            return
        raise
    managed_as_cuda = config == "gh200"  # PyTorch refuses kDLCUDAManaged
    seqs = []
    for n in LENGTHS:
        seq = cache.add_sequence()
        cache.append(seq, n)
        seqs.append(seq)
    committed = cache.stats()["committed_bytes"]
    check(committed > 0, f"{name}: appending committed memory ({committed} bytes)")

    # 2. The views.
    K = [torch.from_dlpack(cache.key(l, managed_as_cuda)) for l in range(LAYERS)]
    if layout == "mla":  # no V: the latent serves as both below
        V = K
        try:
            cache.value(0, managed_as_cuda).__dlpack__()
            check(False, f"{name}: exporting V of an mla cache is refused")
        except vmmpp_kv.VmmppError as e:
            check(e.status == "invalid_argument", f"{name}: exporting V of an mla cache is refused ({e})")
    else:
        V = [torch.from_dlpack(cache.value(l, managed_as_cuda)) for l in range(LAYERS)]
    check(K[0].device == cuda and K[0].dtype == tdtype, f"{name}: views on {cuda} in {tdtype}")
    check(tuple(K[1].shape) == (MAX_BLOCKS, BLOCK_TOKENS, KV_HEADS, HEAD_DIM)
          and K[1].stride() == expected_strides(layout, KV_HEADS, HEAD_DIM) and V[1].stride() == K[1].stride(),
          f"{name}: shape {tuple(K[1].shape)} and strides {K[1].stride()}")
    check(all(K[l].data_ptr() == cache.address(l, 0, 0) and (layout == "mla" or V[l].data_ptr() == cache.address(l, 1, 0))
              for l in range(LAYERS)), f"{name}: views start at the cache's block 0 of each layer")
    legacy = torch.from_dlpack(LegacyOnly(cache.key(1, managed_as_cuda)))
    check(legacy.data_ptr() == K[1].data_ptr() and legacy.stride() == K[1].stride(),
          f"{name}: the legacy capsule gives the same view")
    del legacy

    def blocks_of(seq):
        return torch.tensor(list(cache.block_table(seq)), dtype=torch.long, device=cuda)

    def slots_of(seq, first=0, count=None):
        return torch.tensor(list(cache.slot_mapping(seq, first, count)), dtype=torch.long, device=cuda)

    def gather(X, seq, n):
        return X[blocks_of(seq)].reshape(-1, KV_HEADS, HEAD_DIM)[:n]

    # 3. Write through the slot mapping (whole blocks zeroed first: the tail of a last block is
    #    read by the padded attention below and must be finite). mla: V is K.
    plain = {}
    for seq, n in zip(seqs, LENGTHS):
        blocks = blocks_of(seq)
        k = torch.randn(LAYERS, n, KV_HEADS, HEAD_DIM, device=cuda, dtype=tdtype)
        v = k if layout == "mla" else torch.randn(LAYERS, n, KV_HEADS, HEAD_DIM, device=cuda, dtype=tdtype)
        slots = slots_of(seq)
        for l in range(LAYERS):
            K[l][blocks] = 0
            V[l][blocks] = 0
            K[l][slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = k[l]
            V[l][slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = v[l]
        plain[seq] = (k, v)

    # 4. Gather back.
    check(all(torch.equal(gather(K[l], seq, n), plain[seq][0][l]) and torch.equal(gather(V[l], seq, n), plain[seq][1][l])
              for seq, n in zip(seqs, LENGTHS) for l in range(LAYERS)),
          f"{name}: every token gathered through the block tables reads as written")

    lengths = list(LENGTHS)
    torch.cuda.synchronize()
    if slotted:
        # 5'. No fork: a block id is a place in one sequence's slot. Each sequence is one dense
        #     run per layer and K/V instead: attention reads it as it is.
        try:
            cache.fork(seqs[0])
            check(False, f"{name}: fork is refused")
        except vmmpp_kv.VmmppError as e:
            check(e.status == "invalid_argument" and "cannot share blocks" in str(e), f"{name}: fork is refused")
        worst = 0.0
        for i, (seq, n) in enumerate(zip(seqs, LENGTHS)):
            first_block = cache.block_table(seq)[0]
            for l in range(LAYERS):
                k_run = torch.from_dlpack(cache.sequence(seq, l, vmmpp_kv.KEY, managed_as_cuda))  # [1, n, H, D]
                v_run = torch.from_dlpack(cache.sequence(seq, l, vmmpp_kv.VALUE, managed_as_cuda))
                check(tuple(k_run.shape) == (1, n, KV_HEADS, HEAD_DIM) and k_run[0].is_contiguous()
                      and k_run.data_ptr() == cache.address(l, 0, first_block)
                      and v_run.data_ptr() == cache.address(l, 1, first_block),
                      f"{name}: sequence {seq} layer {l}: a dense [1, {n}, {KV_HEADS}, {HEAD_DIM}] view at its "
                      f"first block (strides {k_run.stride()})")
                check(torch.equal(k_run[0], plain[seq][0][l]) and torch.equal(v_run[0], plain[seq][1][l]),
                      f"{name}: sequence {seq} layer {l}: the dense view reads what the slot mapping wrote")
                q = torch.randn(1, Q_HEADS, n, HEAD_DIM, device=cuda, dtype=tdtype)
                # [1, heads, tokens, dim] views of the run (a transpose, no copy); grouped heads.
                out = F.scaled_dot_product_attention(q, k_run.transpose(1, 2), v_run.transpose(1, 2),
                                                     is_causal=True, enable_gqa=True)
                kp = plain[seq][0][l].transpose(0, 1)[None].float()
                vp = plain[seq][1][l].transpose(0, 1)[None].float()
                ref = F.scaled_dot_product_attention(q.float(), kp, vp, is_causal=True, enable_gqa=True)
                worst = max(worst, (out.float() - ref).abs().max().item())
                del k_run, v_run
        check(worst < tol, f"{name}: causal attention on the dense views, no gather, matches plain tensors "
                           f"(max error {worst:.2e})")
    else:
        # 5. Fork and copy-on-write: the cache copies the shared half-full block on its stream.
        parent, n_parent = seqs[0], LENGTHS[0]
        child = cache.fork(parent)
        first = cache.append(child, 4)
        cache.synchronize()
        k_new = torch.randn(LAYERS, 4, KV_HEADS, HEAD_DIM, device=cuda, dtype=tdtype)
        v_new = k_new if layout == "mla" else torch.randn(LAYERS, 4, KV_HEADS, HEAD_DIM, device=cuda, dtype=tdtype)
        slots = slots_of(child, first, 4)
        for l in range(LAYERS):
            K[l][slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = k_new[l]
            V[l][slots // BLOCK_TOKENS, slots % BLOCK_TOKENS] = v_new[l]
        plain[child] = (torch.cat([plain[parent][0], k_new], dim=1), torch.cat([plain[parent][1], v_new], dim=1))
        check(cache.stats()["cow_copies"] == 1 and cache.block_table(child)[-1] != cache.block_table(parent)[-1],
              f"{name}: the fork got its own copy of the shared last block")
        check(all(torch.equal(gather(K[l], child, n_parent + 4), plain[child][0][l])
                  and torch.equal(gather(K[l], parent, n_parent), plain[parent][0][l]) for l in range(LAYERS)),
              f"{name}: the fork reads the parent's tokens and its own; the parent is unchanged")
        seqs.append(child)
        lengths.append(n_parent + 4)

    # 6. Attention over the paged blocks against attention over the plain tensors.
    group = Q_HEADS // KV_HEADS
    max_blocks_per_seq = max(-(-n // BLOCK_TOKENS) for n in lengths)
    tables = torch.tensor(list(cache.pack_block_tables(seqs, max_blocks_per_seq, pad=0)), dtype=torch.long,
                          device=cuda).view(len(seqs), max_blocks_per_seq)
    span = max_blocks_per_seq * BLOCK_TOKENS
    mask = torch.arange(span, device=cuda)[None, :] < torch.tensor(lengths, device=cuda)[:, None]
    for l in range(LAYERS):
        def paged(X):  # [S, Q_HEADS, span, D]
            x = X[tables].reshape(len(seqs), span, KV_HEADS, HEAD_DIM).transpose(1, 2)
            return x.repeat_interleave(group, dim=1)

        q = torch.randn(len(seqs), Q_HEADS, 1, HEAD_DIM, device=cuda, dtype=tdtype)
        out = F.scaled_dot_product_attention(q, paged(K[l]), paged(V[l]), attn_mask=mask[:, None, None, :])
        worst = 0.0
        for i, (seq, n) in enumerate(zip(seqs, lengths)):
            k = plain[seq][0][l].transpose(0, 1).repeat_interleave(group, dim=0)[None].float()
            v = plain[seq][1][l].transpose(0, 1).repeat_interleave(group, dim=0)[None].float()
            ref = F.scaled_dot_product_attention(q[i:i + 1].float(), k, v)
            worst = max(worst, (out[i:i + 1].float() - ref).abs().max().item())
        check(worst < tol, f"{name}: layer {l} batched decode over paged blocks matches plain attention "
                           f"(max error {worst:.2e})")

        worst = 0.0
        for seq, n in zip(seqs, lengths):
            qp = torch.randn(1, Q_HEADS, n, HEAD_DIM, device=cuda, dtype=tdtype)
            kg = gather(K[l], seq, n).transpose(0, 1).repeat_interleave(group, dim=0)[None]
            vg = gather(V[l], seq, n).transpose(0, 1).repeat_interleave(group, dim=0)[None]
            kp = plain[seq][0][l].transpose(0, 1).repeat_interleave(group, dim=0)[None]
            vp = plain[seq][1][l].transpose(0, 1).repeat_interleave(group, dim=0)[None]
            a = F.scaled_dot_product_attention(qp, kg, vg, is_causal=True)
            b = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
            worst = max(worst, (a.float() - b.float()).abs().max().item())
        check(worst < tol, f"{name}: layer {l} causal prefill over gathered blocks matches plain tensors "
                           f"(max error {worst:.2e})")

    # 7. Free everything, ordered after the work queued on PyTorch's stream (the free does not
    #    wait for it); then wait, so the memory has gone back. The views stay valid objects (the
    #    exports keep the cache alive) but must not be read any more.
    stream = torch.cuda.current_stream().cuda_stream
    for seq in seqs:
        cache.free(seq, stream=stream)
    cache.synchronize()
    cache.trim()  # elastic_config keeps up to 16 spare pages for the next growth: give them back too
    stats = cache.stats()
    if config == "static":  # one cudaMalloc, committed up front and kept
        check(stats["used_blocks"] == 0 and stats["committed_bytes"] == stats["reserved_bytes"],
              f"{name}: after freeing every sequence the static span stays whole")
    else:
        check(stats["used_blocks"] == 0 and stats["committed_bytes"] == 0,
              f"{name}: after freeing every sequence nothing is committed ({stats['committed_bytes']} bytes)")
    cache.close()
    del K, V, plain, out
    gc.collect()
    check(vmmpp_kv.live_exports() == exports_before, f"{name}: every export was deleted by torch")


def main():
    try:
        import torch
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

    for config, layout, dtype in cases(vmmpp_kv):
        try:
            run_case(torch, vmmpp_kv, config, layout, dtype, check)
        except Exception as e:  # one case failing must not hide the others
            check(False, f"{config}/{layout}/{dtype}: {type(e).__name__}: {e}")
    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
