#!/usr/bin/env python3
"""bench/decode_read_summary.py: a markdown summary of bench_decode_read's JSON.

Usage: bench/decode_read_summary.py <bench_decode_read --benchmark_out JSON>

Prints, for every benchmark, the median over its repetitions of GBps (bytes of K and V read per
second of kernel time), the spread (min-max of the repetitions), the ratio against the baseline
of the same launch mode measured in the same run (the label "baseline=<name>"), and the distinct
2 MiB pages one layer's reads touch; then the configuration x layout grid of the kv_cache rows.
Standard library only.
"""

import json
import statistics
import sys

SUFFIXES = ("manual_time", "real_time", "process_time")


def base_name(run_name):
    """'kv/x/block_major/engine/per_layer/iterations:20/repeats:3/manual_time' -> 'kv/x/block_major/engine/per_layer'."""
    return "/".join(p for p in run_name.split("/") if p not in SUFFIXES and ":" not in p)


def load(path):
    with open(path) as f:
        data = json.load(f)
    order, runs = [], {}
    for e in data.get("benchmarks", []):
        if e.get("run_type", "iteration") != "iteration":
            continue
        name = base_name(e.get("run_name", e["name"]))
        if name not in runs:
            order.append(name)
            runs[name] = {"gbps": [], "label": e.get("label", ""), "error": None, "entry": e}
        r = runs[name]
        if e.get("error_occurred"):
            r["error"] = e.get("error_message", "error")
        elif "GBps" in e:
            r["gbps"].append(e["GBps"])
        elif "ctas_checked" in e:
            r["checked"] = e["ctas_checked"]
    return data.get("context", {}), order, runs


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    return "–" if x is None else f"{x:.{digits}f}"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    context, order, runs = load(sys.argv[1])
    print("# bench_decode_read")
    print()
    print(f"GPU: {context.get('vmmpp_gpu', '?')}, driver {context.get('vmmpp_cuda_driver', '?')}, "
          f"runtime {context.get('vmmpp_cuda_runtime', '?')}; {context.get('decode_read_trace_blocks', '?')} live "
          f"blocks (2 MiB each, all layers), cache capacity {context.get('decode_read_max_blocks', '?')} blocks.")
    print()
    checks = [n for n in order if n.startswith("check/")]
    if checks:
        print("Checks (small caches, random bytes through kv_cache::address): " +
              ", ".join(f"{n[len('check/small/'):]} {'FAILED: ' + runs[n]['error'] if runs[n]['error'] else 'ok'}"
                        for n in checks))
        print()
    print("| benchmark | GB/s (median) | min-max | ratio vs baseline | 2 MiB pages per layer | block stride | base align (log2) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    med = {n: median(runs[n]["gbps"]) for n in order}
    ratio = {}
    for n in order:
        if n.startswith("check/"):
            continue
        r = runs[n]
        if r["error"]:
            print(f"| {n} | ERROR: {r['error']} | | | | | |")
            continue
        base = r["label"][len("baseline="):] if r["label"].startswith("baseline=") else None
        ratio[n] = med[n] / med[base] if base and med.get(base) else (1.0 if not base else None)
        e = r["entry"]
        spread = f"{min(r['gbps']):.0f}-{max(r['gbps']):.0f}" if r["gbps"] else "–"
        print(f"| {n} | {fmt(med[n])} | {spread} | {fmt(ratio[n], 3)} | {fmt(e.get('pages_per_layer'))} | "
              f"{int(e.get('block_stride', 0))} | {int(e.get('base_align_log2', 0))} |")
    print()
    print("## kv_cache: configuration x layout (ratio vs baseline, GB/s in brackets)")
    print()
    configs = ["static_config", "elastic_config", "elastic_page_config"]
    variants = ["engine/per_layer", "sorted/per_layer", "engine/all_layers"]
    print("| config | tables/mode | block_major | layer_major | block_major / layer_major |")
    print("| --- | --- | ---: | ---: | ---: |")
    for c in configs:
        for v in variants:
            bm, lm = f"kv/{c}/block_major/{v}", f"kv/{c}/layer_major/{v}"
            cell = lambda n: f"{fmt(ratio.get(n), 3)} ({fmt(med.get(n))})" if n in ratio else "–"
            rel = med[bm] / med[lm] if med.get(bm) and med.get(lm) else None
            print(f"| {c} | {v} | {cell(bm)} | {cell(lm)} | {fmt(rel, 3)} |")


if __name__ == "__main__":
    main()
