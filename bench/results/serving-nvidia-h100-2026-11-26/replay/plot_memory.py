"""Draws memory.png from memory.csv (committed KV memory over time, per mode and process)."""
import csv
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = os.path.dirname(os.path.abspath(sys.argv[0]))
series = {}
with open(os.path.join(here, "memory.csv")) as f:
    for row in csv.DictReader(f):
        series.setdefault((row["mode"], row["process"]), []).append((float(row["t_s"]), int(row["committed_bytes"]) / 2**20))
fig, ax = plt.subplots(figsize=(9, 4.5))
for (mode, process), points in sorted(series.items()):
    points.sort()
    style = "-" if process == "all" else ":"
    label = f"{mode}: {'budget (both processes)' if process == 'all' else process}"
    ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, linewidth=1.2)
ax.axhline(576, color="grey", linewidth=0.8)
ax.set_xlabel("time since start of the replay (s)")
ax.set_ylabel("committed KV memory (MiB)")
ax.set_title("bursty-n2 (90 s at 1.5x), 1B + 8B engine processes, 576 MiB total, H100")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(here, "memory.png"), dpi=110)
