#!/usr/bin/env python3
"""The Python half of the peer benchmark (issue 16): the allocators an engine already has.

Peers, each in a subprocess of its own (an allocator is chosen before CUDA starts):
  torch_default            PyTorch's caching allocator
  torch_expandable         PyTorch, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  torch_cudaMallocAsync    PyTorch, PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
  kvcached                 kvcached 0.1.6 driven as vLLM drives it: init_kvcached(is_worker=True),
                           alloc_kv_cache() of FlashAttention's (2, blocks, 16, 8, 128) bf16 shape
                           over 32 layers, get_kv_cache_manager(), then KVCacheManager.alloc(n) /
                           free(ids) of block ids (its page groups are mapped by its C++
                           PageAllocator, with the prealloc thread vLLM starts).

A block is 2 MiB (32 layers, 8 KV heads of 128, bf16, 16 tokens: the C++ half's geometry); for
PyTorch one block is one 2 MiB uint8 tensor. Scenarios, as in peers_vmmpp.cpp (per-call latency
of the call that takes a block, time.perf_counter_ns around it):
  grow     0 -> 8 GiB, one block per call, unpaced
  paced    the same at 20 GB/s (spinning), after a fill, an emptying and a quiet 100 ms
  steady   ~4 GiB live; free a random block, take one (the take is timed)
  burst    16 GiB at once: 64 sequences of 128 blocks (PyTorch: 8,192 block tensors; kvcached:
           64 alloc(128)); GB/s of the whole burst
  memory   8 GiB grown and freed: device bytes held (cudaMemGetInfo against the process's own
           baseline) at once and after 300 ms with no call; then what an explicit
           empty_cache() / trim() costs and gives back (counters *_explicit_*)
  churn    40 sequences of lognormal lengths (median 665 tokens, sigma 0.88), one freed and one
           admitted per step: device bytes held over live block bytes
Results: one JSON file per peer in Google Benchmark's shape ({"context", "benchmarks": [{"name":
"<scenario>/<peer>", counters...}]}), which bench/peers/summarize.py reads with the C++ half's.

Usage: peers_torch.py --out DIR [--scale 0.5] [--peers torch_default,kvcached] [--kvcached-path P]
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback

MiB = 1 << 20
GiB = 1 << 30
BLOCK_BYTES = 2 * MiB
BLOCK_TOKENS = 16
PACED_GBPS = 20.0
QUIET_S = 0.1
MEMORY_WAIT_S = 0.3
LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES = 32, 8, 128, 2

PEERS = {
    "torch_default": {},
    "torch_expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    "torch_cudaMallocAsync": {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"},
    "kvcached": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"},
}


class Sizes:
    """The issue's sizes times `scale`, in whole 256 MiB sequences (as peers_vmmpp.cpp)."""

    def __init__(self, scale: float, churn_steps: int | None = None):
        if not 0 < scale <= 4:
            raise ValueError("scale must lie in (0, 4]")

        def scaled(b: int) -> int:
            return max(int(b * scale) // (256 * MiB) * (256 * MiB), 256 * MiB)

        self.scale = scale
        self.grow_blocks = scaled(8 * GiB) // BLOCK_BYTES
        self.burst_blocks = scaled(16 * GiB) // BLOCK_BYTES
        self.steady_blocks = scaled(4 * GiB) // BLOCK_BYTES
        self.steady_calls = max(int(4000 * scale), 100)
        self.churn_steps = churn_steps if churn_steps is not None else int(1000 * scale)


def percentiles(us: list[float], prefix: str = "") -> dict:
    """p50 / p99 / p99.9 / max / mean of per-call microseconds, as peers_vmmpp.cpp reports them."""
    if not us:
        return {}
    v = sorted(us)

    def at(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    return {prefix + "p50_us": at(0.50), prefix + "p99_us": at(0.99), prefix + "p999_us": at(0.999),
            prefix + "max_us": v[-1], prefix + "mean_us": sum(v) / len(v), prefix + "calls": float(len(v))}


def spin_until(t_ns: int) -> None:
    while time.perf_counter_ns() < t_ns:
        pass


def pacing_ns(gbps: float) -> float:
    return BLOCK_BYTES / gbps  # bytes / (GB/s) = ns


def lognormal_tokens(rng: random.Random) -> int:
    return max(1, round(rng.lognormvariate(math.log(665.0), 0.88)))


# ---------------------------------------------------------------------------------------------
# Allocators behind one interface: take(n) -> handle of n blocks, give(handle)


class TorchBlocks:
    """n 2 MiB tensors from PyTorch's allocator (whichever backend the environment chose)."""

    name_suffix = ""

    def __init__(self, torch, capacity_blocks: int):
        self.torch = torch
        self.capacity_blocks = capacity_blocks

    def take(self, n: int):
        t = self.torch
        if n == 1:
            return t.empty(BLOCK_BYTES, dtype=t.uint8, device="cuda")
        return [t.empty(BLOCK_BYTES, dtype=t.uint8, device="cuda") for _ in range(n)]

    def give(self, handle) -> None:
        """Nothing to call: the block goes back to the allocator when the caller drops its last
        reference (callers do so right after give, inside the timed region where it is timed)."""

    def explicit_release(self) -> None:
        self.torch.cuda.empty_cache()

    def extra_counters(self) -> dict:
        return {"torch_reserved_bytes": float(self.torch.cuda.memory_reserved())}

    def close(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()


class KvcachedBlocks:
    """kvcached 0.1.6 as vLLM's patched BlockPool drives it (see the module docstring)."""

    def __init__(self, torch, capacity_blocks: int):
        from kvcached.integration.vllm import interfaces as kvi

        self.torch = torch
        self.kvi = kvi
        self.capacity_blocks = capacity_blocks
        kvi.init_kvcached(tp_rank=0, world_size=1, pp_rank=0, is_worker=True, device="cuda:0", async_sched=False)
        # +1: vLLM's null block 0 (reserve_null_block=True in get_kv_cache_manager)
        shape = (2, capacity_blocks + 1, BLOCK_TOKENS, KV_HEADS, HEAD_DIM)
        self.kv_tensors = kvi.alloc_kv_cache(shape, BLOCK_TOKENS, torch.bfloat16, "cuda", LAYERS,
                                             attention_type="MHA", kv_layout="NHD")
        cell_size = KV_HEADS * HEAD_DIM * DTYPE_BYTES  # one token of one layer's K (vLLM: page_size_bytes // block_size // 2)
        self.manager = kvi.get_kv_cache_manager(capacity_blocks + 1, BLOCK_TOKENS, cell_size, LAYERS,
                                                num_kv_buffers=2, pool_name="block_pool")
        self.manager._wait_post_init()  # the null block and the prealloc thread, as at engine start
        # one page id maps one 2 MiB page in each of the 32 x 2 K/V buffers
        self.page_group_bytes = self.manager.page_size * LAYERS * 2

    def take(self, n: int):
        ids = self.manager.alloc(n)
        if ids is None:
            raise RuntimeError(f"kvcached alloc({n}) returned None (available {self.manager.available_size()})")
        return ids

    def give(self, handle) -> None:
        self.manager.free(handle)

    def explicit_release(self) -> None:
        self.manager.trim()

    def extra_counters(self) -> dict:
        pa = self.manager.page_allocator
        inuse, reserved = pa.get_num_inuse_pages(), pa.get_num_reserved_pages()
        return {"kvcached_inuse_pages": float(inuse), "kvcached_reserved_pages": float(reserved),
                "kvcached_mapped_bytes": float((inuse + reserved) * self.page_group_bytes)}

    def close(self) -> None:
        try:
            self.kvi.shutdown_kvcached()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# ---------------------------------------------------------------------------------------------
# Scenarios (each returns a dict of counters)


class Device:
    """Device bytes this process holds beyond its baseline (cudaMemGetInfo)."""

    def __init__(self, torch):
        self.torch = torch
        torch.cuda.synchronize()
        self.free0 = torch.cuda.mem_get_info()[0]

    def held(self) -> int:
        return max(0, self.free0 - self.torch.cuda.mem_get_info()[0])


def grow(alloc, sz: Sizes, paced: bool) -> dict:
    n = sz.grow_blocks
    held = []
    if paced:  # filled and emptied once, then quiet
        for _ in range(n):
            held.append(alloc.take(1))
        for h in held:
            alloc.give(h)
        held.clear()
        time.sleep(QUIET_S)
    us = []
    interval = pacing_ns(PACED_GBPS)
    start = time.perf_counter_ns()
    nxt = float(start)
    for _ in range(n):
        if paced:
            spin_until(int(nxt))
            nxt += interval
        t0 = time.perf_counter_ns()
        h = alloc.take(1)
        us.append((time.perf_counter_ns() - t0) / 1e3)
        held.append(h)
    seconds = (time.perf_counter_ns() - start) / 1e9
    r = percentiles(us)
    r.update(achieved_GBps=n * BLOCK_BYTES / seconds / 1e9, asked_GBps=PACED_GBPS if paced else 0.0,
             grown_bytes=float(n * BLOCK_BYTES))
    for h in held:
        alloc.give(h)
    return r


def memory(alloc, sz: Sizes, dev: Device) -> dict:
    n = sz.grow_blocks
    held = [alloc.take(1) for _ in range(n)]
    alloc.torch.cuda.synchronize()
    before = dev.held()
    for h in held:
        alloc.give(h)
    held.clear()
    gc.collect()
    at_once = dev.held()
    time.sleep(MEMORY_WAIT_S)
    after = dev.held()

    def pct(now: int) -> float:
        return 0.0 if before == 0 else 100.0 * (before - min(before, now)) / before

    r = {"held_before_bytes": float(before), "held_at_once_bytes": float(at_once),
         "held_after_wait_bytes": float(after), "back_at_once_pct": pct(at_once), "back_pct": pct(after),
         "idle_bytes": float(after), "wait_ms": MEMORY_WAIT_S * 1e3}
    r.update(alloc.extra_counters())
    t0 = time.perf_counter_ns()
    alloc.explicit_release()
    r["explicit_release_ms"] = (time.perf_counter_ns() - t0) / 1e6
    r["back_explicit_pct"] = pct(dev.held())
    return r


def steady(alloc, sz: Sizes) -> dict:
    live = [alloc.take(1) for _ in range(sz.steady_blocks)]
    rng = random.Random(16)
    us, frees = [], []
    for _ in range(sz.steady_calls):
        i = rng.randrange(len(live))
        t0 = time.perf_counter_ns()
        alloc.give(live[i])
        live[i] = None  # PyTorch: the last reference goes here, so this is timed with the give
        frees.append((time.perf_counter_ns() - t0) / 1e3)
        t0 = time.perf_counter_ns()
        live[i] = alloc.take(1)
        us.append((time.perf_counter_ns() - t0) / 1e3)
    r = percentiles(us)
    r.update(percentiles(frees, "free_"))
    r["live_bytes"] = float(sz.steady_blocks * BLOCK_BYTES)
    for h in live:
        alloc.give(h)
    return r


def burst(alloc, sz: Sizes) -> dict:
    per_seq = 256 * MiB // BLOCK_BYTES
    seqs = sz.burst_blocks // per_seq
    us, held = [], []
    start = time.perf_counter_ns()
    for _ in range(seqs):
        t0 = time.perf_counter_ns()
        held.append(alloc.take(per_seq))
        us.append((time.perf_counter_ns() - t0) / 1e3)
    seconds = (time.perf_counter_ns() - start) / 1e9
    r = percentiles(us)
    r.update(burst_bytes=float(seqs * per_seq * BLOCK_BYTES), burst_GBps=seqs * per_seq * BLOCK_BYTES / seconds / 1e9)
    for h in held:
        alloc.give(h)
    return r


def churn(alloc, sz: Sizes, dev: Device) -> dict:
    rng = random.Random(665)
    seqs = []  # (handle, blocks)

    def admit():
        blocks = -(-lognormal_tokens(rng) // BLOCK_TOKENS)
        return alloc.take(blocks), blocks

    for _ in range(40):
        seqs.append(admit())
    total = worst = live_total = 0.0
    for _ in range(sz.churn_steps):
        i = rng.randrange(40)
        alloc.give(seqs[i][0])
        seqs[i] = None
        seqs[i] = admit()
        live = sum(b for _, b in seqs) * BLOCK_BYTES
        ratio = dev.held() / live
        total += ratio
        live_total += live
        worst = max(worst, ratio)
    steps = max(sz.churn_steps, 1)
    for h, _ in seqs:
        alloc.give(h)
    return {"churn_mean": total / steps, "churn_worst": worst, "live_mean_bytes": live_total / steps,
            "steps": float(sz.churn_steps)}


def run_peer(peer: str, sz: Sizes, out_json: str) -> int:
    """In the child process: every scenario against one peer; writes out_json. Exit status 1 if
    any scenario failed."""
    import torch

    torch.cuda.init()
    torch.cuda.set_device(0)
    warm = torch.zeros(1, device="cuda")  # the context, and PyTorch's first segment, before the baseline
    torch.cuda.synchronize()
    prop = torch.cuda.get_device_properties(0)
    context = {"peer": peer, "torch": torch.__version__, "cuda": str(torch.version.cuda), "gpu": prop.name,
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "peers_scale": str(sz.scale),
               "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    capacity = max(sz.burst_blocks, sz.grow_blocks) + 512
    dev = Device(torch)
    benchmarks, failed = [], 0
    try:
        if peer == "kvcached":
            import kvcached

            context["kvcached"] = getattr(kvcached, "__version__", "0.1.6")
            alloc = KvcachedBlocks(torch, capacity)
        else:
            alloc = TorchBlocks(torch, capacity)
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        traceback.print_exc()
        benchmarks.append({"name": f"setup/{peer}", "error_occurred": True, "error_message": repr(e)})
        alloc, failed = None, 1
    scenarios = [("grow", lambda: grow(alloc, sz, False)), ("memory", lambda: memory(alloc, sz, dev)),
                 ("paced", lambda: grow(alloc, sz, True)), ("steady", lambda: steady(alloc, sz)),
                 ("burst", lambda: burst(alloc, sz)), ("churn", lambda: churn(alloc, sz, dev))]
    for name, fn in scenarios if alloc is not None else []:
        rec = {"name": f"{name}/{peer}", "run_type": "iteration", "iterations": 1}
        try:
            t0 = time.perf_counter()
            rec.update(fn())
            rec["real_time"] = (time.perf_counter() - t0) * 1e3
            rec["time_unit"] = "ms"
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            traceback.print_exc()
            rec.update(error_occurred=True, error_message=repr(e))
            failed = 1
        benchmarks.append(rec)
        gc.collect()
        if peer != "kvcached":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the next scenario starts from nothing held
        print(f"peers_torch: {peer} {name} done", flush=True)
    del warm
    with open(out_json, "w") as f:
        json.dump({"context": context, "benchmarks": benchmarks}, f, indent=1)
    if alloc is not None:
        alloc.close()
    return failed


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for peer_<name>.json and peer_<name>.log")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--churn-steps", type=int, default=None)
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    ap.add_argument("--kvcached-path", default=None, help="folder to put first on PYTHONPATH (pip --target)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per peer")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sz = Sizes(args.scale, args.churn_steps)
    if args.child:
        return run_peer(args.child, sz, os.path.join(args.out, f"peer_{args.child}.json"))
    os.makedirs(args.out, exist_ok=True)
    status = 0
    for peer in [p for p in args.peers.split(",") if p]:
        if peer not in PEERS:
            print(f"peers_torch: unknown peer {peer}", file=sys.stderr)
            return 2
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        env.update(PEERS[peer])
        if peer == "kvcached" and args.kvcached_path:
            env["PYTHONPATH"] = args.kvcached_path + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--scale", str(args.scale),
               "--child", peer]
        if args.churn_steps is not None:
            cmd += ["--churn-steps", str(args.churn_steps)]
        log = os.path.join(args.out, f"peer_{peer}.log")
        t0 = time.time()
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        print(f"peers_torch: {peer}: exit {rc} in {time.time() - t0:.1f} s (log {log})", flush=True)
        status = status or (1 if rc != 0 else 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
