#!/usr/bin/env python3
"""Benchmarks of the serving engine (examples/serving, issue 17).

  throughput: one model, saturated decode, the same requests on each cache configuration
      (static = one cudaMalloc, elastic = vmm + adaptive extents, elastic_pages = vmm + 2 MiB
      pages), alternated and repeated; tokens/s and the ratio to static.
  replay: N engine processes on one GPU (one model each) replay a trace of bench/traces (cut to
      a window and sped up), once with static slices (total / N each, cudaMalloc) and once with
      one cross-process budget (vmmpp::process_budget of `total`, each process's cache may commit
      all of it). TTFT p50/p99, tokens/s, preemptions, committed memory over time (CSV).
  prefix: a shared-prefix multi-turn chat workload (workload.py) on each cache configuration
      (elastic against static_config, the same size) with prefix caching off and on, alternated
      and repeated; TTFT p50/p99, tokens/s, prefix hit rate, evictions, committed memory.
  tier: a shared-prefix multi-turn workload whose prefixes do not all fit the KV (issue 30), with
      prefix caching on: no host tier, a vmmpp_kv.HostTier behind the prefix cache (recompute
      preemption), and the tier with swap preemption, alternated and repeated; TTFT p50/p99,
      tokens/s, cached and host-loaded tokens, the tier's traffic, preemptions.
  lend: two engine processes on one KV budget (issue 29): A serves its shared-prefix workload and
      idles with a warm prefix cache (no call at all) while B serves a heavier one; static halves,
      one process budget (A keeps its cache) and the same with A's cache lent (PrefixCache
      lend=True: B's refused growth takes A's cached pages through A's budget watcher), fresh
      processes per run, repeated; B's TTFT p50/p99, tokens/s, preemptions, committed memory,
      what A lent and A's hit rate when it serves its workload again.

  --prefix-cache on|off (throughput, prefix's --prefix-caching lists both): the engine's prefix
      caching (a vmmpp_kv.PrefixCache over the cache: cached leading blocks attached at admission,
      full blocks published as they are written, evicted before the engine preempts). Default off.
  --host-tier-blocks N (throughput, prefix; tier's default 4096): a vmmpp_kv.HostTier of N blocks
      behind the prefix cache, its copies on a torch stream of its own (0: none). --preemption
      recompute|swap (throughput, prefix): swap moves preempted requests to the tier and back.

    VMMPP_KV_LIB=.../libvmmpp_kv_capi.so python3 examples/serving/bench_serving.py throughput --out DIR
    VMMPP_KV_LIB=... python3 examples/serving/bench_serving.py replay --trace bench/traces/bursty-n2-seed1.csv \\
        --window 240 --speedup 4 --total-mib 1024 --out DIR
    VMMPP_KV_LIB=... python3 examples/serving/bench_serving.py prefix --out DIR
    VMMPP_KV_LIB=... python3 examples/serving/bench_serving.py lend --out DIR
    VMMPP_KV_LIB=... python3 examples/serving/bench_serving.py tier --out DIR
"""
import argparse
import csv
import json
import os
import random
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "capi", "python")]

import torch  # noqa: E402

import engine as E  # noqa: E402
import model as M  # noqa: E402
from kv_binding import vmmpp_kv  # noqa: E402
import workload as W  # noqa: E402

BLOCK_TOKENS = 16


def percentile(values, q):
    """Nearest rank, as bench/multi_model."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(-(-q * len(v) // 100)) - 1))]


def parse_model(spec, vocab=None):
    name, _, layers = spec.partition(":")
    return M.preset(name, layers=int(layers) if layers else None, vocab=vocab)


def paged_kv(cache, device, prefix_cache, max_cached_bytes=None, lend=False, host_tier_blocks=0, store_ahead_blocks=0):
    """The engine's store over `cache`, with prefix caching if prefix_cache is "on" (cached blocks
    no sequence holds bounded by max_cached_bytes; None: only by the cache's size; lend: they are
    lent to the other processes of the cache's process budget), and a host tier of
    host_tier_blocks blocks behind it (0: none; prefix caching on only)."""
    if prefix_cache != "on":
        if host_tier_blocks:
            raise SystemExit("--host-tier-blocks needs prefix caching on (the tier sits behind the prefix cache)")
        return E.PagedKV(cache, device)
    return E.PagedKV(cache, device, prefix_cache=vmmpp_kv.PrefixCache(cache, max_cached_bytes=max_cached_bytes,
                                                                      lend=lend),
                     host_tier_blocks=host_tier_blocks, store_ahead_blocks=store_ahead_blocks)


def torch_device(name):
    """(device, its name, synchronize): `name` "cuda" or "cpu" (host memory, a bookkeeping check)."""
    device = torch.device(name)
    if device.type != "cuda":
        return device, "cpu", lambda: None
    return device, torch.cuda.get_device_name(0), torch.cuda.synchronize


def budget_or_slice_cache(cfg, config, layout, total_bytes, budget=None, model=None, slices=1):
    """A bf16 cache of cfg's shape: without `budget`, a cache of config with total_bytes / slices
    (a static slice); with it, model `model` of the cross-process budget `budget` (total_bytes,
    created or joined), config one of vmmpp_kv.process_budget_config_names(), reaching all of it."""
    block_bytes = cfg.kv_bytes_per_token() * BLOCK_TOKENS
    shape = dict(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bf16", config=config,
                 layout=layout, device=0)
    if budget is None:
        return vmmpp_kv.KVCache(**shape, max_blocks=(total_bytes // slices) // block_bytes)
    return vmmpp_kv.ProcessBudgetCache(**shape, max_blocks=total_bytes // block_bytes, budget_name=budget,
                                       model=model, model_limit_bytes=total_bytes, global_limit_bytes=total_bytes)


def start_workers(commands):
    """Popen each command (its stdin and stdout line pipes) and wait for its "ready" line: the
    processes, in order, each with its ready line as `ready` (lend's workers put JSON after the word)."""
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for cmd in commands]
    for p in procs:
        line = p.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"worker did not start: {line!r}")
        p.ready = line.strip()
    return procs


# --------------------------------------------------------------------------- throughput

def throughput(args):
    device = torch.device("cuda")
    cfg = parse_model(args.model)
    model = M.Llama(cfg, device, seed=7)
    rng = random.Random(11)
    work = [([rng.randrange(cfg.vocab) for _ in range(args.prompt)], args.output) for _ in range(args.requests)]
    per_seq_blocks = -(-(args.prompt + args.output) // BLOCK_TOKENS)
    max_blocks = per_seq_blocks * args.batch + 64
    results = []

    def one(config, layout, rep):
        cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bf16",
                                 config=config, layout=layout, device=0, max_blocks=max_blocks)
        kv = paged_kv(cache, device, args.prefix_cache, host_tier_blocks=args.host_tier_blocks)
        engine = E.Engine(model, kv, max_batch=args.batch, max_prefill_tokens=args.batch * args.prompt,
                          preemption=args.preemption)
        reqs = [E.Request(i, p, n) for i, (p, n) in enumerate(work)]
        for r in reqs:
            engine.submit(r)
        torch.cuda.synchronize()
        decode_time, decode_steps, peak = 0.0, 0, 0
        start = time.perf_counter()
        while not engine.idle():
            t = time.perf_counter()
            prefill_before = engine.prefill_tokens
            engine.step()
            if engine.prefill_tokens == prefill_before:
                decode_time += time.perf_counter() - t
                decode_steps += 1
            peak = max(peak, kv.committed_bytes())
        wall = time.perf_counter() - start
        tokens = sum(len(r.output) for r in reqs)
        row = dict(config=config, layout=layout, rep=rep, tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
                   decode_steps=decode_steps, decode_step_ms=1e3 * decode_time / max(1, decode_steps),
                   decode_tokens_per_s=engine.decode_tokens / decode_time if decode_time else 0.0,
                   preemptions=engine.preemptions, peak_committed_mib=peak / 2**20,
                   checksum=sum(sum(r.output) for r in reqs))
        print(json.dumps(row), flush=True)
        del engine, kv
        torch.cuda.synchronize()
        cache.synchronize()
        return row

    print("prefix caching", args.prefix_cache, flush=True)
    one("static", args.layout, -1)  # warm-up: kernels, allocator
    for rep in range(args.repeats):
        for config in args.configs.split(","):
            results.append(one(config, args.layout, rep))
    summary = {}
    for config in args.configs.split(","):
        rows = [r for r in results if r["config"] == config]
        summary[config] = dict(tokens_per_s=[r["tokens_per_s"] for r in rows],
                               decode_tokens_per_s=[r["decode_tokens_per_s"] for r in rows],
                               median_tokens_per_s=percentile([r["tokens_per_s"] for r in rows], 50),
                               median_decode_tokens_per_s=percentile([r["decode_tokens_per_s"] for r in rows], 50))
    base = summary["static"]
    for config, s in summary.items():
        s["ratio_to_static"] = s["median_tokens_per_s"] / base["median_tokens_per_s"]
        s["decode_ratio_to_static"] = s["median_decode_tokens_per_s"] / base["median_decode_tokens_per_s"]
    checksums = {r["checksum"] for r in results}
    out = dict(model=args.model, config=vars(args), device=torch.cuda.get_device_name(0), runs=results,
               summary=summary, same_tokens_everywhere=len(checksums) == 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(out, f, indent=1)
    for config, s in summary.items():
        print(f"{config:14s} median {s['median_tokens_per_s']:9.1f} tok/s (ratio {s['ratio_to_static']:.4f}), "
              f"decode-only {s['median_decode_tokens_per_s']:9.1f} tok/s (ratio {s['decode_ratio_to_static']:.4f})")
    print("same tokens in every run:", len(checksums) == 1)


# --------------------------------------------------------------------------- replay

def read_trace(path, window_s, speedup, max_output):
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or line.startswith("arrival_us"):
                continue
            a, m, p, o = (int(x) for x in line.strip().split(","))
            if a < window_s * 1e6:
                rows.append((int(a / speedup), m, p, min(o, max_output)))
    return rows


def write_trace(path, rows, source, window_s, speedup, max_output):
    with open(path, "w") as f:
        f.write(f"# scaled from {source}: first {window_s} s, arrivals / {speedup}, outputs <= {max_output}\n")
        f.write("arrival_us,model,prompt_tokens,output_tokens\n")
        for r in rows:
            f.write(",".join(str(x) for x in r) + "\n")


def worker(args):
    device = torch.device("cuda")
    cfg = parse_model(args.model)
    model = M.Llama(cfg, device, seed=100 + args.index)
    total = args.total_mib << 20
    if args.mode == "static":
        cache = budget_or_slice_cache(cfg, "static", args.layout, total, slices=args.models)
    else:
        cache = budget_or_slice_cache(cfg, args.mode, args.layout, total, budget=args.budget, model=f"m{args.index}")
    kv = E.PagedKV(cache, device)
    rows = [r for r in read_trace(args.trace, 1e12, 1, 10**9) if r[1] == args.index]
    rng = random.Random(1000 + args.index)
    engine = E.Engine(model, kv, max_batch=256, max_prefill_tokens=8192, clock=time.time)
    # warm-up (kernels, cuBLAS handles) before the clock starts
    warm = E.Request(-1, [1] * 64, 4)
    engine.submit(warm)
    engine.run()
    engine.finished.clear()
    engine.steps = engine.prefill_tokens = engine.decode_tokens = 0
    torch.cuda.synchronize()
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    requests = [E.Request(i, [rng.randrange(cfg.vocab) for _ in range(p)], o, t0 + a / 1e6)
                for i, (a, _, p, o) in enumerate(rows)]
    pending = list(requests)
    series = []
    deadline = t0 + args.deadline
    while (pending or not engine.idle()) and time.time() < deadline:
        now = time.time()
        while pending and pending[0].arrival <= now:
            engine.submit(pending.pop(0))
        if engine.idle():
            time.sleep(max(0.0, min(pending[0].arrival - now, 0.05)))
            continue
        if engine.step() == 0:  # refused with nothing running: another process holds the budget
            time.sleep(0.002)
        series.append((round(time.time() - t0, 4), kv.committed_bytes(), len(engine.running), len(engine.waiting)))
    done = [r for r in requests if r.finished_at is not None]
    out = dict(index=args.index, model=args.model, mode=args.mode, kv_bytes_per_token=cfg.kv_bytes_per_token(),
               requests=len(requests), completed=len(done), preemptions=engine.preemptions, steps=engine.steps,
               rejected=len(engine.rejected),
               ttft_s=[r.first_token_at - r.arrival for r in requests if r.first_token_at is not None],
               unserved=sum(1 for r in requests if r.first_token_at is None),
               output_tokens=sum(len(r.output) for r in done),
               last_completion_s=max((r.finished_at - t0 for r in done), default=0.0),
               series=series)
    with open(args.result, "w") as f:
        json.dump(out, f)


def replay(args):
    os.makedirs(args.out, exist_ok=True)
    rows = read_trace(args.trace, args.window, args.speedup, args.max_output)
    scaled = os.path.join(args.out, "trace-scaled.csv")
    write_trace(scaled, rows, os.path.basename(args.trace), args.window, args.speedup, args.max_output)
    models = args.models.split(",")
    summary, memory_rows = {}, []
    for mode in args.modes.split(","):
        budget = f"vmmpp_serving_{os.getpid()}_{mode}"
        if mode != "static":
            vmmpp_kv.remove_process_budget(budget)
        procs = []
        for i, spec in enumerate(models):
            result = os.path.join(args.out, f".{mode}-{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "worker", "--index", str(i), "--model", spec,
                   "--mode", mode, "--models", str(len(models)), "--total-mib", str(args.total_mib),
                   "--budget", budget, "--trace", scaled, "--layout", args.layout, "--result", result,
                   "--deadline", str(args.window / args.speedup + args.drain)]
            procs.append((cmd, result))
        procs = list(zip(start_workers([cmd for cmd, _ in procs]), [result for _, result in procs]))
        t0 = time.time() + 0.5
        for p, _ in procs:
            p.stdin.write(f"{t0}\n")
            p.stdin.flush()
        samples = []
        while any(p.poll() is None for p, _ in procs):
            if mode != "static":
                s = vmmpp_kv.process_budget_stats(budget)
                samples.append((round(time.time() - t0, 3), s["committed"]))
            time.sleep(0.05)
        if any(p.returncode != 0 for p, _ in procs):
            # Recorded, not fatal: the other modes still run (the worker's traceback is on stderr).
            summary[mode] = dict(failed=[p.returncode for p, _ in procs])
            print(mode, "FAILED: worker exit codes", summary[mode]["failed"], flush=True)
            if mode != "static":
                vmmpp_kv.remove_process_budget(budget)
            continue
        workers = []
        for _, result in procs:
            with open(result) as f:
                workers.append(json.load(f))
            os.remove(result)
        if mode != "static":
            peak = vmmpp_kv.process_budget_stats(budget)["peak"]
            vmmpp_kv.remove_process_budget(budget)
        ttft = [t for w in workers for t in w["ttft_s"]]
        last = max(w["last_completion_s"] for w in workers)
        s = dict(ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
                 output_tokens=sum(w["output_tokens"] for w in workers),
                 tokens_per_s=sum(w["output_tokens"] for w in workers) / last if last else 0.0,
                 completed=sum(w["completed"] for w in workers), requests=sum(w["requests"] for w in workers),
                 unserved=sum(w["unserved"] for w in workers), preemptions=sum(w["preemptions"] for w in workers),
                 per_model=[dict(model=w["model"], requests=w["requests"], completed=w["completed"],
                                 ttft_p50_s=percentile(w["ttft_s"], 50), ttft_p99_s=percentile(w["ttft_s"], 99),
                                 preemptions=w["preemptions"], output_tokens=w["output_tokens"],
                                 peak_committed_mib=max((x[1] for x in w["series"]), default=0) / 2**20)
                            for w in workers])
        if mode != "static":
            s["budget_peak_mib"] = peak / 2**20
            s["committed_mean_mib"] = (sum(c for _, c in samples) / len(samples) / 2**20) if samples else 0.0
            for t, c in samples:
                memory_rows.append((mode, "all", t, c))
        else:
            s["committed_mean_mib"] = sum(w["series"][0][1] if w["series"] else 0 for w in workers) / 2**20
        for w in workers:
            for t, c, running, waiting in w["series"]:
                memory_rows.append((mode, w["model"], t, c))
        summary[mode] = s
        print(mode, json.dumps({k: v for k, v in s.items() if k != "per_model"}), flush=True)
        for m in s["per_model"]:
            print("   ", json.dumps(m), flush=True)
    with open(os.path.join(args.out, "memory.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "process", "t_s", "committed_bytes"])
        w.writerows(memory_rows)
    with open(os.path.join(args.out, "replay.json"), "w") as f:
        json.dump(dict(config=vars(args), device=torch.cuda.get_device_name(0), summary=summary), f, indent=1)


# --------------------------------------------------------------------------- prefix

def parse_range(text):
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def median(values):
    return percentile(values, 50)


def make_workload(args, vocab, **override):
    """The seeded shared-prefix multi-turn workload of args' --seed, --systems ... --think
    (workload.py); keyword arguments (seed, sessions, turns, user, answer, start_spread) override
    args'. A fresh object each call: a run fills it in."""
    def arg(name):
        return override.get(name, getattr(args, name))
    return W.shared_prefix_workload(arg("seed"), vocab, systems=args.systems, system_tokens=args.system_tokens,
                                    sessions=arg("sessions"), turns=arg("turns"), user_tokens=parse_range(arg("user")),
                                    answer_tokens=parse_range(arg("answer")), start_spread_s=arg("start_spread"),
                                    think_s=args.think)


def serve(engine, kv, work, synchronize, deadline_s=None, clock=time.perf_counter, on_step=None):
    """Runs work's sessions through engine (closed loops) and returns what prefix and lend report
    of it: TTFT, tokens/s, prefix hits (of this run: the prefix cache's counts before it are
    taken off), evictions, preemptions, committed memory, the answers' checksum.
    on_step(now, committed_bytes): after each step."""
    driver = W.SessionDriver(work, engine, E.Request, clock=clock)
    committed = []

    def step(now):
        committed.append(kv.committed_bytes())
        if on_step is not None:
            on_step(now, committed[-1])

    before = kv.prefix_cache.stats() if kv.prefix_cache is not None else {}
    tier = getattr(kv, "tier", None)
    tier_before = tier.stats() if tier is not None else {}
    synchronize()
    start = driver.run(deadline_s=deadline_s, on_step=step)
    synchronize()
    requests = driver.requests
    done = [r for r in requests if r.finished_at is not None]
    last = max((r.finished_at for r in done), default=start)
    output_tokens = sum(len(r.output) for r in done)
    stats = kv.prefix_cache.stats() if kv.prefix_cache is not None else {}
    hits, misses, evictions = (stats.get(k, 0) - before.get(k, 0) for k in ("hits", "misses", "evictions"))
    tier_stats = tier.stats() if tier is not None else {}
    tier_row = {f"tier_{k}": tier_stats.get(k, 0) - tier_before.get(k, 0)
                for k in ("offloaded_blocks", "dropped_blocks", "loaded_blocks", "swapped_out", "swapped_in",
                          "bytes_to_host", "bytes_to_device")}
    host_tokens = getattr(kv, "host_tokens", 0)  # admitted tokens the host tier copied back
    tier_row.update(host_tokens=host_tokens,
                    host_token_rate=host_tokens / engine.admitted_tokens if engine.admitted_tokens else 0.0,
                    recomputes=engine.recomputes, swapped_out=engine.swapped_out, swapped_in=engine.swapped_in,
                    swap_retries=engine.swap_retries)
    return dict(turns=work.turns(), submitted=len(requests), completed=len(done), rejected=len(engine.rejected),
                ttft_p50_s=percentile([r.first_token_at - r.arrival for r in done], 50),
                ttft_p99_s=percentile([r.first_token_at - r.arrival for r in done], 99),
                wall_s=last - start, output_tokens=output_tokens,
                tokens_per_s=output_tokens / (last - start) if last > start else 0.0,
                prompt_tokens=engine.admitted_tokens, prompt_tokens_computed=engine.prefill_tokens,
                cached_token_rate=engine.cached_tokens / engine.admitted_tokens if engine.admitted_tokens else 0.0,
                block_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
                prefix_hits=hits, prefix_misses=misses, evictions=evictions,
                cached_mib_at_end=stats.get("cached_bytes", 0) / 2**20,
                preemptions=engine.preemptions, steps=engine.steps,
                committed_mean_mib=(sum(committed) / len(committed) / 2**20) if committed else 0.0,
                committed_peak_mib=max(committed, default=0) / 2**20,
                checksum=sum(sum(a) for s in work.sessions for a in s.answers), **tier_row)


def prefix(args):
    """Modes x prefix caching {off, on} on one seeded shared-prefix multi-turn workload, repeated.
    --device cpu (mode host, a small model) checks the bookkeeping on a machine without a GPU."""
    device, device_name, synchronize = torch_device(args.device)
    cfg = parse_model(args.model, vocab=args.vocab)
    model = M.Llama(cfg, device, seed=7)
    block_bytes = cfg.kv_bytes_per_token() * BLOCK_TOKENS
    max_blocks = (args.kv_mib << 20) // block_bytes  # static's fixed size, elastic's reach

    def one(mode, prefix_cache, rep, sessions, start_spread_s):
        cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bf16",
                                 config=mode, layout=args.layout, device=0, max_blocks=max_blocks)
        kv = paged_kv(cache, device, prefix_cache,
                      None if args.max_cached_mib is None else args.max_cached_mib << 20,
                      host_tier_blocks=args.host_tier_blocks if prefix_cache == "on" else 0)
        engine = E.Engine(model, kv, max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
                          preemption=args.preemption)
        work = make_workload(args, cfg.vocab, sessions=sessions, start_spread=start_spread_s)
        row = dict(mode=mode, prefix_cache=prefix_cache, rep=rep, **serve(engine, kv, work, synchronize, args.deadline))
        print(json.dumps(row), flush=True)
        del engine, kv
        synchronize()
        cache.synchronize()
        return row

    modes = args.modes.split(",")
    settings = args.prefix_caching.split(",")
    combos = [(m, p) for m in modes for p in settings]
    # Warm-up: the whole workload once in each caching setting (every batch, prefill and
    # cached-prefix attention shape the runs meet: on an H100 on 2026-12-07 the first full run of
    # a setting in a process took 1.4-1.7x the later ones, whichever mode it was), then each mode
    # briefly (its first commits).
    for prefix_cache in settings:
        one(modes[0], prefix_cache, -1, args.sessions, args.start_spread)
    for mode in modes:
        one(mode, settings[-1], -1, min(8, args.sessions), 0.0)
    def report(results, printed):
        """prefix.json and prefix.md of the runs so far (rewritten after each run, so a run cut
        short leaves the ones before it); printed: the markdown goes to stdout too."""
        keys = ("ttft_p50_s", "ttft_p99_s", "tokens_per_s", "cached_token_rate", "block_hit_rate", "evictions",
                "preemptions", "committed_mean_mib", "committed_peak_mib", "completed", "wall_s")
        summary = {}
        for mode, prefix_cache in combos:
            rows = [r for r in results if r["mode"] == mode and r["prefix_cache"] == prefix_cache]
            summary[f"{mode}/{prefix_cache}"] = {k: median([r[k] for r in rows]) for k in keys}
            summary[f"{mode}/{prefix_cache}"]["runs"] = len(rows)
        # The answers (their checksum) of every complete run: one value when prefix caching, the mode and
        # the schedule changed no greedy token (bf16 may round differently with a cached prefix).
        checksums = {}
        for r in results:
            if r["completed"] == r["turns"]:
                checksums.setdefault(f"{r['mode']}/{r['prefix_cache']}", set()).add(r["checksum"])
        checksums = {name: sorted(values) for name, values in checksums.items()}
        same_answers = len({c for cs in checksums.values() for c in cs}) == 1
        out = dict(model=args.model, config=vars(args), device=device_name,
                   kv_bytes_per_token=cfg.kv_bytes_per_token(), max_blocks=max_blocks, runs=results, summary=summary,
                   answer_checksums=checksums, same_answers_everywhere=same_answers)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "prefix.json"), "w") as f:
            json.dump(out, f, indent=1)
        lines = [f"# Prefix caching, shared-prefix multi-turn workload ({device_name})", "",
                 f"Model {args.model} (bf16), {args.kv_mib} MiB of KV ({max_blocks} blocks of {block_bytes >> 10} KiB: "
                 f"static's fixed size, elastic's reach), layout {args.layout}. Workload seed {args.seed}: "
                 f"{args.systems} system prompts of {args.system_tokens} tokens, {args.sessions} sessions x "
                 f"{args.turns} turns (user {args.user}, answers {args.answer} tokens), sessions starting over "
                 f"{args.start_spread} s, "
                 f"think {args.think} s; max batch {args.max_batch}; cached blocks no sequence holds bounded by "
                 f"{'the KV size' if args.max_cached_mib is None else f'{args.max_cached_mib} MiB'}. Medians of "
                 f"{args.repeats} runs each, order alternating by repeat ({len(results)} runs done).", "",
                 "| mode | prefix caching | TTFT p50 (s) | TTFT p99 (s) | tokens/s | cached tokens | block hit rate "
                 "| evictions | preemptions | committed mean / peak (MiB) | turns done |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, s in summary.items():
            mode, prefix_cache = name.split("/")
            lines.append(f"| {mode} | {prefix_cache} | {s['ttft_p50_s']:.3f} | {s['ttft_p99_s']:.3f} | "
                         f"{s['tokens_per_s']:.1f} | {100 * s['cached_token_rate']:.1f} % | "
                         f"{100 * s['block_hit_rate']:.1f} % | {s['evictions']:.0f} | {s['preemptions']:.0f} | "
                         f"{s['committed_mean_mib']:.0f} / {s['committed_peak_mib']:.0f} | {s['completed']:.0f} |")
        ratios = []
        for mode in modes:
            if "off" in settings and "on" in settings:
                on, off = summary[f"{mode}/on"], summary[f"{mode}/off"]
                ratios.append(f"- {mode}: prefix caching on / off: TTFT p50 "
                              f"x{on['ttft_p50_s'] / off['ttft_p50_s']:.3f}, "
                              f"p99 x{on['ttft_p99_s'] / off['ttft_p99_s']:.3f}, tokens/s "
                              f"x{on['tokens_per_s'] / off['tokens_per_s']:.3f}")
        if "static" in modes:
            for mode in modes:
                for prefix_cache in settings if mode != "static" else ():
                    e, st = summary[f"{mode}/{prefix_cache}"], summary[f"static/{prefix_cache}"]
                    ratios.append(f"- {mode} / static, prefix caching {prefix_cache}: TTFT p50 "
                                  f"x{e['ttft_p50_s'] / st['ttft_p50_s']:.3f}, "
                                  f"p99 x{e['ttft_p99_s'] / st['ttft_p99_s']:.3f}, "
                                  f"tokens/s x{e['tokens_per_s'] / st['tokens_per_s']:.3f}, mean committed "
                                  f"x{e['committed_mean_mib'] / st['committed_mean_mib']:.3f}")
        lines += ["", "Ratios of medians:", ""] + ratios + [
            "", "Cached tokens: context tokens of admitted turns taken from the prefix cache (the engine's count); "
            "block hit rate: PrefixCache.stats hits / (hits + misses), attach calls of admissions refused for memory "
            "included. "
            "Greedy answers differ between runs only where bf16 rounding does (same lengths: the same work).",
            "", f"Same answers in every complete run: {same_answers} (checksums by mode/prefix caching: {checksums})."]
        with open(os.path.join(args.out, "prefix.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        if printed:
            print("\n".join(lines))

    results = []
    for rep in range(args.repeats):
        for mode, prefix_cache in (combos if rep % 2 == 0 else combos[::-1]):  # order alternates by repeat
            results.append(one(mode, prefix_cache, rep, args.sessions, args.start_spread))
            report(results, printed=False)
    report(results, printed=True)


# --------------------------------------------------------------------------- tier

# The tier runs: (name, host tier on, preemption), prefix caching on in all.
# variant: (host tier, preemption, blocks stored ahead per step)
TIER_VARIANTS = {"off": (False, "recompute", 0), "tier": (True, "recompute", 0), "tier_swap": (True, "swap", 0),
                 "tier_swap_ahead": (True, "swap", 16)}


def tier(args):
    """A shared-prefix multi-turn workload whose prefixes do not all fit the KV (issue 30), on one
    configuration with prefix caching on: without a host tier (evicted blocks dropped, preempted
    requests recomputed), with one (evicted blocks copied to host memory and back at admission),
    and with one and swap preemption; alternated and repeated. TTFT p50/p99, tokens/s, cached and
    host-loaded tokens, the tier's traffic, preemptions."""
    device, device_name, synchronize = torch_device(args.device)
    cfg = parse_model(args.model, vocab=args.vocab)
    model = M.Llama(cfg, device, seed=7)
    block_bytes = cfg.kv_bytes_per_token() * BLOCK_TOKENS
    max_blocks = (args.kv_mib << 20) // block_bytes
    variants = args.variants.split(",")
    for v in variants:
        if v not in TIER_VARIANTS:
            raise SystemExit(f"unknown variant {v!r} (of {', '.join(TIER_VARIANTS)})")
    peak_tokens = W.peak_context_tokens(make_workload(args, cfg.vocab))

    def one(variant, rep, sessions, start_spread_s):
        on, preemption, ahead = TIER_VARIANTS[variant]
        cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bf16",
                                 config=args.mode, layout=args.layout, device=0, max_blocks=max_blocks)
        kv = paged_kv(cache, device, "on", host_tier_blocks=args.host_tier_blocks if on else 0, store_ahead_blocks=ahead)
        engine = E.Engine(model, kv, max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
                          preemption=preemption)
        work = make_workload(args, cfg.vocab, sessions=sessions, start_spread=start_spread_s)
        row = dict(variant=variant, rep=rep, **serve(engine, kv, work, synchronize, args.deadline))
        print(json.dumps(row), flush=True)
        del engine, kv
        synchronize()
        cache.synchronize()
        return row

    # Warm-up: the whole workload once without and once with the tier and swap (every batch and
    # attention shape the runs meet; prefix's first full run in a process was 1.4-1.7x slower).
    for variant in dict.fromkeys((variants[0], variants[-1])):
        one(variant, -1, args.sessions, args.start_spread)

    def report(results, printed):
        """tier.json and tier.md of the runs so far (rewritten after each run)."""
        keys = ("ttft_p50_s", "ttft_p99_s", "tokens_per_s", "cached_token_rate", "host_token_rate",
                "prompt_tokens_computed", "evictions", "tier_offloaded_blocks", "tier_loaded_blocks",
                "tier_dropped_blocks", "preemptions", "recomputes", "swapped_out", "swapped_in", "swap_retries",
                "tier_bytes_to_host", "tier_bytes_to_device", "committed_mean_mib", "completed", "wall_s")
        summary = {}
        for variant in variants:
            rows = [r for r in results if r["variant"] == variant]
            if rows:
                summary[variant] = {k: median([r[k] for r in rows]) for k in keys}
                summary[variant]["runs"] = len(rows)
        checksums = {}
        for r in results:
            if r["completed"] == r["turns"]:
                checksums.setdefault(r["variant"], set()).add(r["checksum"])
        checksums = {name: sorted(values) for name, values in checksums.items()}
        same_answers = len({c for cs in checksums.values() for c in cs}) == 1
        out = dict(model=args.model, config=vars(args), device=device_name,
                   kv_bytes_per_token=cfg.kv_bytes_per_token(), max_blocks=max_blocks,
                   peak_context_tokens=peak_tokens, runs=results, summary=summary, answer_checksums=checksums,
                   same_answers_everywhere=same_answers)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tier.json"), "w") as f:
            json.dump(out, f, indent=1)
        lines = [f"# Host tier behind the prefix cache, shared-prefix multi-turn workload ({device_name})", "",
                 f"Model {args.model} (bf16), {args.mode}, {args.kv_mib} MiB of KV ({max_blocks} blocks of "
                 f"{block_bytes >> 10} KiB), layout {args.layout}; host tier of {args.host_tier_blocks} blocks "
                 f"({args.host_tier_blocks * block_bytes / 2**20:.0f} MiB"
                 f"{', page-locked) on a stream of its own' if device.type == 'cuda' else ' of host memory)'}. "
                 f"Workload seed {args.seed}: {args.systems} system prompts of {args.system_tokens} tokens, "
                 f"{args.sessions} sessions x {args.turns} turns (user {args.user}, answers {args.answer} tokens), "
                 f"starting over {args.start_spread} s, think {args.think} s: its contexts fill {peak_tokens} "
                 f"tokens ({-(-peak_tokens // BLOCK_TOKENS)} blocks, x{peak_tokens / (max_blocks * BLOCK_TOKENS):.2f}"
                 f" the KV) at most. Max batch {args.max_batch}. Prefix caching on in every run. Medians of "
                 f"{args.repeats} runs each, order alternating by repeat ({len(results)} runs done).", "",
                 "Variants: off (no tier: evicted blocks dropped, preempted requests recomputed), tier (evicted "
                 "blocks copied to the host and back at admission; recompute preemption), tier_swap (the same, "
                 "preempted requests swapped out to the host and back in).", "",
                 "| variant | TTFT p50 (s) | TTFT p99 (s) | tokens/s | cached tokens | from host | prompt tokens "
                 "computed | evictions | offloaded / loaded blocks | preemptions (recomputed / swapped) "
                 "| to host / to GPU (MiB) | turns done |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, t in summary.items():
            lines.append(f"| {name} | {t['ttft_p50_s']:.3f} | {t['ttft_p99_s']:.3f} | {t['tokens_per_s']:.1f} | "
                         f"{100 * t['cached_token_rate']:.1f} % | {100 * t['host_token_rate']:.1f} % | "
                         f"{t['prompt_tokens_computed']:.0f} | {t['evictions']:.0f} | "
                         f"{t['tier_offloaded_blocks']:.0f} / {t['tier_loaded_blocks']:.0f} | "
                         f"{t['preemptions']:.0f} ({t['recomputes']:.0f} / {t['swapped_out']:.0f}) | "
                         f"{t['tier_bytes_to_host'] / 2**20:.0f} / {t['tier_bytes_to_device'] / 2**20:.0f} | "
                         f"{t['completed']:.0f} |")
        ratios = []
        if "off" in summary:
            base = summary["off"]
            for name, t in summary.items():
                if name != "off":
                    ratios.append(f"- {name} / off: TTFT p50 x{t['ttft_p50_s'] / base['ttft_p50_s']:.3f}, "
                                  f"p99 x{t['ttft_p99_s'] / base['ttft_p99_s']:.3f}, "
                                  f"tokens/s x{t['tokens_per_s'] / base['tokens_per_s']:.3f}")
        lines += ["", "Ratios of medians:", ""] + ratios + [
            "", "Cached tokens: context tokens of admitted turns already in their blocks at admission (GPU hits and "
            "blocks copied back from the host tier); from host: of those, the ones the tier copied back. "
            "Greedy answers differ between runs only where bf16 rounding does (same lengths: the same work).", "",
            "Every run (TTFT p50 / p99 s, tokens/s, preemptions):", ""]
        lines += [f"- rep {r['rep']} {r['variant']}: {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f}, "
                  f"{r['tokens_per_s']:.1f}, {r['preemptions']}" for r in results]
        lines += ["", f"Same answers in every complete run: {same_answers} (checksums by variant: {checksums})."]
        with open(os.path.join(args.out, "tier.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        if printed:
            print("\n".join(lines))

    results = []
    for rep in range(args.repeats):
        for variant in (variants if rep % 2 == 0 else variants[::-1]):  # order alternates by repeat
            results.append(one(variant, rep, args.sessions, args.start_spread))
            report(results, printed=False)
    report(results, printed=True)


# --------------------------------------------------------------------------- lend

LEND_MODES = ("static", "elastic", "elastic_lend")


def lend_worker(args):
    """One model of `lend` (A idle, B busy): its cache (a static slice of half the KV, or model
    args.role of the process budget), prefix caching on (lend=True in elastic_lend), warmed up,
    then "ready" and one JSON line for each command on stdin: "serve" (run its workload: serve's
    row, B's committed memory series included), "stats" (its prefix cache's and lending's
    figures) or "exit". Between commands it makes no call at all: an idle A's cached pages go to
    B through A's budget watcher thread alone."""
    device, device_name, synchronize = torch_device(args.device)
    cfg = parse_model(args.model, vocab=args.vocab)
    model = M.Llama(cfg, device, seed=100 if args.role == "A" else 101)
    total = args.kv_mib << 20
    gpu = device.type == "cuda"
    if args.mode == "static":
        cache = budget_or_slice_cache(cfg, "static" if gpu else "host", args.layout, total, slices=2)
    else:
        cache = budget_or_slice_cache(cfg, "elastic" if gpu else "host", args.layout, total, budget=args.budget,
                                      model=args.role)
    kv = paged_kv(cache, device, "on", lend=args.mode == "elastic_lend")

    def engine():
        return E.Engine(model, kv, max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
                        clock=time.time)

    # Warm-up (kernels, allocator, the cached-prefix attention) on a tiny workload of its own,
    # then nothing of it stays: its cached blocks are evicted and its pages given back.
    serve(engine(), kv, make_workload(args, cfg.vocab, seed=args.seed + 1000, sessions=2, start_spread=0.0),
          synchronize, clock=time.time)
    kv.prefix_cache.clear()
    cache.synchronize()
    cache.trim()
    print("ready", json.dumps(dict(device=device_name, kv_bytes_per_token=cfg.kv_bytes_per_token())), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "serve":
            series = []
            row = serve(engine(), kv, make_workload(args, cfg.vocab), synchronize, args.deadline, clock=time.time,
                        on_step=lambda now, committed: series.append((round(now, 4), committed)))
            step = max(1, len(series) // 1000)  # at most ~1000 points a run in the JSON
            row["series"] = series[::step]
            print(json.dumps(row), flush=True)
        elif command == "stats":
            cache.synchronize()
            print(json.dumps(dict(prefix=kv.prefix_cache.stats(), lending=kv.prefix_cache.lending_stats(),
                                  committed_bytes=kv.committed_bytes())), flush=True)
        else:
            break


def ask(proc, command):
    """Sends a lend worker one command and returns its JSON answer."""
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"worker exited (code {proc.wait()}) on {command!r}")
    return json.loads(line)


def lend(args):
    """Two models on one KV budget (--kv-mib): A serves its workload, then idles with a warm prefix
    cache while B serves a heavier one, in three modes (static halves, one elastic budget where A
    keeps its cache, the same with A's cache lent); then A serves its workload again. Each run is
    a fresh pair of processes; modes alternate order by repeat."""
    os.makedirs(args.out, exist_ok=True)
    modes = args.modes.split(",")
    unknown = set(modes) - set(LEND_MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)} (of {', '.join(LEND_MODES)})")
    common = ["--model", args.model, "--kv-mib", str(args.kv_mib), "--layout", args.layout, "--device", args.device,
              "--systems", str(args.systems), "--system-tokens", str(args.system_tokens),
              "--max-batch", str(args.max_batch), "--max-prefill-tokens", str(args.max_prefill_tokens),
              "--deadline", str(args.deadline), "--think", str(args.think)] + \
        (["--vocab", str(args.vocab)] if args.vocab else [])
    workloads = dict(
        A=["--seed", str(args.idle_seed), "--sessions", str(args.idle_sessions), "--turns", str(args.idle_turns),
           "--user", args.idle_user, "--answer", args.idle_answer, "--start-spread", str(args.idle_start_spread)],
        B=["--seed", str(args.seed), "--sessions", str(args.sessions), "--turns", str(args.turns),
           "--user", args.user, "--answer", args.answer, "--start-spread", str(args.start_spread)])
    # What each workload's contexts fill at most (every session's last turn at once, the system
    # prompts shared): the defaults make B's more than half the KV and less than all of it (static
    # halves squeeze B, the whole budget does not) and A's about half (its warm cache is worth lending).
    cfg = parse_model(args.model, vocab=args.vocab)
    a_work = make_workload(args, cfg.vocab, seed=args.idle_seed, sessions=args.idle_sessions, turns=args.idle_turns,
                           user=args.idle_user, answer=args.idle_answer, start_spread=args.idle_start_spread)
    fill = {role: W.peak_context_tokens(work) * cfg.kv_bytes_per_token() / 2**20
            for role, work in (("A", a_work), ("B", make_workload(args, cfg.vocab)))}
    b_share, a_share = fill["B"] / args.kv_mib, fill["A"] / args.kv_mib
    info = dict(device="?", sizes=(
        f"Sizes: every session's last turn at once (system prompts shared) fills {fill['B']:.0f} MiB of KV for B "
        f"({b_share:.2f} of the {args.kv_mib} MiB: {'more' if b_share > 0.5 else 'no more'} than a static half, "
        f"{'within' if b_share <= 1 else 'more than'} all of it) and {fill['A']:.0f} MiB for A ({a_share:.2f}: "
        f"what A's warm cache holds when nothing evicts it); {cfg.kv_bytes_per_token()} B of KV a token."))
    print(info["sizes"], flush=True)

    def one(mode, rep):
        budget = None if mode == "static" else f"vmmpp_lend_{os.getpid()}_{mode}_{rep}"
        if budget:
            vmmpp_kv.remove_process_budget(budget)
        cmds = [[sys.executable, os.path.abspath(__file__), "lend-worker", "--role", role, "--mode", mode,
                 "--budget", budget or "-"] + common + workloads[role] for role in ("A", "B")]
        a, b = start_workers(cmds)
        info["device"] = json.loads(a.ready.split(" ", 1)[1])["device"]
        try:
            phase1 = ask(a, "serve")  # A's first round: its cache warms up
            a_before = ask(a, "stats")
            # A now idles (blocked on its stdin) while B serves; the budget's committed memory
            # (both processes) is sampled here, B's own in B.
            samples, stop = [], threading.Event()

            def sample():
                while not stop.is_set():
                    samples.append((round(time.time(), 4), vmmpp_kv.process_budget_stats(budget)["committed"]))
                    stop.wait(0.05)
            sampler = threading.Thread(target=sample)
            if budget:
                sampler.start()
            phase2 = ask(b, "serve")
            stop.set()
            if budget:
                sampler.join()
            a_after = ask(a, "stats")  # A's first call since phase 1
            b.stdin.close()  # B exits: its memory goes back before A's second round
            b.wait(timeout=60)
            phase3 = ask(a, "serve") if args.phase3 else None
        finally:
            for p in (a, b):
                if p.poll() is None:
                    p.stdin.close()
                    try:
                        p.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        p.kill()
            if budget:
                vmmpp_kv.remove_process_budget(budget)
        b_series = phase2.pop("series")
        t0 = b_series[0][0] if b_series else (samples[0][0] if samples else 0.0)
        # A's committed memory during phase 2: the budget's less B's latest sample (elastic modes);
        # a static slice keeps what it committed.
        a_series, j = [], -1
        for t, all_bytes in samples:
            while j + 1 < len(b_series) and b_series[j + 1][0] <= t:
                j += 1
            a_series.append((round(t - t0, 3), all_bytes - (b_series[j][1] if j >= 0 else 0)))
        lent = a_after["lending"]
        row = dict(mode=mode, rep=rep, B=phase2,
                   A=dict(phase1={k: phase1[k] for k in phase1 if k != "series"},
                          phase3={k: phase3[k] for k in phase3 if k != "series"} if phase3 else None,
                          cached_mib_before=a_before["prefix"]["cached_bytes"] / 2**20,
                          cached_mib_after=a_after["prefix"]["cached_bytes"] / 2**20,
                          committed_mib_before=a_before["committed_bytes"] / 2**20,
                          committed_mib_after=a_after["committed_bytes"] / 2**20,
                          lends=lent["lends"], lent_blocks=lent["lent_blocks"], lent_mib=lent["lent_bytes"] / 2**20),
                   memory=dict(B=[(round(t - t0, 3), c) for t, c in b_series],
                               all=[(round(t - t0, 3), c) for t, c in samples], A=a_series))
        print(json.dumps({k: v for k, v in row.items() if k != "memory"}), flush=True)
        return row

    results = []
    for rep in range(args.repeats):
        for mode in (modes if rep % 2 == 0 else modes[::-1]):  # order alternates by repeat
            try:
                results.append(one(mode, rep))
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
                # Recorded, not fatal: the other runs still go (the worker's traceback is on stderr).
                print(mode, rep, "FAILED:", e, flush=True)
                results.append(dict(mode=mode, rep=rep, failed=str(e)))
            lend_report(args, info, modes, results, printed=False)
    lend_report(args, info, modes, results, printed=True)


def lend_report(args, info, modes, results, printed):
    """lend.json and lend.md of the runs so far (rewritten after each run, as prefix's); failed
    runs are listed, not summed."""
    failed = [r for r in results if "failed" in r]
    results = [r for r in results if "failed" not in r]
    b_keys = ("ttft_p50_s", "ttft_p99_s", "tokens_per_s", "preemptions", "evictions", "cached_token_rate",
              "committed_mean_mib", "committed_peak_mib", "completed", "wall_s")
    a_keys = ("cached_mib_before", "cached_mib_after", "lends", "lent_blocks", "lent_mib")
    summary = {}
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        s = {f"B_{k}": median([r["B"][k] for r in rows]) for k in b_keys}
        s.update({f"A_{k}": median([r["A"][k] for r in rows]) for k in a_keys})
        if all(r["A"]["phase3"] for r in rows):
            s["A_round2_cached_token_rate"] = median([r["A"]["phase3"]["cached_token_rate"] for r in rows])
            s["A_round2_ttft_p50_s"] = median([r["A"]["phase3"]["ttft_p50_s"] for r in rows])
        s["runs"] = len(rows)
        summary[mode] = s
    # B's answers by mode (complete runs): one value when neither the mode nor lending changed a
    # greedy token (bf16 may round differently where a prefill starts after another cached prefix).
    checksums = {}
    for r in results:
        if r["B"]["completed"] == r["B"]["turns"]:
            checksums.setdefault(r["mode"], set()).add(r["B"]["checksum"])
    checksums = {mode: sorted(values) for mode, values in checksums.items()}
    same_answers = len({c for cs in checksums.values() for c in cs}) == 1
    ratios = {}
    for base in ("static", "elastic"):
        if "elastic_lend" in summary and base in summary:
            e, b = summary["elastic_lend"], summary[base]
            ratios[f"elastic_lend/{base}"] = {k: e[f"B_{k}"] / b[f"B_{k}"] if b[f"B_{k}"] else float("nan")
                                              for k in ("ttft_p50_s", "ttft_p99_s", "tokens_per_s")}
    out = dict(model=args.model, config=vars(args), device=info["device"], sizes=info["sizes"], runs=results,
               failed_runs=failed, summary=summary,
               ratios=ratios, b_answer_checksums=checksums, b_same_answers_everywhere=same_answers)
    with open(os.path.join(args.out, "lend.json"), "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"# Lending an idle model's prefix cache to a busy one ({info['device']})", "",
             f"Model {args.model} (bf16) for both A (idle) and B (busy), other weights; {args.kv_mib} MiB of KV in all "
             f"(static: {args.kv_mib // 2} MiB each; elastic, elastic_lend: one process budget of {args.kv_mib} MiB, "
             f"each reaching all of it), layout {args.layout}, prefix caching on in both.",
             f"A's workload: seed {args.idle_seed}, {args.systems} system prompts of {args.system_tokens} tokens, "
             f"{args.idle_sessions} sessions x {args.idle_turns} turns (user {args.idle_user}, answers "
             f"{args.idle_answer}). B's: seed {args.seed}, the same system prompt sizes (other tokens), "
             f"{args.sessions} sessions x {args.turns} turns (user {args.user}, answers {args.answer}), "
             f"starting over {args.start_spread} s.", "", info["sizes"], "",
             f"A serves its workload, then idles (no call) while B serves; A's second round is its workload again. "
             f"Medians of {args.repeats} runs each, a fresh pair of processes per run, order alternating by repeat "
             f"({len(results)} runs done).", "",
             "| mode | B TTFT p50 (s) | B TTFT p99 (s) | B tokens/s | B preemptions | B evictions | B cached tokens "
             "| B committed mean / peak (MiB) | A cached before / after (MiB) | A lends | A lent (MiB) "
             "| A round 2 cached tokens | B turns done |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, s in summary.items():
        round2 = f"{100 * s['A_round2_cached_token_rate']:.1f} %" if "A_round2_cached_token_rate" in s else "-"
        lines.append(f"| {mode} | {s['B_ttft_p50_s']:.3f} | {s['B_ttft_p99_s']:.3f} | {s['B_tokens_per_s']:.1f} | "
                     f"{s['B_preemptions']:.0f} | {s['B_evictions']:.0f} | {100 * s['B_cached_token_rate']:.1f} % | "
                     f"{s['B_committed_mean_mib']:.0f} / {s['B_committed_peak_mib']:.0f} | "
                     f"{s['A_cached_mib_before']:.1f} / {s['A_cached_mib_after']:.1f} | {s['A_lends']:.0f} | "
                     f"{s['A_lent_mib']:.1f} | {round2} | {s['B_completed']:.0f} |")
    lines += ["", "Ratios of B's medians:", ""]
    for name, r in ratios.items():
        lines.append(f"- {name}: TTFT p50 x{r['ttft_p50_s']:.3f}, p99 x{r['ttft_p99_s']:.3f}, "
                     f"tokens/s x{r['tokens_per_s']:.3f}")
    lines += ["", "Every run (B: TTFT p50 / p99 s, tokens/s, preemptions; A: lent MiB, round 2 cached tokens):", ""]
    for r in results:
        b, a = r["B"], r["A"]
        round2 = f"{100 * a['phase3']['cached_token_rate']:.1f} %" if a["phase3"] else "-"
        lines.append(f"- rep {r['rep']} {r['mode']}: B {b['ttft_p50_s']:.3f} / {b['ttft_p99_s']:.3f}, "
                     f"{b['tokens_per_s']:.1f}, {b['preemptions']}; A {a['lent_mib']:.1f}, {round2}")
    lines += ["", "Cached tokens: context tokens of admitted turns taken from the prefix cache. A's committed memory "
              "during B's run (budget less B's) and B's are in lend.json (runs[].memory, seconds from B's first step).",
              "", f"B's answers the same in every complete run: {same_answers} (checksums by mode: {checksums})."]
    lines += [f"- FAILED: rep {r['rep']} {r['mode']}: {r['failed']}" for r in failed]
    with open(os.path.join(args.out, "lend.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if printed:
        print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    def add_tier(p, blocks=0):
        """The host tier's switches (throughput, prefix: off by default)."""
        p.add_argument("--host-tier-blocks", type=int, default=blocks,
                       help="a vmmpp_kv.HostTier of N blocks behind the prefix cache (0: none; prefix caching on)")
        p.add_argument("--preemption", choices=("recompute", "swap"), default="recompute",
                       help="swap: preempted requests swapped out to the host tier and back in (recompute where "
                            "it has no room)")

    t = sub.add_parser("throughput")
    t.add_argument("--model", default="8b:8")
    t.add_argument("--requests", type=int, default=192)
    t.add_argument("--batch", type=int, default=96)
    t.add_argument("--prompt", type=int, default=256)
    t.add_argument("--output", type=int, default=256)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--configs", default="static,elastic,elastic_pages")
    t.add_argument("--layout", default="block_major")
    t.add_argument("--prefix-cache", choices=("on", "off"), default="off")
    add_tier(t)
    t.add_argument("--out", required=True)
    r = sub.add_parser("replay")
    r.add_argument("--trace", required=True)
    r.add_argument("--window", type=float, default=240)
    r.add_argument("--speedup", type=float, default=4)
    r.add_argument("--max-output", type=int, default=512)
    r.add_argument("--drain", type=float, default=30)
    r.add_argument("--models", default="1b,8b")
    r.add_argument("--modes", default="static,elastic")
    r.add_argument("--total-mib", type=int, default=1024)
    r.add_argument("--layout", default="block_major")
    r.add_argument("--out", required=True)
    def add_workload(p, sessions=48, turns=4):
        """The shared-prefix workload's arguments (prefix's; lend's B; a lend worker's own)."""
        p.add_argument("--seed", type=int, default=29)
        p.add_argument("--systems", type=int, default=4)
        p.add_argument("--system-tokens", type=int, default=1024)
        p.add_argument("--sessions", type=int, default=sessions)
        p.add_argument("--turns", type=int, default=turns)
        p.add_argument("--user", default="32:128", help="user message tokens, low:high")
        p.add_argument("--answer", default="64:128", help="answer tokens, low:high")
        p.add_argument("--start-spread", type=float, default=2.0, help="sessions start uniformly over this many s")
        p.add_argument("--think", type=float, default=0.0, help="s between an answer and the next turn")

    def add_engine(p, kv_mib, deadline=60.0):
        """Model, KV size, engine and device arguments (prefix's, lend's, a lend worker's)."""
        p.add_argument("--model", default="8b:8")
        p.add_argument("--kv-mib", type=int, default=kv_mib)
        p.add_argument("--max-batch", type=int, default=64)
        p.add_argument("--max-prefill-tokens", type=int, default=8192)
        p.add_argument("--deadline", type=float, default=deadline, help="s a run may take before it is cut")
        p.add_argument("--layout", default="block_major")
        p.add_argument("--device", default="cuda", help="cpu: host memory (mode host), a bookkeeping check")
        p.add_argument("--vocab", type=int, default=None, help="cut the model's vocabulary (faster on a CPU)")

    x = sub.add_parser("prefix")
    add_engine(x, kv_mib=2048)
    add_workload(x)
    x.add_argument("--modes", default="static,elastic")
    x.add_argument("--prefix-caching", default="off,on", help="prefix caching settings to run, of off,on")
    x.add_argument("--repeats", type=int, default=2)
    x.add_argument("--max-cached-mib", type=int, default=None,
                   help="bound on cached blocks no sequence holds (default: none but the KV size)")
    add_tier(x)
    x.add_argument("--out", required=True)
    h = sub.add_parser("tier", help="a host tier behind the prefix cache (issue 30): off, tier, tier + swap")
    # 8B:8 has 32 KiB of KV a token: 1024 MiB hold 32k tokens; the default workload's contexts
    # fill about 42k (8 system prompts of 1024 tokens, 48 sessions x 4 turns), so not every
    # session's prefix fits, and the 2 GiB tier (4096 blocks) holds all of them.
    add_engine(h, kv_mib=1024, deadline=120.0)
    add_workload(h)
    h.set_defaults(systems=8)
    h.add_argument("--mode", default="elastic", help="the cache configuration (--device cpu: host)")
    h.add_argument("--host-tier-blocks", type=int, default=4096, help="the tier's blocks (page-locked host memory)")
    h.add_argument("--variants", default=",".join(TIER_VARIANTS), help="of " + ",".join(TIER_VARIANTS))
    h.add_argument("--repeats", type=int, default=2)
    h.add_argument("--out", required=True)
    n = sub.add_parser("lend", help="an idle model's warm prefix cache lent to a busy one on one KV budget")
    # --kv-mib: the total (static halves, elastic's one budget); B's workload: --seed ... --think
    # (prefix's, 3 turns), A's: --idle-*. The defaults are sized in lend() (sizes in lend.md).
    add_engine(n, kv_mib=1280, deadline=90.0)
    add_workload(n, sessions=48, turns=3)
    n.add_argument("--idle-seed", type=int, default=31, help="A's workload seed (other system prompts than B's)")
    n.add_argument("--idle-sessions", type=int, default=24, help="A's sessions (--sessions: B's)")
    n.add_argument("--idle-turns", type=int, default=2, help="A's turns a session")
    n.add_argument("--idle-user", default="192:384", help="A's user message tokens, low:high")
    n.add_argument("--idle-answer", default="16:32", help="A's answer tokens, low:high")
    n.add_argument("--idle-start-spread", type=float, default=0.5, help="A's sessions start over this many s")
    n.add_argument("--modes", default=",".join(LEND_MODES), help="of " + ",".join(LEND_MODES))
    n.add_argument("--repeats", type=int, default=3)
    n.add_argument("--no-phase3", dest="phase3", action="store_false", help="skip A's second round")
    n.add_argument("--out", required=True)
    nw = sub.add_parser("lend-worker")
    add_engine(nw, kv_mib=1280)
    add_workload(nw)
    nw.add_argument("--role", choices=("A", "B"), required=True)
    nw.add_argument("--mode", choices=LEND_MODES, required=True)
    nw.add_argument("--budget", required=True)
    w = sub.add_parser("worker")
    for name in ("--index", "--models", "--total-mib"):
        w.add_argument(name, type=int, required=True)
    for name in ("--model", "--mode", "--budget", "--trace", "--layout", "--result"):
        w.add_argument(name, required=True)
    w.add_argument("--deadline", type=float, required=True)
    args = parser.parse_args()
    {"throughput": throughput, "replay": replay, "prefix": prefix, "tier": tier, "worker": worker, "lend": lend,
     "lend-worker": lend_worker}[args.command](args)


if __name__ == "__main__":
    main()
