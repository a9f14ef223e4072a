"""How often does the step-wise tier-4 bound fail between runs that agree? One table from stored curves.

    python scripts/curve_spread.py ref=benchmarks/parity_h100/curves.csv:ref_train \\
        eager=benchmarks/parity_h100/curves.csv:ref_eager_train s8=runs/parity/curves.csv:jgpt_train ...

Each argument names one training run's per-step train loss: LABEL=CSV:COLUMN (a curves.csv of
scripts/gpu_parity.py). For every pair of runs, the 10-step moving mean of |a - b| (design.md
tier 4) is one "gap curve". For every two pairs with no run in common, one is taken as the test
and the other as the calibration, and the script counts the steps after step 10 where the test's
gap exceeds twice the calibration's (gpu_parity.py's step-wise check). Printed: each pair's mean
gap, and the share of (test, calibration) combinations with no step over, so that a count for
jgpt against ref can be read against what the same check gives between the other runs.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.gpu_parity import moving_mean  # noqa: E402


def load(spec: str) -> tuple[str, dict[int, float]]:
    label, eq, rest = spec.partition("=")
    path, colon, column = rest.rpartition(":")
    if not eq or not colon or not label:
        raise ValueError(f"{spec!r}: expected LABEL=CSV:COLUMN")
    if not Path(path).is_file():
        raise ValueError(f"{spec!r}: no file {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise ValueError(f"{spec!r}: {path} has no column {column!r}")
    return label, {int(r["step"]): float(r[column]) for r in rows if r[column]}


def study(runs: dict[str, dict[int, float]], factor: float = 2.0, skip: int = 10):
    """(steps, {pair: gap curve}, [(steps over, worst ratio, test pair, calibration pair)])."""
    steps = sorted(set.intersection(*(set(c) for c in runs.values())))
    if len(steps) <= skip:
        raise ValueError(f"the runs share {len(steps)} steps; need more than {skip}")
    gaps = {p: moving_mean([abs(runs[p[0]][s] - runs[p[1]][s]) for s in steps])
            for p in itertools.combinations(runs, 2)}
    combos = []
    for test, cal in itertools.permutations(gaps, 2):
        if set(test) & set(cal):
            continue
        ratios = [t / max(c, 1e-12) for t, c in zip(gaps[test][skip:], gaps[cal][skip:])]
        combos.append((sum(r > factor for r in ratios), max(ratios), test, cal))
    return steps, gaps, combos


def report(runs, factor: float = 2.0, skip: int = 10) -> list[str]:
    steps, gaps, combos = study(runs, factor, skip)
    n = len(steps) - skip
    lines = [f"{len(runs)} runs, {len(steps)} common steps; step-wise check after step {skip}: "
             f"10-step mean gap over {factor:g}x the calibration pair's", "",
             "| pair | mean gap | largest 10-step mean | steps over, as test (median over calibrations) |",
             "|---|---|---|---|"]
    for p, g in gaps.items():
        mine = [c[0] for c in combos if c[2] == p]
        med = f"{statistics.median(mine):g} of {n}" if mine else "-"
        raw = [abs(runs[p[0]][s] - runs[p[1]][s]) for s in steps]
        lines.append(f"| {p[0]} - {p[1]} | {sum(raw) / len(raw):.4f} | {max(g[skip:]):.4f} | {med} |")
    if combos:
        zero = sum(c[0] == 0 for c in combos)
        lines += ["", f"(test, calibration) combinations: {len(combos)}; with no step over: {zero} "
                      f"({zero / len(combos):.1%}); median steps over: {statistics.median(c[0] for c in combos):g} of {n}"]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="LABEL=CSV:COLUMN, at least four")
    p.add_argument("--factor", type=float, default=2.0)
    args = p.parse_args(argv)
    try:
        runs = dict(load(s) for s in args.runs)
        if len(runs) < 4:
            raise ValueError(f"need at least four distinct runs (two disjoint pairs), got {len(runs)}")
        print("\n".join(report(runs, args.factor)))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
