#!/usr/bin/env python3
"""bench/peers/compare.py BEFORE/summary.md AFTER/summary.md: vmmpp's rows of two peer runs side
by side (a change's before and after, run on the same machine in one call), with after/before
ratios of the p50s and of burst bandwidth. Reads the first table of summarize.py's summary.md."""
import re
import sys


def rows(path):
    out = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("| `"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            name = cells[0]
            if name in out:
                continue  # the first table only (the kernel-bandwidth table repeats the names)
            out[name] = cells
    return out


def p50(cell):
    m = re.match(r"([0-9.,]+)", cell)
    return float(m.group(1).replace(",", "")) if m else None


def ratio(a, b):
    return f"{b / a:.2f}x" if a and b else "–"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    before, after = rows(sys.argv[1]), rows(sys.argv[2])
    print("| configuration, layout | grow p50/p99 before → after | paced | steady mix | burst GB/s | "
          "churn (GPU) | grow / paced / steady p50 after÷before | burst after÷before |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        print(f"| {name} | {b[1]} → {a[1]} | {b[2]} → {a[2]} | {b[3]} → {a[3]} | {b[4]} → {a[4]} | "
              f"{b[7]} → {a[7]} | {ratio(p50(b[1]), p50(a[1]))} / {ratio(p50(b[2]), p50(a[2]))} / "
              f"{ratio(p50(b[3]), p50(a[3]))} | {ratio(p50(b[4]), p50(a[4]))} |")


if __name__ == "__main__":
    main()
