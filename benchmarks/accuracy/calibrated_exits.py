"""Per-exit temperature calibration on trained runs: budgeted curves with and without, paired over the runs.

    python benchmarks/accuracy/calibrated_exits.py --runs runs/anytime_cifar10_dev2/*_seed1[0-4]
    python benchmarks/accuracy/calibrated_exits.py --runs R1 R2 ... --criterion max_prob --out calibrated_exits

Re-evaluates each finished run's deploy model (its ``eval.json`` is not touched) and reads two budgeted curves of
the same criterion: thresholds fitted on validation on the raw logits, and on the logits of each exit divided by
its temperature (fitted on validation first, Guo et al., ICML 2017). Both use the same protocol and the same
target exit distributions; only the scores differ. Per run: the area of each curve over the MACs range both
cover (mean test top-1 over that range), test top-1 at a few fractions of the last exit's MACs, and the mean
test ECE of the exits before and after scaling. Differences are paired by run (calibrated - raw), 95 %
t-intervals. Writes ``benchmarks/results/<out>.{json,md}``. Runs come from training, e.g. the SiLa experiment's
grid (``python benchmarks/anytime.py --preset cpu``, which needs ../shared/data/cifar10_dev2.npz).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.sila_experiment.paired_stats import paired
from benchmarks.toolkit import PLOTTED_CRITERION, RESULTS_DIR, command_line, environment, header, write_results
from dynsila.budget.thresholds import CONFIDENCE
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import evaluate_run
from dynsila.evaluation.report import EvalReport

STEM = "calibrated_exits"
BUDGET_FRACTIONS = (0.4, 0.6, 0.8)  # of the last exit's MACs
GRID_POINTS = 200


def curve_arrays(report: EvalReport, criterion: str, calibrated: bool) -> tuple[np.ndarray, np.ndarray]:
    """(average MACs, test top-1) of a budgeted curve, sorted by MACs."""
    curve = report.budgeted(criterion, calibrated=calibrated)
    if curve is None:
        kind = "calibrated " if calibrated else ""
        raise DynsilaError(f"{report.run_dir} has no {kind}budgeted curve for {criterion}; pick another --criterion")
    macs = np.array([p.avg_macs for p in curve.points], dtype=float)
    top1 = np.array([p.test_top1 for p in curve.points], dtype=float)
    order = np.argsort(macs)
    return macs[order], top1[order]


def shared_area(raw: tuple[np.ndarray, np.ndarray], cal: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Mean test top-1 of each curve over the MACs range both cover (linear interpolation)."""
    low, high = max(raw[0][0], cal[0][0]), min(raw[0][-1], cal[0][-1])
    if not high > low:
        raise DynsilaError("the raw and calibrated curves share no MACs range; the run's exits may be degenerate")
    grid = np.linspace(low, high, GRID_POINTS)
    return float(np.interp(grid, *raw).mean()), float(np.interp(grid, *cal).mean())


def measure_run(run_dir: Path, criterion: str) -> dict[str, Any]:
    """One run's raw and calibrated figures."""
    report = evaluate_run(run_dir, criteria=(criterion,), write=False)
    if report.calibration is None:
        raise DynsilaError(f"{run_dir} is not a multi-exit run (no per-exit calibration); pass early-exit runs")
    raw, cal = curve_arrays(report, criterion, False), curve_arrays(report, criterion, True)
    area_raw, area_cal = shared_area(raw, cal)
    last_macs = report.exits[-1].macs_cumulative
    at = {f"{f:.0%}": [float(np.interp(f * last_macs, *c)) for c in (raw, cal)] for f in BUDGET_FRACTIONS}
    c = report.calibration.fit
    return {
        "run": report.run,
        "run_dir": str(run_dir),
        "area": [area_raw, area_cal],
        "top1_at": at,
        "test_ece": [float(np.mean(c.test_ece_before)), float(np.mean(c.test_ece_after))],
        "temperatures": c.temperatures,
    }


def paired_differences(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """calibrated - raw, paired by run, for the area, each budget and the mean ECE."""

    def diff(values: Sequence[Sequence[float]]) -> dict[str, float]:
        return paired({i: v[1] for i, v in enumerate(values)}, {i: v[0] for i, v in enumerate(values)})

    out = {"area": diff([r["area"] for r in runs]), "test_ece": diff([r["test_ece"] for r in runs])}
    for budget in runs[0]["top1_at"]:
        out[f"top1_at_{budget}"] = diff([r["top1_at"][budget] for r in runs])
    return out


def cell(d: dict[str, float]) -> str:
    return f"{d['mean']:+.2f} ± {d['ci95']:.2f} (p {d['p_value']:.3f}, n={d['n']})"


def markdown(result: dict[str, Any]) -> str:
    lines = header("Per-exit temperature calibration: budgeted curves with and without", result["command"],
                   result["environment"])  # fmt: skip
    lines += [
        f"Criterion `{result['criterion']}`; thresholds fitted on validation in both curves, temperatures fitted on "
        "validation before them; test figures. Area: mean test top-1 over the MACs range both curves cover. "
        "Budgets: fractions of the last exit's MACs. ECE: mean over the exits, percent.",
        "",
        "| run | area raw | area calibrated | "
        + " | ".join(f"top-1 at {b} raw / cal" for b in result["budgets"])
        + " | test ECE before / after | temperatures |",
        "| --- | --- | --- | " + "--- | " * len(result["budgets"]) + "--- | --- |",
    ]
    for r in result["runs"]:
        at = " | ".join(f"{r['top1_at'][b][0]:.2f} / {r['top1_at'][b][1]:.2f}" for b in result["budgets"])
        temps = ", ".join(f"{t:.2f}" for t in r["temperatures"])
        lines.append(f"| {r['run']} | {r['area'][0]:.2f} | {r['area'][1]:.2f} | {at} | "
                     f"{r['test_ece'][0]:.2f} / {r['test_ece'][1]:.2f} | {temps} |")  # fmt: skip
    lines += ["", "Calibrated − raw, paired by run (95 % interval):", "", "| figure | difference |", "| --- | --- |"]
    lines += [f"| {name} | {cell(d)} |" for name, d in result["differences"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished multi-exit run directories")
    parser.add_argument("--criterion", choices=sorted(CONFIDENCE), default=PLOTTED_CRITERION)
    parser.add_argument("--out", default=STEM, help="results file stem")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        print(f"error: no run directory {missing[0]}; train it first (e.g. python benchmarks/anytime.py "
              "--preset cpu)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        runs = [measure_run(r, args.criterion) for r in args.runs]
    except DynsilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "command": command_line(__file__, argv),
        "environment": environment(),
        "criterion": args.criterion,
        "budgets": list(runs[0]["top1_at"]),
        "runs": runs,
        "differences": paired_differences(runs),
    }
    out = write_results(args.out, result, markdown(result), args.results_dir)
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
