#!/usr/bin/env python3
"""Summarises a bench_prefix_cost(_gpu) JSON as a markdown table: per op/config/layout/max_blocks,
ns per block (host side), ns per free, the ratios to the take and to an append on committed
pages, and the baselines. Usage: prefix_cost_summary.py RESULT.json"""
import json
import sys


def fmt(x, digits=3):
    if x is None:
        return ""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def main():
    data = json.load(open(sys.argv[1]))
    ctx = data.get("context", {})
    print(f"host {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, {ctx.get('date', '?')}")
    print()
    print("| benchmark | max_blocks | ns/block | ns/free | vs take | vs committed | take ns | committed ns | other |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for b in data["benchmarks"]:
        if b.get("error_occurred"):
            print(f"| {b['name']} | | | | | | | | ERROR {b.get('error_message', '')} |")
            continue
        name = b["name"].split("/iterations")[0]
        parts = name.split("/")
        mb = parts[-1]
        op = "/".join(parts[:-1])
        other = []
        for k in ("fresh_fraction", "take_vs_committed", "moved", "moved_per_call", "ns_per_call", "sync_ns_per_block"):
            if k in b:
                other.append(f"{k}={fmt(b[k])}")
        print(f"| {op} | {mb} | {fmt(b.get('ns_per_block'))} | {fmt(b.get('ns_per_free'))} | "
              f"{fmt(b.get('vs_take'))} | {fmt(b.get('vs_committed'))} | {fmt(b.get('take_ns'))} | "
              f"{fmt(b.get('committed_ns'))} | {' '.join(other)} |")


if __name__ == "__main__":
    main()
