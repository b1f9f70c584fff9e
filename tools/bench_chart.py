#!/usr/bin/env python3
"""epcomm-bench --json results as a PNG: bandwidth against tokens per rank and against SMs.

    build/bench/epcomm-bench --tokens 4096 --sms 24,16,8 --json run-4096.json   # one file per problem
    tools/bench_chart.py run-*.json -o docs/figures/bench.png

Each figure is what docs/contract.md §7 counts: the slowest rank's bandwidth of an op (the minimum
over ranks). Left panel: bandwidth against tokens per rank, one line per (system, op) at the most SMs
each file measured. Right panel: bandwidth against SMs at the largest token count, one line per
(system, op). Systems are what the bench names them (epcomm, the NCCL all-to-all baseline, the CPU
reference), so epcomm's curves sit beside NCCL's. Needs matplotlib (Debian: python3-matplotlib).
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

Key = Tuple[str, str]  # (system, op)


def load(paths: List[str]):
    """{(system, op): {(tokens, sms): slowest rank's GB/s}}, and the devices and rank counts seen."""
    series: Dict[Key, Dict[Tuple[int, int], float]] = defaultdict(dict)
    devices = set()
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        m = re.search(r"tokens (\d+)", run.get("problem", ""))
        if not m:
            raise SystemExit(f"{path}: the problem line names no token count: {run.get('problem')!r}")
        tokens = int(m.group(1))
        devices.add(f"{run.get('device', '?')}, {run.get('ranks', '?')} ranks")
        slowest: Dict[Tuple[str, str, int], float] = {}
        for row in run.get("rows", []):
            if not row.get("gbps"):
                continue  # the layout moves no bytes
            k = (row["system"], row["op"], int(row.get("sms", 0)))
            slowest[k] = min(slowest.get(k, float("inf")), float(row["gbps"]))
        for (system, op, sms), gbps in slowest.items():
            series[(system, op)][(tokens, sms)] = gbps
    return series, sorted(devices)


def plot(series, devices, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for (system, op), points in sorted(series.items()):
        label = f"{system} {op}"
        style = "--" if system.startswith("nccl") else "-"
        by_tokens: Dict[int, Tuple[int, float]] = {}
        for (tokens, sms), gbps in points.items():
            if tokens not in by_tokens or sms > by_tokens[tokens][0]:
                by_tokens[tokens] = (sms, gbps)
        xs = sorted(by_tokens)
        left.plot(xs, [by_tokens[x][1] for x in xs], style, marker="o", label=label)
        top = max(t for t, _ in points)
        sms_points = sorted((sms, gbps) for (t, sms), gbps in points.items() if t == top and sms > 0)
        if len(sms_points) > 1:
            right.plot([s for s, _ in sms_points], [g for _, g in sms_points], style, marker="o",
                       label=f"{label} ({top} tokens)")
    left.set_xscale("log", base=2)
    left.set_xlabel("tokens per rank")
    left.set_ylabel("GB/s (slowest rank)")
    left.set_title("bandwidth against tokens (most SMs measured)")
    right.set_xlabel("SMs")
    right.set_ylabel("GB/s (slowest rank)")
    right.set_title("bandwidth against SMs")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if not right.lines:
        right.text(0.5, 0.5, "one SM count per run: pass --sms 4,8,16,24 to the bench", ha="center",
                   transform=right.transAxes)
    fig.suptitle("epcomm-bench: " + "; ".join(devices), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="epcomm-bench --json files (one per token count)")
    parser.add_argument("-o", "--output", default="bench.png", help="the PNG to write (default bench.png)")
    args = parser.parse_args(argv)
    series, devices = load(args.json)
    if not series:
        raise SystemExit("no row with a bandwidth in " + ", ".join(args.json))
    plot(series, devices, args.output)
    print(f"bench_chart: {len(series)} series from {len(args.json)} file(s) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
