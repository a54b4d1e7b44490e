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

  --prefix-cache on|off (throughput, prefix's --prefix-caching lists both): the engine's prefix
      caching (a vmmpp_kv.PrefixCache over the cache: cached leading blocks attached at admission,
      full blocks published as they are written, evicted before the engine preempts). Default off.

    VMMPP_KV_LIB=.../libvmmpp_kv_capi.so python3 examples/serving/bench_serving.py throughput --out DIR
    VMMPP_KV_LIB=... python3 examples/serving/bench_serving.py replay --trace bench/traces/bursty-n2-seed1.csv \\
        --window 240 --speedup 4 --total-mib 1024 --out DIR
    VMMPP_KV_LIB=... python3 examples/serving/bench_serving.py prefix --out DIR
"""
import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "capi", "python")]

import torch  # noqa: E402

import engine as E  # noqa: E402
import model as M  # noqa: E402
import vmmpp_kv  # noqa: E402
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


def paged_kv(cache, device, prefix_cache, max_cached_bytes=None):
    """The engine's store over `cache`, with prefix caching if prefix_cache is "on" (cached blocks
    no sequence holds bounded by max_cached_bytes; None: only by the cache's size)."""
    if prefix_cache != "on":
        return E.PagedKV(cache, device)
    return E.PagedKV(cache, device, prefix_cache=vmmpp_kv.PrefixCache(cache, max_cached_bytes=max_cached_bytes))


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
        kv = paged_kv(cache, device, args.prefix_cache)
        engine = E.Engine(model, kv, max_batch=args.batch, max_prefill_tokens=args.batch * args.prompt)
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
    block_bytes = cfg.kv_bytes_per_token() * BLOCK_TOKENS
    total = args.total_mib << 20
    if args.mode == "static":
        cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bf16",
                                 config="static", layout=args.layout, device=0,
                                 max_blocks=(total // args.models) // block_bytes)
    else:
        cache = vmmpp_kv.ProcessBudgetCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                                            dtype="bf16", config=args.mode, layout=args.layout, device=0,
                                            max_blocks=total // block_bytes, budget_name=args.budget,
                                            model=f"m{args.index}", model_limit_bytes=total,
                                            global_limit_bytes=total)
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
            procs.append((subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True), result))
        for p, _ in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"worker did not start: {line!r}")
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


def prefix(args):
    """Modes x prefix caching {off, on} on one seeded shared-prefix multi-turn workload, repeated.
    --device cpu (mode host, a small model) checks the bookkeeping on a machine without a GPU."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    device_name = torch.cuda.get_device_name(0) if on_gpu else "cpu"

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()

    cfg = parse_model(args.model, vocab=args.vocab)
    model = M.Llama(cfg, device, seed=7)
    block_bytes = cfg.kv_bytes_per_token() * BLOCK_TOKENS
    max_blocks = (args.kv_mib << 20) // block_bytes  # static's fixed size, elastic's reach

    def workload(sessions, start_spread_s):
        return W.shared_prefix_workload(args.seed, cfg.vocab, systems=args.systems, system_tokens=args.system_tokens,
                                        sessions=sessions, turns=args.turns, user_tokens=parse_range(args.user),
                                        answer_tokens=parse_range(args.answer), start_spread_s=start_spread_s,
                                        think_s=args.think)

    def one(mode, prefix_cache, rep, sessions, start_spread_s):
        cache = vmmpp_kv.KVCache(layers=cfg.layers, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype="bf16",
                                 config=mode, layout=args.layout, device=0, max_blocks=max_blocks)
        kv = paged_kv(cache, device, prefix_cache,
                      None if args.max_cached_mib is None else args.max_cached_mib << 20)
        engine = E.Engine(model, kv, max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens)
        work = workload(sessions, start_spread_s)
        driver = W.SessionDriver(work, engine, E.Request, clock=time.perf_counter)
        committed = []
        synchronize()
        start = driver.run(deadline_s=args.deadline, on_step=lambda now: committed.append(kv.committed_bytes()))
        synchronize()
        requests = driver.requests
        done = [r for r in requests if r.finished_at is not None]
        last = max((r.finished_at for r in done), default=start)
        output_tokens = sum(len(r.output) for r in done)
        stats = kv.prefix_cache.stats() if kv.prefix_cache is not None else {}
        blocks_asked = stats.get("hits", 0) + stats.get("misses", 0)
        row = dict(mode=mode, prefix_cache=prefix_cache, rep=rep, turns=work.turns(), submitted=len(requests),
                   completed=len(done), rejected=len(engine.rejected),
                   ttft_p50_s=percentile([r.first_token_at - r.arrival for r in done], 50),
                   ttft_p99_s=percentile([r.first_token_at - r.arrival for r in done], 99),
                   wall_s=last - start, output_tokens=output_tokens,
                   tokens_per_s=output_tokens / (last - start) if last > start else 0.0,
                   prompt_tokens=engine.admitted_tokens, prompt_tokens_computed=engine.prefill_tokens,
                   cached_token_rate=engine.cached_tokens / engine.admitted_tokens if engine.admitted_tokens else 0.0,
                   block_hit_rate=stats["hits"] / blocks_asked if blocks_asked else 0.0,
                   prefix_hits=stats.get("hits", 0), prefix_misses=stats.get("misses", 0),
                   evictions=stats.get("evictions", 0), cached_mib_at_end=stats.get("cached_bytes", 0) / 2**20,
                   preemptions=engine.preemptions, steps=engine.steps,
                   committed_mean_mib=(sum(committed) / len(committed) / 2**20) if committed else 0.0,
                   committed_peak_mib=max(committed, default=0) / 2**20,
                   checksum=sum(sum(a) for s in work.sessions for a in s.answers))
        print(json.dumps(row), flush=True)
        del driver, engine, kv
        synchronize()
        cache.synchronize()
        return row

    modes = args.modes.split(",")
    settings = args.prefix_caching.split(",")
    combos = [(m, p) for m in modes for p in settings]
    for mode in modes:  # warm-up of each mode (kernels, allocator, cuBLAS, the backing's first commits)
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


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
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
    x = sub.add_parser("prefix")
    x.add_argument("--model", default="8b:8")
    x.add_argument("--modes", default="static,elastic")
    x.add_argument("--prefix-caching", default="off,on", help="prefix caching settings to run, of off,on")
    x.add_argument("--repeats", type=int, default=2)
    x.add_argument("--kv-mib", type=int, default=2048, help="KV size: static's fixed size, elastic's reach")
    x.add_argument("--max-cached-mib", type=int, default=None,
                   help="bound on cached blocks no sequence holds (default: none but the KV size)")
    x.add_argument("--seed", type=int, default=29)
    x.add_argument("--systems", type=int, default=4)
    x.add_argument("--system-tokens", type=int, default=1024)
    x.add_argument("--sessions", type=int, default=48)
    x.add_argument("--turns", type=int, default=4)
    x.add_argument("--user", default="32:128", help="user message tokens, low:high")
    x.add_argument("--answer", default="64:128", help="answer tokens, low:high")
    x.add_argument("--start-spread", type=float, default=2.0, help="sessions start uniformly over this many s")
    x.add_argument("--think", type=float, default=0.0, help="s between an answer and the next turn")
    x.add_argument("--max-batch", type=int, default=64)
    x.add_argument("--max-prefill-tokens", type=int, default=8192)
    x.add_argument("--deadline", type=float, default=60.0, help="s a run may take before it is cut")
    x.add_argument("--layout", default="block_major")
    x.add_argument("--device", default="cuda", help="cpu: host memory (mode host), a bookkeeping check")
    x.add_argument("--vocab", type=int, default=None, help="cut the model's vocabulary (faster on a CPU)")
    x.add_argument("--out", required=True)
    w = sub.add_parser("worker")
    for name in ("--index", "--models", "--total-mib"):
        w.add_argument(name, type=int, required=True)
    for name in ("--model", "--mode", "--budget", "--trace", "--layout", "--result"):
        w.add_argument(name, required=True)
    w.add_argument("--deadline", type=float, required=True)
    args = parser.parse_args()
    {"throughput": throughput, "replay": replay, "prefix": prefix, "worker": worker}[args.command](args)


if __name__ == "__main__":
    main()
