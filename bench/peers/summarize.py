#!/usr/bin/env python3
"""Prints issue 16's peer table (markdown) from the JSON files of one run of bench/peers/run:
peers_vmmpp.json (Google Benchmark's --benchmark_out) and peer_*.json (peers_torch.py).

Rows: every allocator measured; columns: grow, paced and steady-mix p50 / p99 (us), burst GB/s,
freed memory back without a call (%), idle footprint, churn held/live mean / worst (on the GPU,
and over the host backing), and grow / paced / steady p50 as a multiple of the cudaMallocAsync
pool's and the raw driver's (2 MiB handles) in the same run. A second table gives kernel
bandwidth and the engine stream's slowdown; a third checks the issue's targets for the README's
first configuration (elastic_config) in kv_cache's default layout.

Usage: summarize.py DIR [-o summary.md]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

SCENARIOS = ("grow", "paced", "steady", "burst", "memory", "churn", "churn_host", "bandwidth", "engine")
FLOOR_ASYNC = "cudaMallocAsync_pool"
FLOOR_RAW = "raw_driver_2MiB"
TARGET_CONFIG = "elastic_config"
DASH = "–"


def load(folder: str):
    """(context, {scenario: {subject: record}}) merged from every JSON file in `folder`."""
    context: dict = {}
    results: dict = {s: {} for s in SCENARIOS}
    files = sorted(glob.glob(os.path.join(folder, "*.json")))
    for path in files:
        with open(path) as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            # a run cut short by its timeout: Google Benchmark writes each result as it goes
            data, end = None, len(text)
            for _ in range(200):  # cut after the last complete record
                end = text.rfind("}", 0, end)
                if end < 0:
                    break
                try:
                    data = json.loads(text[:end + 1] + "\n]\n}")
                    break
                except json.JSONDecodeError:
                    pass
            if data is None:
                print(f"summarize: {path} is not JSON, left out", file=sys.stderr)
                continue
            context["truncated"] = context.get("truncated", "") + os.path.basename(path) + " "
        ctx = data.get("context", {})
        for k, v in ctx.items():
            context.setdefault(k, v)
        for b in data.get("benchmarks", []):
            if b.get("run_type", "iteration") != "iteration":
                continue
            name = b.get("run_name", b.get("name", ""))
            # Google Benchmark appends /iterations:1/real_time; the subject may itself hold '/'
            parts = [p for p in name.split("/") if not p.startswith(("iterations:", "real_time"))]
            if len(parts) < 2 or parts[0] not in SCENARIOS:
                continue
            results[parts[0]]["/".join(parts[1:])] = b
    return context, results, files


def num(rec: dict | None, key: str):
    if rec is None or rec.get("error_occurred") or key not in rec:
        return None
    v = rec[key]
    return float(v) if isinstance(v, (int, float)) else None


def fmt_us(v) -> str:
    if v is None:
        return DASH
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def pair(rec, a="p50_us", b="p99_us") -> str:
    x, y = num(rec, a), num(rec, b)
    return DASH if x is None and y is None else f"{fmt_us(x)} / {fmt_us(y)}"


def fmt_bytes(v) -> str:
    if v is None:
        return DASH
    if v >= 1 << 30:
        return f"{v / (1 << 30):.2f} GiB"
    return f"{v / (1 << 20):.0f} MiB"


def fmt(v, spec: str) -> str:
    return DASH if v is None else format(v, spec)


def ratio(v, base) -> str:
    return DASH if v is None or base is None or base == 0 else f"{v / base:.2f}x"


def subjects(results) -> list[str]:
    """Every subject, floors first, then the Python peers, then vmmpp's configurations."""
    seen: list[str] = []
    for s in SCENARIOS:
        for subj in results[s]:
            if subj not in seen:
                seen.append(subj)

    def key(s: str):
        if s.startswith("raw_driver") or s == FLOOR_ASYNC:
            return (0, s)
        if "/" not in s:
            return (1, s)
        return (2, s)

    return sorted(seen, key=key)


def error_of(results, subj: str) -> str | None:
    for s in SCENARIOS:
        rec = results[s].get(subj)
        if rec and rec.get("error_occurred") and rec.get("error_message") != "no CUDA device" \
                and not str(rec.get("error_message", "")).startswith("not elastic"):
            return f"{s}: {rec.get('error_message')}"
    return None


def label(subj: str, context: dict) -> str:
    if "/" in subj:
        cfg, layout = subj.rsplit("/", 1)
        default = context.get(f"peers_default_layout/{cfg}") == layout
        return f"`{cfg}`, {layout}{' (default)' if default else ''}"
    return subj


def summarize(folder: str) -> str:
    context, results, files = load(folder)
    if not files:
        raise SystemExit(f"summarize: no JSON files in {folder}")
    lines = ["# Peer benchmark (issue 16)", ""]
    lines.append(f"Device: {context.get('vmmpp_gpu', context.get('gpu', 'unknown'))}; "
                 f"CUDA driver {context.get('vmmpp_cuda_driver', '?')}, runtime {context.get('vmmpp_cuda_runtime', '?')}; "
                 f"torch {context.get('torch', DASH)}; date {context.get('date', time.strftime('%Y-%m-%d'))}; "
                 f"scale {context.get('peers_scale', '1')} (1 = the issue's sizes: 8 GiB grow, 16 GiB burst).")
    lines.append(f"Files: {', '.join(os.path.basename(f) for f in files)}.")
    if context.get("truncated"):
        lines.append(f"Cut short (timeout): {context['truncated'].strip()}; its later rows are missing.")
    lines.append("")
    lines.append("Latency of the call that takes a block, p50 / p99 in microseconds; burst in GB/s; memory: "
                 "percent of freed memory given back with no call after release_delay + 100 ms (PyTorch, "
                 "kvcached: 300 ms), and what stays held then (idle); churn: held / live bytes, mean / worst. "
                 "Ratios: p50 over the cudaMallocAsync pool's (async) and the raw driver's (raw) in this run.")
    lines.append("")
    head = ["allocator", "grow", "paced 20 GB/s", "steady mix", "burst GB/s", "memory back", "idle",
            "churn (GPU)", "churn (host)", "grow p50 vs async / raw", "paced p50 vs async / raw",
            "steady p50 vs async / raw"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + " --- |" * len(head))
    fa = {s: num(results[s].get(FLOOR_ASYNC), "p50_us") for s in ("grow", "paced", "steady")}
    fr = {s: num(results[s].get(FLOOR_RAW), "p50_us") for s in ("grow", "paced", "steady")}
    errors = []
    for subj in subjects(results):
        r = {s: results[s].get(subj) for s in SCENARIOS}
        row = [label(subj, context), pair(r["grow"]), pair(r["paced"]), pair(r["steady"]),
               fmt(num(r["burst"], "burst_GBps"), ".0f"),
               DASH if num(r["memory"], "back_pct") is None else f"{num(r['memory'], 'back_pct'):.1f} %",
               fmt_bytes(num(r["memory"], "idle_bytes")),
               pair(r["churn"], "churn_mean", "churn_worst").replace(" / ", " / ") if num(r["churn"], "churn_mean") is not None else DASH,
               DASH if num(r["churn_host"], "churn_mean") is None else
               f"{num(r['churn_host'], 'churn_mean'):.3f} / {num(r['churn_host'], 'churn_worst'):.3f}"]
        if num(r["churn"], "churn_mean") is not None:
            row[7] = f"{num(r['churn'], 'churn_mean'):.3f} / {num(r['churn'], 'churn_worst'):.3f}"
        for s in ("grow", "paced", "steady"):
            v = num(r[s], "p50_us")
            row.append(f"{ratio(v, fa[s])} / {ratio(v, fr[s])}" if v is not None else DASH)
        lines.append("| " + " | ".join(row) + " |")
        err = error_of(results, subj)
        if err:
            errors.append(f"- {subj}: {err}")
    lines.append("")
    if errors:
        lines += ["Failed:", ""] + errors + [""]

    gpu_rows = [s for s in subjects(results) if results["bandwidth"].get(s) or results["engine"].get(s)]
    if any(num(results["bandwidth"].get(s), "bw_ratio") is not None or num(results["engine"].get(s), "engine_idle_us")
           is not None for s in gpu_rows):
        lines += ["Kernel bandwidth on the cache's memory (cudaMemcpyAsync D2D over its committed ranges, read + "
                  "written) against the same copies on cudaMalloc memory; GPU time of an engine's 64 small "
                  "copies while another thread grows the cache at 20 GB/s, against idle.", ""]
        lines.append("| allocator | copy GB/s | cudaMalloc GB/s | ratio | engine idle us | engine busy us | slowdown |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for subj in gpu_rows:
            b, e = results["bandwidth"].get(subj), results["engine"].get(subj)
            lines.append(f"| {label(subj, context)} | {fmt(num(b, 'pool_GBps'), '.0f')} | "
                         f"{fmt(num(b, 'cudaMalloc_GBps'), '.0f')} | {fmt(num(b, 'bw_ratio'), '.3f')} | "
                         f"{fmt(num(e, 'engine_idle_us'), '.0f')} | {fmt(num(e, 'engine_busy_us'), '.0f')} | "
                         f"{fmt(num(e, 'engine_slowdown_pct'), '+.1f')}{'' if num(e, 'engine_slowdown_pct') is None else ' %'} |")
        lines.append("")

    lines += targets(context, results)
    return "\n".join(lines) + "\n"


def targets(context: dict, results) -> list[str]:
    """The issue's targets for elastic_config in kv_cache's default layout."""
    layout = context.get(f"peers_default_layout/{TARGET_CONFIG}")
    if layout is None:
        return []
    subj = f"{TARGET_CONFIG}/{layout}"
    r = {s: results[s].get(subj) for s in SCENARIOS}
    MiB = 1 << 20
    checks = [
        ("grow p50 <= 0.5 us", num(r["grow"], "p50_us"), lambda v: v <= 0.5),
        ("grow p99 <= 30 us", num(r["grow"], "p99_us"), lambda v: v <= 30),
        ("paced 20 GB/s p99 <= 10 us", num(r["paced"], "p99_us"), lambda v: v <= 10),
        ("steady mix p50 <= 0.3 us", num(r["steady"], "p50_us"), lambda v: v <= 0.3),
        ("burst >= 500 GB/s", num(r["burst"], "burst_GBps"), lambda v: v >= 500),
        (">= 99 % of freed memory back, no call", num(r["memory"], "back_pct"), lambda v: v >= 99),
        ("idle footprint <= 64 MiB", num(r["memory"], "idle_bytes"), lambda v: v <= 64 * MiB),
        ("churn mean <= 1.05 (GPU)", num(r["churn"], "churn_mean"), lambda v: v <= 1.05),
        ("churn worst <= 1.2 (GPU)", num(r["churn"], "churn_worst"), lambda v: v <= 1.2),
        ("churn mean <= 1.05 (host)", num(r["churn_host"], "churn_mean"), lambda v: v <= 1.05),
        ("churn worst <= 1.2 (host)", num(r["churn_host"], "churn_worst"), lambda v: v <= 1.2),
        ("kernel bandwidth >= 0.99 of cudaMalloc", num(r["bandwidth"], "bw_ratio"), lambda v: v >= 0.99),
        ("engine stream slowed <= 2 % at 20 GB/s", num(r["engine"], "engine_slowdown_pct"), lambda v: v <= 2),
    ]
    out = [f"Targets (issue 16) for `{TARGET_CONFIG}`, {layout} (kv_cache's default layout):", "",
           "| target | measured | met |", "| --- | --- | --- |"]
    for what, v, ok in checks:
        shown = DASH if v is None else (fmt_bytes(v) if "footprint" in what else f"{v:.3g}")
        out.append(f"| {what} | {shown} | {DASH if v is None else ('yes' if ok(v) else 'NO')} |")
    out.append("")
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args(argv)
    text = summarize(args.folder)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
