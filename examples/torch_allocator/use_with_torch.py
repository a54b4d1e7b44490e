#!/usr/bin/env python3
"""PyTorch on vmmpp's elastic allocator: load libvmmpp_torch_allocator.so as torch's CUDA
allocator, run some work, and show that device memory follows the live tensors.

    VMMPP_TORCH_ALLOCATOR=build/dev/interop/libvmmpp_torch_allocator.so python3 use_with_torch.py
    VMMPP_ALLOCATOR=managed VMMPP_TORCH_ALLOCATOR=... python3 use_with_torch.py   # GH200 variant

The allocator must be installed before the process's first CUDA allocation. Exits 77 (skipped)
without torch or a CUDA device, 0 when every check passes, 1 otherwise.
"""
import ctypes
import os
import sys

SKIP = 77
MIB = 1 << 20


def library_path():
    path = os.environ.get("VMMPP_TORCH_ALLOCATOR")
    if path:
        return path
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "libvmmpp_torch_allocator.so")


class Stats(ctypes.Structure):
    """vmmpp_allocator_stats of vmmpp_torch_allocator.cpp."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "capacity", "live_bytes", "live_blocks", "peak_live_bytes", "pending_frees",
        "pending_bytes", "free_ranges", "largest_free", "committed_bytes")]


def transformer_workload(torch):
    """A small transformer with seeded random weights (nothing can be downloaded): a forward pass
    over a batch, then 48 steps of greedy generation whose sequence grows each step, so tensors
    of many sizes are allocated and freed. Returns the logits and the generated ids, on the CPU."""
    torch.manual_seed(0)
    vocab, width = 1000, 256
    embed = torch.nn.Embedding(vocab, width).cuda()
    layer = torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=1024, dropout=0.0, batch_first=True)
    body = torch.nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False).cuda().eval()
    head = torch.nn.Linear(width, vocab).cuda()
    ids = torch.randint(0, vocab, (8, 32), device="cuda")
    with torch.no_grad():
        logits = head(body(embed(ids)))
        for _ in range(48):
            mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device="cuda")
            step = head(body(embed(ids), mask=mask, is_causal=True))
            ids = torch.cat([ids, step[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.cuda.synchronize()
    return logits.cpu(), ids.cpu()


def main():
    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping")
        return SKIP
    if not torch.cuda.is_available():
        print("no CUDA device: skipping")
        return SKIP
    reference_out = os.environ.get("VMMPP_WORKLOAD_REFERENCE")
    if reference_out:  # child process: the same workload on PyTorch's own allocator
        torch.save(transformer_workload(torch), reference_out)
        return 0
    path = library_path()
    if not os.path.exists(path):
        print(f"error: {path} does not exist (set VMMPP_TORCH_ALLOCATOR)", file=sys.stderr)
        return 1

    # 1. Install the allocator, before anything allocates CUDA memory.
    allocator = torch.cuda.memory.CUDAPluggableAllocator(path, "vmmpp_malloc", "vmmpp_free")
    torch.cuda.memory.change_current_allocator(allocator)

    # The library loaded again by the same path is the same instance: read its statistics.
    lib = ctypes.CDLL(path)
    lib.vmmpp_allocator_stats_get.argtypes = [ctypes.c_int, ctypes.POINTER(Stats)]
    lib.vmmpp_allocator_stats_get.restype = ctypes.c_int
    lib.vmmpp_allocator_trim.argtypes = [ctypes.c_int]
    lib.vmmpp_allocator_trim.restype = ctypes.c_size_t
    lib.vmmpp_allocator_kind.restype = ctypes.c_char_p
    device = torch.cuda.current_device()

    def stats():
        s = Stats()
        if lib.vmmpp_allocator_stats_get(device, ctypes.byref(s)) != 0:
            raise RuntimeError("vmmpp_allocator_stats_get failed (see stderr)")
        return s

    failures = []

    def check(ok, what):
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    print(f"allocator: vmmpp {lib.vmmpp_allocator_kind().decode()} on cuda:{device}")

    # Warm up: cuBLAS takes a workspace per stream from the allocator and keeps it; with those
    # (for the default stream and the side stream of step 3) the memory in use is the baseline.
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side):
        with torch.cuda.stream(stream):
            w = torch.randn(64, 64, device="cuda")
            (w @ w).sum().item()
            del w
    torch.cuda.synchronize()
    lib.vmmpp_allocator_trim(device)
    baseline = stats()
    print(f"  baseline: {baseline.live_blocks} blocks, {baseline.live_bytes / MIB:.1f} MiB live, "
          f"{baseline.committed_bytes / MIB:.1f} MiB committed of {baseline.capacity / MIB:.0f} MiB reserved")

    # 2. Ordinary work on vmmpp memory.
    a = torch.randn(4096, 4096, device="cuda")
    b = torch.randn(4096, 4096, device="cuda")
    c = a @ b
    ref = (a.double() @ b.double()).float()
    check(torch.allclose(c, ref, rtol=1e-3, atol=1e-2), "matmul on vmmpp memory matches float64")
    grown = stats()
    check(grown.committed_bytes >= baseline.committed_bytes + 4 * 64 * MIB,
          f"memory grew with the tensors ({grown.committed_bytes / MIB:.1f} MiB committed)")
    del a, b, c, ref

    # 3. Stream-ordered frees: x is freed while kernels queued on a side stream still read it
    #    (behind a spin kernel, so they surely do). Until the side stream passes the free, a new
    #    allocation on the default stream (not ordered after the side stream) must not get x's
    #    block, or its writes would land under those kernels and y would come out wrong; after
    #    that, first fit hands x's block out again. Everything the side stream uses is allocated
    #    before the spin: growth costs tens of microseconds per 2 MiB page (about 2 ms for 64 MiB
    #    on an H100), so allocating in the loop would let the stream finish before the free.
    torch.cuda.synchronize()
    lib.vmmpp_allocator_trim(device)  # earlier frees done: x's block will be the lowest free range
    n = 4096
    spin = hasattr(torch.cuda, "_sleep")
    with torch.cuda.stream(side):
        x = torch.randn(n, n, device="cuda")
        x_copy = x.clone()
        y, t = torch.empty_like(x), torch.empty_like(x)
        torch.cuda.synchronize()
        if spin:
            torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time ahead of x's readers
        y.copy_(x)
        for _ in range(30):
            torch.matmul(y, x, out=t)
            torch.tanh(t.div_(n), out=y)
    x_ptr = x.data_ptr()
    del x  # torch calls vmmpp_free(x, stream=side) now
    pending = stats().pending_frees
    z = torch.zeros(n, n, device="cuda")
    reused_early = z.data_ptr() == x_ptr
    z += 1
    torch.cuda.synchronize()
    w = torch.empty(n, n, device="cuda")
    reused_after = w.data_ptr() == x_ptr
    y_ref = x_copy.clone()
    for _ in range(30):
        y_ref = torch.tanh(y_ref @ x_copy / n)
    print(f"  right after the free: {pending} frees pending, x's block handed out again: {reused_early}; "
          f"after the side stream passed it: {reused_after}")
    if spin:
        check(pending >= 1 and not reused_early, "a block freed on a busy stream waited for that stream")
        check(reused_after, "once the stream passed the free, first fit handed the block out again")
    check(torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5), "the kernels reading the freed block computed the right y")
    check(bool((z == 1).all().item()), "the new allocation holds what was written to it")
    del x_copy, y, t, y_ref, z, w

    # 4. A real workload on vmmpp memory gives the same results as on PyTorch's own allocator
    #    (run in a child process: the allocator cannot be changed once CUDA memory is in use).
    import subprocess
    import tempfile
    logits, ids = transformer_workload(torch)
    during = stats()
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "reference.pt")
        env = dict(os.environ, VMMPP_WORKLOAD_REFERENCE=ref_path)
        subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, check=True)
        ref_logits, ref_ids = torch.load(ref_path)
    print(f"  transformer workload: peak live {during.peak_live_bytes / MIB:.1f} MiB; logits max |diff| vs "
          f"PyTorch's allocator {(logits - ref_logits).abs().max().item():.3g}")
    check(torch.equal(ids, ref_ids), "generated ids equal those generated on PyTorch's own allocator")
    check(torch.allclose(logits, ref_logits, rtol=0, atol=1e-5), "logits match PyTorch's own allocator's")
    del logits, ids, ref_logits, ref_ids

    # 5. Elasticity: with the tensors gone, the memory goes back to the device.
    torch.cuda.synchronize()
    lib.vmmpp_allocator_trim(device)
    after = stats()
    print(f"  after freeing: {after.live_blocks} blocks live, {after.committed_bytes / MIB:.1f} MiB committed "
          f"(peak live {after.peak_live_bytes / MIB:.1f} MiB)")
    check(after.pending_frees == 0, "no free left pending after synchronize + trim")
    check(after.committed_bytes <= baseline.committed_bytes + 2 * 2 * MIB,
          "committed memory fell back to the baseline")

    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
