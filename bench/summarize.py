#!/usr/bin/env python3
"""bench/summarize.py: turns one results directory of vmmpp benchmarks into summary.md and charts.

Usage: bench/summarize.py <results-dir>

Reads the Google Benchmark JSON files bench/run wrote there (bench_pool_growth.json,
bench_bandwidth.json, bench_metadata.json; any may be missing), plus env.txt and compile_time.md
when present, and writes <results-dir>/summary.md: per configuration, the pool's figure next to
the floor measured in the same run and their ratio. If matplotlib can be imported it also draws
growth.png and bandwidth.png; otherwise run this script again on the directory where it can.

Only the standard library is needed for summary.md. Every figure is the median over the
repetitions of a per-run statistic (a run's p50 latency, say); "cv" is the coefficient of
variation of the run means across repetitions.
"""

import json
import statistics
import sys
from pathlib import Path

NAME_SUFFIXES = ("manual_time", "real_time", "process_time")


def base_name(run_name):
    """'pool/host_config/manual_time' -> 'pool/host_config' (drops the options benchmark appends)."""
    parts = [p for p in run_name.split("/") if p not in NAME_SUFFIXES and ":" not in p]
    return "/".join(parts)


class Results:
    """One benchmark program's JSON: per benchmark, its aggregates (or its single run)."""

    def __init__(self, path):
        data = json.loads(path.read_text())
        self.context = data.get("context", {})
        self.order = []
        self.runs = {}  # name -> {"aggregates": {agg: entry}, "iterations": [entry], "label", "error"}
        for entry in data.get("benchmarks", []):
            name = base_name(entry.get("run_name", entry["name"]))
            if name not in self.runs:
                self.order.append(name)
                self.runs[name] = {"aggregates": {}, "iterations": [], "label": "", "error": None}
            run = self.runs[name]
            if entry.get("error_occurred"):
                run["error"] = entry.get("error_message", "error")
                continue
            run["label"] = entry.get("label", run["label"])
            if entry.get("run_type") == "aggregate":
                run["aggregates"][entry["aggregate_name"]] = entry
            else:
                run["iterations"].append(entry)

    def ok(self, name):
        run = self.runs.get(name)
        return run is not None and run["error"] is None and (run["aggregates"] or run["iterations"])

    def value(self, name, key, aggregate="median"):
        """The aggregate of `key` over repetitions (median by default); None if unknown."""
        if not self.ok(name):
            return None
        run = self.runs[name]
        if aggregate in run["aggregates"]:
            return run["aggregates"][aggregate].get(key)
        values = [e[key] for e in run["iterations"] if key in e]
        if not values:
            return None
        if aggregate == "cv":
            mean = statistics.mean(values)
            return statistics.pstdev(values) / mean if len(values) > 1 and mean else None
        return statistics.median(values)

    def reference(self, name, prefix):
        """The floor or baseline a benchmark's label names ('floor=floor/vmm_2MiB')."""
        label = self.runs[name]["label"] if name in self.runs else ""
        for part in label.split(","):
            if part.startswith(prefix + "="):
                return part[len(prefix) + 1 :]
        return None

    def repetitions(self):
        counts = [e.get("repetitions", 1) for r in self.runs.values() for e in r["aggregates"].values()]
        return max(counts, default=1)

    def skipped(self):
        return [(n, r["error"]) for n, r in self.runs.items() if r["error"] is not None]


def fmt(x):
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def fmt_ratio(x):
    return "–" if x is None else f"{x:.3f}"


def fmt_bytes(n):
    if n is None:
        return "–"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n:.0f} B"


def fmt_pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def no_rows(out, header_lines):
    """Replaces a table that got no rows by a note."""
    if out[-1].startswith("| ---"):
        del out[-header_lines:]
        out.append("No results (all skipped: see below).")


def pools(results):
    return [n for n in results.order if n.startswith("pool/")]


def short(name):
    return name.split("/", 1)[1] if "/" in name else name


def growth_section(r):
    out = ["## Growth: one page in (ensure_committed) and out (release)", ""]
    out.append(
        "Microseconds per operation. `pool` grows an `elastic_pool` by one page that is not committed "
        "and releases it; its floor is the raw operation the configuration wraps, measured in the "
        "same run. ratio = pool / floor (1.00: the pool adds nothing); overhead = pool − floor. "
        "`bytes` is what one grow commits (0: a static pool only accounts)."
    )
    out.append("")
    for op in ("grow", "release"):
        out.append(f"### {op}")
        out.append("")
        out.append(
            f"| configuration | bytes | {op} p50 | p90 | p99 | mean | cv | floor | floor p50 | floor mean "
            "| ratio p50 | ratio mean | overhead p50 |"
        )
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for name in pools(r):
            if not r.ok(name):
                continue
            floor = r.reference(name, "floor")
            p50, fp50 = r.value(name, f"{op}_p50"), r.value(floor, f"{op}_p50") if floor else None
            mean, fmean = r.value(name, f"{op}_mean"), r.value(floor, f"{op}_mean") if floor else None
            overhead = p50 - fp50 if p50 is not None and fp50 is not None else None
            out.append(
                f"| {short(name)} | {fmt_bytes(r.value(name, 'bytes'))} | {fmt(p50)} "
                f"| {fmt(r.value(name, f'{op}_p90'))} "
                f"| {fmt(r.value(name, f'{op}_p99'))} | {fmt(mean)} | {fmt_pct(r.value(name, f'{op}_mean', 'cv'))} "
                f"| {short(floor) if floor else '–'} | {fmt(fp50)} | {fmt(fmean)} | {fmt_ratio(ratio(p50, fp50))} "
                f"| {fmt_ratio(ratio(mean, fmean))} | {fmt(overhead)} |"
            )
        no_rows(out, 2)
        out.append("")
    out.append("### Floors")
    out.append("")
    out.append("| floor | bytes | grow p50 | grow mean | release p50 | release mean | grow+release p50 per 2 MiB |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in r.order:
        if not name.startswith("floor/") or not r.ok(name):
            continue
        g, rel, b = r.value(name, "grow_p50"), r.value(name, "release_p50"), r.value(name, "bytes")
        per2 = (g + rel) / (b / (2 << 20)) if None not in (g, rel, b) and b else None
        out.append(
            f"| {short(name)} | {fmt_bytes(b)} | {fmt(g)} | {fmt(r.value(name, 'grow_mean'))} | {fmt(rel)} "
            f"| {fmt(r.value(name, 'release_mean'))} | {fmt(per2)} |"
        )
    no_rows(out, 2)
    plain, exportable = r.value("floor/vmm_2MiB_plain", "grow_p50"), r.value("floor/vmm_2MiB", "grow_p50")
    if plain is not None and exportable is not None:
        out.append("")
        out.append(
            f"Asking for an exportable (POSIX fd) handle, as the vmm backing does: cuMemCreate+Map+SetAccess "
            f"p50 {fmt(exportable)} µs against {fmt(plain)} µs without (ratio {fmt_ratio(ratio(exportable, plain))})."
        )
    commits = [(short(n), r.value(n, "commits")) for n in pools(r) if r.ok(n)]
    if commits:
        out.append("")
        out.append(
            "Backing commits per grow (1 = every grow really committed; 0 = accounting only): "
            + ", ".join(f"{n} {fmt(c)}" for n, c in commits)
            + "."
        )
    out.append("")
    return out


def bandwidth_section(r):
    out = ["## Bandwidth: copy kernel over 1 GiB of pool memory vs cudaMalloc memory", ""]
    out.append(
        "GB/s = bytes read + written per second (first half of 1 GiB copied to the second half, "
        "16-byte grid-stride kernel, CUDA events). ratio = pool / cudaMalloc baseline in the same run; "
        "goal ≥ 0.99."
    )
    out.append("")
    out.append("| memory | GB/s | GB/s p50 per launch | cv | baseline GB/s | ratio | ≥ 0.99 |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | :---: |")
    for name in r.order:
        if not r.ok(name):
            continue
        base = r.reference(name, "baseline")
        gbps, bgbps = r.value(name, "GBps"), r.value(base, "GBps") if base else None
        q = ratio(gbps, bgbps)
        verdict = "–" if q is None else ("yes" if q >= 0.99 else "**no**")
        out.append(
            f"| {name} | {fmt(gbps)} | {fmt(r.value(name, 'GBps_p50'))} | {fmt_pct(r.value(name, 'GBps', 'cv'))} "
            f"| {fmt(bgbps)} | {fmt_ratio(q)} | {verdict} |"
        )
    no_rows(out, 2)
    out.append("")
    return out


def metadata_section(r):
    out = ["## Host bookkeeping per GiB of pool", ""]
    out.append(
        "C++ heap bytes the pool holds (counted by a replaced operator new), empty and with every page "
        "held (so committed)."
    )
    out.append("")
    out.append("| configuration | capacity | empty | empty per GiB | full | full per GiB |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in pools(r):
        if not r.ok(name):
            continue
        out.append(
            f"| {short(name)} | {fmt(r.value(name, 'capacity_GiB'))} GiB | {fmt_bytes(r.value(name, 'empty_bytes'))} "
            f"| {fmt_bytes(r.value(name, 'empty_per_GiB'))} | {fmt_bytes(r.value(name, 'full_bytes'))} "
            f"| {fmt_bytes(r.value(name, 'full_per_GiB'))} |"
        )
    no_rows(out, 2)
    out.append("")
    return out


def device_name(results):
    gpu = results.context.get("vmmpp_gpu", "?")
    return f"no GPU, {results.context.get('host_name', 'host')}" if gpu == "none" else gpu


def draw_charts(directory, growth, bandwidth):
    """growth.png and bandwidth.png; returns the files drawn, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return None
    drawn = []
    if growth is not None:
        names = [n for n in pools(growth) if growth.ok(n) and growth.reference(n, "floor")]
        if names:
            fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(names) + 2.2), sharey=True)
            for ax, op in zip(axes, ("grow", "release")):
                y = range(len(names))
                pool_v = [growth.value(n, f"{op}_p50") or 0 for n in names]
                floor_v = [growth.value(growth.reference(n, "floor"), f"{op}_p50") or 0 for n in names]
                ax.barh([i + 0.2 for i in y], pool_v, height=0.4, label="pool", color="tab:blue")
                ax.barh([i - 0.2 for i in y], floor_v, height=0.4, label="floor (raw)", color="tab:gray")
                for i, (p, f) in enumerate(zip(pool_v, floor_v)):
                    if p and f:
                        ax.text(p, i + 0.2, f" ×{p / f:.2f}", va="center", fontsize=8)
                ax.set_xscale("log")
                positive = [v for v in pool_v + floor_v if v > 0]
                if positive:
                    ax.set_xlim(min(positive) / 3, max(positive) * 4)
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel(f"{op} p50 (µs, log scale)")
                ax.set_title(op)
            axes[0].set_yticks(list(range(len(names))))
            axes[0].set_yticklabels([short(n) + "\nvs " + short(growth.reference(n, "floor")) for n in names],
                                    fontsize=8)
            axes[0].invert_yaxis()
            axes[1].legend(loc="upper right", fontsize=8)
            fig.suptitle(f"vmmpp pool growth vs raw floor ({device_name(growth)})")
            fig.tight_layout()
            fig.savefig(directory / "growth.png", dpi=120)
            plt.close(fig)
            drawn.append("growth.png")
    if bandwidth is not None:
        names = [n for n in bandwidth.order if bandwidth.ok(n) and bandwidth.reference(n, "baseline")]
        ratios = [ratio(bandwidth.value(n, "GBps"), bandwidth.value(bandwidth.reference(n, "baseline"), "GBps"))
                  for n in names]
        if names and all(q is not None for q in ratios):
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.bar([short(n) for n in names], ratios, color="tab:blue")
            ax.axhline(0.99, color="tab:red", linestyle="--", label="goal 0.99")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_ylim(min(0.95, min(ratios) - 0.01), max(1.01, max(ratios) + 0.01))
            for i, q in enumerate(ratios):
                ax.text(i, q, f"{q:.3f}", ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("copy GB/s, pool / cudaMalloc")
            ax.set_title(f"Kernel bandwidth on pool memory ({device_name(bandwidth)})")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(directory / "bandwidth.png", dpi=120)
            plt.close(fig)
            drawn.append("bandwidth.png")
    return drawn


def main(argv):
    if len(argv) != 2 or not Path(argv[1]).is_dir():
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    directory = Path(argv[1])
    loaded = {}
    for program in ("bench_pool_growth", "bench_bandwidth", "bench_metadata"):
        path = directory / f"{program}.json"
        if path.is_file() and path.stat().st_size > 0:
            loaded[program] = Results(path)
    growth, bandwidth, metadata = (loaded.get(p) for p in ("bench_pool_growth", "bench_bandwidth", "bench_metadata"))

    lines = [f"# vmmpp benchmarks: {directory.name}", ""]
    any_results = next(iter(loaded.values()), None)
    if any_results is not None:
        c = any_results.context
        lines.append(
            f"GPU: {c.get('vmmpp_gpu', '?')} (CUDA driver {c.get('vmmpp_cuda_driver', '–')}, runtime "
            f"{c.get('vmmpp_cuda_runtime', '–')}); host {c.get('host_name', '?')}, {c.get('num_cpus', '?')} CPUs; "
            f"{c.get('date', '?')}; {any_results.repetitions()} repetitions."
        )
        lines.append("")
    env = directory / "env.txt"
    if env.is_file():
        lines += ["```", env.read_text().rstrip(), "```", ""]

    if growth is not None:
        lines += growth_section(growth)
    if bandwidth is not None:
        lines += bandwidth_section(bandwidth)
    if metadata is not None:
        lines += metadata_section(metadata)
    compile_md = directory / "compile_time.md"
    if compile_md.is_file():
        lines += ["## Compile time", "", compile_md.read_text().rstrip(), ""]

    skipped = [(p, n, e) for p, r in loaded.items() for n, e in r.skipped()]
    if skipped:
        lines += ["## Skipped", ""]
        lines += [f"- {p}: {n}: {e}" for p, n, e in skipped]
        lines.append("")

    drawn = draw_charts(directory, growth, bandwidth)
    if drawn is None:
        lines.append("Charts: matplotlib is not importable here; run `bench/summarize.py <this dir>` where it is.")
    elif drawn:
        lines += [f"![{Path(f).stem}]({f})" for f in drawn]
    lines.append("")

    (directory / "summary.md").write_text("\n".join(lines))
    print(f"summarize.py: wrote {directory / 'summary.md'}" + (f" and {', '.join(drawn)}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
