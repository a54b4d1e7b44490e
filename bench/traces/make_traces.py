#!/usr/bin/env python3
"""bench/traces/make_traces.py: seeded request traces for bench/multi_model (standard library only).

Usage: make_traces.py --seed S [--out DIR] [--scenarios balanced,bursty,dominant] [--models 2,4,8]
                      [--duration SECONDS] [--rate REQ_PER_S_PER_MODEL] [more options: --help]

Writes DIR/<scenario>-n<N>-seed<S>.csv for every scenario and model count: one request a line,
`arrival_us,model,prompt_tokens,output_tokens`, sorted by arrival, after `#` comment lines that
record how the file was made (the simulator reads `models=N` from them). The same seed and options
always give the same bytes, on any machine (random.Random seeded with a string is stable).

Scenarios (every model's mean rate over the whole trace is --rate, so the three carry the same
offered load and differ only in how it is spread over models and time):

- balanced:  every model a Poisson process at --rate.
- bursty:    models take turns being hot, --phase seconds each, round robin. A cold model runs at
             --cold-share x --rate, the hot one takes the rest of the N x --rate total. Inter-arrival
             times are gamma distributed with shape --gamma-shape (< 1: burstier than Poisson;
             coefficient of variation 1/sqrt(shape)), rescaled to the phase's rate.
- dominant:  model --dominant-model gets --dominant-share of the N x --rate total (Poisson); the
             others share the rest equally.

Prompt and output lengths are lognormal with the given median and sigma, rounded and clipped to
[min, max] (--prompt, --output: "median,sigma,min,max"), drawn the same way in every scenario.
"""

import argparse
import bisect
import math
import random
import sys
from pathlib import Path

SCENARIOS = ("balanced", "bursty", "dominant")


def lengths_spec(text):
    """'512,1.0,16,2048' -> (median, sigma, min, max)."""
    try:
        median, sigma, lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected median,sigma,min,max; got {text!r}")
    if not (median > 0 and sigma >= 0 and 1 <= lo <= hi):
        raise argparse.ArgumentTypeError(f"need median > 0, sigma >= 0, 1 <= min <= max; got {text!r}")
    return median, sigma, int(lo), int(hi)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, required=True, help="random seed (each file gets its own stream)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory (default: here)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ", ".join(SCENARIOS))
    p.add_argument("--models", default="2,4,8", help="comma-separated model counts (default 2,4,8)")
    p.add_argument("--duration", type=float, default=1200.0, help="seconds of arrivals (default 1200)")
    p.add_argument("--rate", type=float, default=0.4, help="mean requests per second per model (default 0.4)")
    p.add_argument("--phase", type=float, default=20.0, help="bursty: seconds each model stays hot (default 20)")
    p.add_argument("--cold-share", type=float, default=0.2, help="bursty: a cold model's rate / --rate (default 0.2)")
    p.add_argument("--gamma-shape", type=float, default=0.5, help="bursty: gamma shape of inter-arrivals (default 0.5)")
    p.add_argument("--dominant-share", type=float, default=0.8, help="dominant: its share of traffic (default 0.8)")
    p.add_argument("--dominant-model", type=int, default=1, help="dominant: its index (default 1, an 8B-like model)")
    p.add_argument("--prompt", type=lengths_spec, default=lengths_spec("512,1.0,16,2048"),
                   help="prompt tokens: median,sigma,min,max (default 512,1.0,16,2048)")
    p.add_argument("--output", type=lengths_spec, default=lengths_spec("128,0.8,8,512"),
                   help="output tokens: median,sigma,min,max (default 128,0.8,8,512)")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.models = [int(n) for n in args.models.split(",") if n]
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    if any(n < 1 for n in args.models):
        p.error("model counts must be >= 1")
    if not 0 <= args.cold_share <= 1:
        p.error("--cold-share must be in [0, 1] (the hot model's rate would be negative)")
    if not 0 < args.dominant_share <= 1:
        p.error("--dominant-share must be in (0, 1]")
    if args.duration <= 0 or args.rate <= 0 or args.phase <= 0 or args.gamma_shape <= 0:
        p.error("--duration, --rate, --phase and --gamma-shape must be positive")
    return args


def piecewise_rate_times(rng, pieces, duration, draw_gap):
    """Arrival times in [0, duration) of a renewal process with a piecewise-constant rate.

    `pieces` is [(start_s, rate_per_s)], sorted, first start 0. Gaps are drawn with mean 1 in
    operational time (the integral of the rate) and mapped back through it, so each piece gets
    its rate and the gap distribution's shape is kept."""
    starts = [s for s, _ in pieces]
    ends = starts[1:] + [duration]
    cumulative = [0.0]  # operational time at each piece's start
    for (start, rate), end in zip(pieces, ends):
        cumulative.append(cumulative[-1] + rate * (end - start))
    times, op = [], 0.0
    while True:
        op += draw_gap(rng)
        if op >= cumulative[-1]:
            return times
        i = bisect.bisect_right(cumulative, op) - 1  # the last piece starting at or before op: never an empty one
        times.append(starts[i] + (op - cumulative[i]) / pieces[i][1])


def exponential_gap(rng):
    return rng.expovariate(1.0)


def gamma_gap(shape):
    return lambda rng: rng.gammavariate(shape, 1.0 / shape)  # mean 1, CV 1/sqrt(shape)


def model_pieces(args, scenario, n, model):
    """[(start_s, rate)] of one model in one scenario, and the gap distribution."""
    if scenario == "balanced":
        return [(0.0, args.rate)], exponential_gap
    if scenario == "dominant":
        dominant = args.dominant_model % n
        total = n * args.rate
        if n == 1:
            rate = total
        elif model == dominant:
            rate = args.dominant_share * total
        else:
            rate = (1 - args.dominant_share) * total / (n - 1)
        return [(0.0, rate)], exponential_gap
    # bursty: round robin of hot phases
    cold = args.cold_share * args.rate
    hot = n * args.rate - (n - 1) * cold
    phases = math.ceil(args.duration / args.phase)
    pieces = [(k * args.phase, hot if k % n == model else cold) for k in range(phases)]
    return pieces, gamma_gap(args.gamma_shape)


def draw_length(rng, spec):
    median, sigma, lo, hi = spec
    return min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))


def make_trace(args, scenario, n):
    rng = random.Random(f"vmmpp-multi-model/{args.seed}/{scenario}/{n}")
    arrivals = []
    for model in range(n):
        pieces, gap = model_pieces(args, scenario, n, model)
        arrivals += [(t, model) for t in piecewise_rate_times(rng, pieces, args.duration, gap)]
    arrivals.sort()
    # Lengths drawn in arrival order from their own stream, so they do not depend on the scenario's
    # arrival draws: request k has the same lengths in every scenario with the same seed and N.
    lengths = random.Random(f"vmmpp-multi-model/{args.seed}/lengths/{n}")
    return [(round(t * 1e6), m, draw_length(lengths, args.prompt), draw_length(lengths, args.output))
            for t, m in arrivals]


def header(args, scenario, n, rows):
    per_model = [sum(1 for r in rows if r[1] == m) for m in range(n)]
    options = (f"duration={args.duration:g} rate={args.rate:g} phase={args.phase:g} cold_share={args.cold_share:g} "
               f"gamma_shape={args.gamma_shape:g} dominant_share={args.dominant_share:g} "
               f"dominant_model={args.dominant_model} prompt={','.join(f'{x:g}' for x in args.prompt)} "
               f"output={','.join(f'{x:g}' for x in args.output)}")
    return [
        f"# vmmpp multi-model trace: bench/traces/make_traces.py --seed {args.seed}",
        f"# scenario={scenario} models={n} seed={args.seed} requests={len(rows)} "
        f"per_model={','.join(map(str, per_model))}",
        f"# {options}",
        "arrival_us,model,prompt_tokens,output_tokens",
    ]


def main(argv):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenarios:
        for n in args.models:
            rows = make_trace(args, scenario, n)
            path = args.out / f"{scenario}-n{n}-seed{args.seed}.csv"
            lines = header(args, scenario, n, rows) + [",".join(map(str, r)) for r in rows]
            path.write_text("\n".join(lines) + "\n")
            print(f"make_traces.py: {path} ({len(rows)} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
