"""Every exit policy's budgeted curve on trained runs, from their stored per-exit validation and test logits.

    python benchmarks/accuracy/exit_policies.py --runs runs/anytime_cifar10_dev2/*_seed1[0-4]
    python benchmarks/accuracy/exit_policies.py --runs R1 R2 --policies quotas patience risk --out exit_policies

Re-evaluates each run's deploy model once (its ``eval.json`` is not touched), fits every policy of
``dynsila.policies`` on validation for the budgets the quota policy reaches at MSDNet's 39 exit distributions (the
risk policy: for a grid of risk levels) and applies it to test. Per run and policy: test top-1 at each budget
and the mean test top-1 over the MACs range all budget policies cover. Writes ``benchmarks/results/<out>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import RESULTS_DIR, command_line, environment, header, write_results
from dynsila.evaluation.evaluate import policy_curves
from dynsila.policies.sweep import PolicyPoint
from dynsila.policies.table import POLICIES


def mean_top1(points: list[PolicyPoint], low: float, high: float) -> float:
    """Test top-1 averaged over [low, high] MACs, linear between points (the area over the range, divided by it)."""
    macs = np.array([p.avg_macs for p in points])
    top1 = np.array([p.test_top1 for p in points])
    order = np.argsort(macs)
    grid = np.linspace(low, high, 201)
    return float(np.interp(grid, macs[order], top1[order]).mean())


def summarise(runs: dict[str, dict[str, list[PolicyPoint]]]) -> list[str]:
    lines = ["| run | policy | mean test top-1 over the shared MACs range | points |", "|---|---|---|---|"]
    for run, curves in runs.items():
        budgeted = [c for n, c in curves.items() if POLICIES[n].target == "budget"]
        low = max(min(p.avg_macs for p in c) for c in budgeted) if budgeted else 0.0
        high = min(max(p.avg_macs for p in c) for c in budgeted) if budgeted else 0.0
        for name, points in curves.items():
            area = f"{mean_top1(points, low, high):.2f}" if POLICIES[name].target == "budget" and high > low else "-"
            lines.append(f"| {Path(run).name} | {name} | {area} | {len(points)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--macs", choices=("paper", "lazy"), default="paper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="exit_policies")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    runs = {str(r): policy_curves(r, args.policies, args.device, args.macs, write=False) for r in args.runs}
    env = environment(args.device)
    payload: dict[str, Any] = {
        "environment": env,
        "macs_convention": args.macs,
        "runs": {r: {n: [asdict(p) for p in c] for n, c in curves.items()} for r, curves in runs.items()},
    }
    command = command_line(__file__, argv)
    markdown = "\n".join([*header("Exit policies: budgeted curves", command, env), *summarise(runs)])
    out = write_results(args.out, payload, markdown, args.results_dir)
    print(markdown + f"\n\nwrote {out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
