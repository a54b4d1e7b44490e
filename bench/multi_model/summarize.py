#!/usr/bin/env python3
"""bench/multi_model/summarize.py: summary.md and charts for one directory of bench_multi_model results.

Usage: bench/multi_model/summarize.py <results-dir>

Reads every <scenario>-n<N>.json that bench_multi_model wrote there (and the .md table it wrote next
to each, and env.txt), and writes <results-dir>/summary.md: one overview row per scenario and model
count (elastic against static, with ratios), then each run's per-model table. If matplotlib can be
imported it also draws ttft_cdf.png (TTFT CDF per scenario and N: static, elastic and the
unconstrained reference) and memory.png (committed memory over simulated time); otherwise run this
script again on the directory where it can. Only the standard library is needed for summary.md.

Ratios are elastic / static: below 1 favours elastic for TTFT and memory, above 1 for throughput.
"""

import json
import sys
from pathlib import Path

SCENARIO_ORDER = ("balanced", "bursty", "dominant")
MODE_STYLE = {  # mode -> (colour, line style, label)
    "static": ("tab:red", "--", "static slices"),
    "elastic": ("tab:blue", "-", "elastic (shared budget)"),
    "unconstrained": ("tab:gray", ":", "unconstrained memory"),
}
GIB = float(1 << 30)


def load(directory):
    """[(json dict, path)] sorted by scenario then N."""
    runs = []
    for path in directory.glob("*.json"):
        data = json.loads(path.read_text())
        if "runs" in data and "scenario" in data:
            runs.append((data, path))

    def order(item):
        scenario = item[0]["scenario"]
        return (SCENARIO_ORDER.index(scenario) if scenario in SCENARIO_ORDER else len(SCENARIO_ORDER), scenario,
                item[0]["n_models"])

    return sorted(runs, key=order)


def fmt_ms(x):
    if x is None:
        return "–"
    if x >= 10000:
        return f"{x / 1000:,.1f} s"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}x"


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def overall(data, mode):
    run = data["runs"].get(mode)
    return run["overall"] if run else None


def overview(runs):
    out = [
        "## Overview (all models together)",
        "",
        "TTFT in ms (s where marked); memory is the sum of the models' committed pools, time-weighted "
        "mean; ratio = elastic / static. *waited* = requests that found memory short at least once.",
        "",
        "| scenario | N | budget GiB | working set GiB | TTFT p50 static | elastic | ratio | TTFT p99 static "
        "| elastic | ratio | unconstrained p99 | tokens/s ratio | mean GiB static | elastic | ratio "
        "| waited static | elastic | preempted static | elastic |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: |",
    ]
    for data, _ in runs:
        s, e, u = (overall(data, m) for m in ("static", "elastic", "unconstrained"))
        if s is None or e is None:
            continue
        out.append(
            f"| {data['scenario']} | {data['n_models']} | {data['total_bytes'] / GIB:.2f} "
            f"| {data['working_set_bytes'] / GIB:.2f} "
            f"| {fmt_ms(s['ttft_ms_p50'])} | {fmt_ms(e['ttft_ms_p50'])} | {fmt_ratio(ratio(e['ttft_ms_p50'], s['ttft_ms_p50']))} "
            f"| {fmt_ms(s['ttft_ms_p99'])} | {fmt_ms(e['ttft_ms_p99'])} | {fmt_ratio(ratio(e['ttft_ms_p99'], s['ttft_ms_p99']))} "
            f"| {fmt_ms(u['ttft_ms_p99']) if u else '–'} "
            f"| {fmt_ratio(ratio(e['throughput_tokens_per_s'], s['throughput_tokens_per_s']))} "
            f"| {s['mean_committed_bytes'] / GIB:.2f} | {e['mean_committed_bytes'] / GIB:.2f} "
            f"| {fmt_ratio(ratio(e['mean_committed_bytes'], s['mean_committed_bytes']))} "
            f"| {s['requests_waited_for_memory']} | {e['requests_waited_for_memory']} "
            f"| {s['preemptions']} | {e['preemptions']} |"
        )
    out.append("")
    return out


def grid(plt, runs):
    """A figure with one axis per (scenario, N): rows scenarios, columns model counts."""
    scenarios = list(dict.fromkeys(d["scenario"] for d, _ in runs))
    counts = sorted({d["n_models"] for d, _ in runs})
    fig, axes = plt.subplots(len(scenarios), len(counts), figsize=(4.2 * len(counts), 3.2 * len(scenarios)),
                             squeeze=False)
    cells = {}
    for data, _ in runs:
        cells[(data["scenario"], data["n_models"])] = axes[scenarios.index(data["scenario"])][counts.index(data["n_models"])]
    for (scenario, n), ax in cells.items():
        ax.set_title(f"{scenario}, {n} models", fontsize=10)
    for row in axes:
        for ax in row:
            if ax not in cells.values():
                ax.set_visible(False)
    return fig, cells


def backing_label(runs):
    data = runs[0][0]
    memory = "CPU memory: mmap + mprotect/madvise" if data["backing"] == "host" else "GPU memory: CUDA VMM / cudaMalloc"
    return f"{data['backing']} backing ({memory}), {data['layout']}, static split {data['static_split']}"


def draw_charts(directory, runs):
    """ttft_cdf.png and memory.png; returns the files drawn, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    fig, cells = grid(plt, runs)
    for data, _ in runs:
        ax = cells[(data["scenario"], data["n_models"])]
        for mode in ("unconstrained", "static", "elastic"):
            run = data["runs"].get(mode)
            if not run or not run["ttft_ms_sorted"]:
                continue
            xs = [max(x, 1e-3) for x in run["ttft_ms_sorted"]]
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            colour, style, label = MODE_STYLE[mode]
            ax.step(xs, ys, where="post", color=colour, linestyle=style, label=label, linewidth=1.4)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("TTFT (ms, log)", fontsize=8)
        ax.set_ylabel("fraction of requests", fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=8)
    next(iter(cells.values())).legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Time to first token, static slices vs one shared budget\n{backing_label(runs)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(directory / "ttft_cdf.png", dpi=110)
    plt.close(fig)

    fig, cells = grid(plt, runs)
    for data, _ in runs:
        ax = cells[(data["scenario"], data["n_models"])]
        ax.axhline(data["total_bytes"] / GIB, color="black", linewidth=2.5, alpha=0.25, label="budget")
        for mode in ("unconstrained", "static", "elastic"):
            run = data["runs"].get(mode)
            if not run:
                continue
            timeline = run["committed_timeline"]
            colour, style, label = MODE_STYLE[mode]
            ax.step(timeline["t_s"], [b / GIB for b in timeline["bytes"]], where="post", color=colour, linestyle=style,
                    label=label, linewidth=1.0)
        ax.set_xlabel("simulated time (s)", fontsize=8)
        ax.set_ylabel("committed GiB (max per bucket)", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    next(iter(cells.values())).legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Committed memory, all models together\n{backing_label(runs)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(directory / "memory.png", dpi=110)
    plt.close(fig)
    return ["ttft_cdf.png", "memory.png"]


def main(argv):
    if len(argv) != 2 or not Path(argv[1]).is_dir():
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    directory = Path(argv[1])
    runs = load(directory)
    if not runs:
        print(f"summarize.py: no bench_multi_model JSON in {directory}", file=sys.stderr)
        return 1
    lines = [f"# vmmpp multi-model serving: {directory.name}", "", backing_label(runs) + ".", ""]
    if runs[0][0]["backing"] == "host":
        lines += [
            "Host-backed simulation: the memory operations are real kv_cache calls on CPU memory (mmap, "
            "mprotect, madvise), not CUDA VMM; compute is a step-time model. See bench/multi_model/README.md.",
            "",
        ]
    env = directory / "env.txt"
    if env.is_file():
        lines += ["```", env.read_text().rstrip(), "```", ""]
    lines += overview(runs)
    lines += ["## Per model", ""]
    for _, path in runs:
        table = path.with_suffix(".md")
        if table.is_file():
            lines += [table.read_text().rstrip(), ""]
    drawn = draw_charts(directory, runs)
    if drawn is None:
        lines.append("Charts: matplotlib is not importable here; run `bench/multi_model/summarize.py <this dir>` where it is.")
    else:
        lines += [f"![{Path(f).stem}]({f})" for f in drawn]
    lines.append("")
    (directory / "summary.md").write_text("\n".join(lines))
    print(f"summarize.py: wrote {directory / 'summary.md'}" + (f" and {', '.join(drawn)}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
