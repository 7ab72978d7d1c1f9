"""Every exit policy's budgeted curve on trained runs, from their per-exit validation and test logits, paired by seed.

    python benchmarks/accuracy/exit_policies.py --runs runs/anytime_cifar10_dev2/*_seed1[0-4]
    python benchmarks/accuracy/exit_policies.py --runs R1 R2 --policies quotas patience risk --out exit_policies

Re-evaluates each run's deploy model once (its ``eval.json`` is not touched; ``--cache DIR`` keeps the logits
there, outside the repository, for a rerun), fits every policy of ``dynsila.policies`` on validation for the
budgets the quota policy reaches at MSDNet's 39 exit distributions (the risk policy: for a grid of risk levels)
and applies it to test. Runs are grouped by method (the directory name before ``_seed<N>``) and paired by seed.
Per method and policy: the mean test top-1 over the MACs range every budget policy of every run of the method
covers (mean and 95 % t-interval over seeds) and its paired difference to ``quotas``. For the risk policy: the
realised test risk at ``--levels`` for both bounds (``ltt`` with ``--delta``, ``crc``) on each run's own split
and on ``--resplits`` random calibration/test re-splits of its pooled validation and test logits. Writes
``benchmarks/results/<out>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import RESULTS_DIR, command_line, environment, header, save_figure, write_results
from dynsila.policies.base import as_array
from dynsila.policies.risk import BOUNDS, RiskControl, sample_losses
from dynsila.policies.rules import make_rule, trace
from dynsila.policies.sweep import PolicyPoint, all_curves
from dynsila.policies.table import POLICIES

Split = tuple[np.ndarray, np.ndarray]  # logits N x K x C, labels N
Curves = dict[str, list[PolicyPoint]]


# --- logits -------------------------------------------------------------------------------------------------


def method_seed(run: Path) -> tuple[str, int]:
    """``sila_imta_seed12`` -> (``sila_imta``, 12); a name without a seed is its own method, seed 0."""
    match = re.fullmatch(r"(.+)_seed(\d+)", run.name)
    return (match.group(1), int(match.group(2))) if match else (run.name, 0)


def run_logits(run: Path, device: str, macs: str, cache: Path | None) -> tuple[Split, Split, list[float]]:
    """A run's validation and test logits and labels and its per-exit costs, from ``cache`` when kept there."""
    file = cache / f"{run.name}_{macs}.npz" if cache else None
    if file is not None and file.exists():
        z = np.load(file)
        return (z["val_x"], z["val_y"]), (z["test_x"], z["test_y"]), z["costs"].tolist()
    from dynsila.evaluation.evaluate import run_logits as evaluate_logits  # torch only when evaluating

    val, test, costs = evaluate_logits(run, device)
    per_exit = [c.macs_lazy if macs == "lazy" else c.macs_cumulative for c in costs]
    v, t = ((as_array(s[0], np.float32), as_array(s[1], np.int64)) for s in (val, test))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(file, val_x=v[0], val_y=v[1], test_x=t[0], test_y=t[1], costs=np.array(per_exit))
    return v, t, per_exit


# --- curves and their paired summary ------------------------------------------------------------------------


def mean_top1(points: list[PolicyPoint], low: float, high: float) -> float | None:
    """Test top-1 averaged over [low, high] MACs, linear between points; None where the curve does not span it."""
    macs = np.array([p.avg_macs for p in points])
    top1 = np.array([p.test_top1 for p in points])
    tolerance = 1e-9 * max(abs(high), 1.0)
    if high <= low or macs.min() > low + tolerance or macs.max() < high - tolerance:
        return None
    order = np.argsort(macs)
    grid = np.linspace(low, high, 201)
    return float(np.interp(grid, macs[order], top1[order]).mean())


def shared_range(curves: Sequence[Curves]) -> tuple[float, float]:
    """The MACs range every budget policy's curve of every run covers."""
    budgeted = [c for run in curves for n, c in run.items() if POLICIES[n].target == "budget"]
    if not budgeted:
        return 0.0, 0.0
    return max(min(p.avg_macs for p in c) for c in budgeted), min(max(p.avg_macs for p in c) for c in budgeted)


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and the half-width of its two-sided t-interval (None below two values)."""
    x = np.asarray(values, dtype=np.float64)
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None
    return {"mean": float(x.mean()) if len(x) else None, "half_width": half, "n": len(x)}


def method_summary(by_seed: dict[int, Curves]) -> dict[str, Any]:
    """Per policy: mean top-1 over the method's shared range per seed, over seeds, and paired against quotas."""
    low, high = shared_range(list(by_seed.values()))
    policies: dict[str, Any] = {}
    for name in next(iter(by_seed.values())):
        areas = {s: mean_top1(c[name], low, high) for s, c in by_seed.items()}
        row: dict[str, Any] = {"per_seed": areas}
        if all(a is not None for a in areas.values()):
            row["top1"] = t_interval([a for a in areas.values() if a is not None])
            if "quotas" in by_seed[next(iter(by_seed))]:
                diffs = {s: a - mean_top1(by_seed[s]["quotas"], low, high) for s, a in areas.items() if a is not None}  # type: ignore[operator]
                row["vs_quotas_per_seed"], row["vs_quotas"] = diffs, t_interval(list(diffs.values()))
        policies[name] = row
    return {"macs_range": [low, high], "seeds": sorted(by_seed), "policies": policies}


# --- risk policy: realised risk on the run's split and on random re-splits -----------------------------------


def risk_losses(logits: np.ndarray, labels: np.ndarray, risk: str = "disagreement") -> np.ndarray:
    """The risk policy's per-sample losses (``grid x N``), exactly as ``RiskControl.fit`` builds them."""
    k = logits.shape[1]
    rule = make_rule({"policy": "risk", "rule": "confidence", "thresholds": [0.0] * k})
    scores, predictions = trace(rule, as_array(logits))
    return sample_losses(scores, predictions, labels, risk)


def realised_risk(losses: np.ndarray, calibration: np.ndarray, bound: str, epsilon: float, delta: float) -> float:
    """Test risk (mean loss outside ``calibration``) of the threshold the bound picks on ``calibration``."""
    i = RiskControl(bound=bound, delta=delta).choose(losses[:, calibration], epsilon)
    test = np.ones(losses.shape[1], dtype=bool)
    test[calibration] = False
    return float(losses[i, test].mean())


def risk_coverage(
    val: Split, test: Split, levels: Sequence[float], delta: float, resplits: int, seed: int
) -> dict[str, Any]:
    """Per bound and level: the risk on the run's own split and on ``resplits`` random re-splits (same sizes)."""
    losses = risk_losses(np.concatenate([val[0], test[0]]), np.concatenate([val[1], test[1]]))
    n_val, n = len(val[1]), losses.shape[1]
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(n)[:n_val] for _ in range(resplits)]
    out: dict[str, Any] = {}
    for bound in BOUNDS:
        for eps in levels:
            risks = [realised_risk(losses, s, bound, eps, delta) for s in splits]
            out[f"{bound}@{eps:g}"] = {"own_split": realised_risk(losses, np.arange(n_val), bound, eps, delta),
                                       "resplits": risks}  # fmt: skip
    return out


def coverage_summary(coverage: dict[int, dict[str, Any]], levels: Sequence[float]) -> dict[str, Any]:
    """Per bound and level over a method's seeds: own-split risks, runs over epsilon, re-split mean and share over."""
    out = {}
    for bound in BOUNDS:
        for eps in levels:
            key = f"{bound}@{eps:g}"
            own = {s: c[key]["own_split"] for s, c in coverage.items()}
            pooled = np.concatenate([c[key]["resplits"] for c in coverage.values()])
            out[key] = {"own_split": own, "runs_over": sum(r > eps for r in own.values()),
                        "resplit_mean_risk": float(pooled.mean()) if len(pooled) else None,
                        "resplit_share_over": float((pooled > eps).mean()) if len(pooled) else None,
                        "resplits": len(pooled)}  # fmt: skip
    return out


# --- report -------------------------------------------------------------------------------------------------


def _ci(summary: dict[str, Any] | None, sign: bool = False) -> str:
    if summary is None:
        return "-"
    mean = f"{summary['mean']:+.2f}" if sign else f"{summary['mean']:.2f}"
    half = summary["half_width"]
    return mean + (f" ± {half:.2f}" if half is not None else "")


def policy_table(method: str, summary: dict[str, Any]) -> list[str]:
    low, high = summary["macs_range"]
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [
        f"### {method} (seeds {seeds}; MACs {low / 1e6:.2f}M–{high / 1e6:.2f}M)",
        "",
        "| policy | mean test top-1 over the range (± 95 % t) | − quotas, paired (± 95 % t) | per seed − quotas |",
        "|---|---|---|---|",
    ]
    for name, row in summary["policies"].items():
        per_seed = " ".join(f"{d:+.2f}" for d in row.get("vs_quotas_per_seed", {}).values()) or "-"
        top1 = _ci(row.get("top1")) if "top1" in row else "- (curve does not span the range)"
        lines.append(f"| {name} | {top1} | {_ci(row.get('vs_quotas'), sign=True)} | {per_seed} |")
    return lines


COVERAGE_NOTE = (
    "Re-splits: the run's validation and test logits pooled and split at random into a calibration set of the "
    "validation size and a test set of the rest. `ltt` promises P(risk > ε) ≤ δ, so its share over ε should stay "
    "≤ δ; `crc` promises E[risk] ≤ ε (its mean risk ≤ ε; its share over ε may be near one half)."
)


def coverage_table(method: str, summary: dict[str, Any]) -> list[str]:
    lines = [
        f"### {method}: risk policy (disagreement with the last exit)",
        "",
        "| bound | ε | own split: test risk per seed | runs over ε | re-splits: mean risk | re-splits: share over ε |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in summary.items():
        bound, eps = key.split("@")
        own = " ".join(f"{r:.4f}" for r in row["own_split"].values())
        share = f"{row['resplit_share_over']:.3f} of {row['resplits']}" if row["resplits"] else "not run"
        mean = f"{row['resplit_mean_risk']:.4f}" if row["resplits"] else "-"
        lines.append(f"| {bound} | {eps} | {own} | {row['runs_over']} of {len(row['own_split'])} | {mean} | {share} |")
    return [*lines, "", COVERAGE_NOTE]


def run_table(by_run: dict[str, Curves], summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Per run and policy: the mean test top-1 over its method's shared range, and the number of points."""
    lines = ["### per run", "", "| run | policy | mean test top-1 over the method's shared MACs range | points |",
             "|---|---|---|---|"]  # fmt: skip
    for run, curves in by_run.items():
        low, high = summaries[method_seed(Path(run))[0]]["macs_range"]
        for name, points in curves.items():
            area = mean_top1(points, low, high)
            lines.append(f"| {run} | {name} | {'-' if area is None else f'{area:.2f}'} | {len(points)} |")
    return lines


def mean_curve(curves: Sequence[list[PolicyPoint]], points: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' mean test top-1 on the MACs range all of them cover (linear between points)."""
    low = max(min(p.avg_macs for p in c) for c in curves)
    high = min(max(p.avg_macs for p in c) for c in curves)
    grid = np.linspace(low, high, points)
    ys = []
    for c in curves:
        macs, top1 = np.array([p.avg_macs for p in c]), np.array([p.test_top1 for p in c])
        order = np.argsort(macs)
        ys.append(np.interp(grid, macs[order], top1[order]))
    return grid, np.mean(ys, axis=0)


def plot(methods: dict[str, dict[int, Curves]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), sharey=True, squeeze=False)
    for ax, (method, by_seed) in zip(axes[0], methods.items(), strict=True):
        for name in next(iter(by_seed.values())):
            x, y = mean_curve([c[name] for c in by_seed.values()])
            ax.plot(x / 1e6, y, label=name, linestyle="--" if POLICIES[name].target == "epsilon" else "-")
        ax.set_title(f"{method} (mean of {len(by_seed)} seeds)")
        ax.set_xlabel("average MACs per test image (M)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# --- entry point --------------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True)
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    parser.add_argument("--macs", choices=("paper", "lazy"), default="paper")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", nargs="+", type=float, default=[0.02, 0.05, 0.1], help="risk levels checked")
    parser.add_argument("--delta", type=float, default=0.1, help="Learn then Test's delta for the coverage check")
    parser.add_argument("--resplits", type=int, default=200, help="random calibration/test re-splits per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-splits")
    parser.add_argument("--cache", type=Path, default=None, help="keep logits here (never in the repository)")
    parser.add_argument("--out", default="exit_policies")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    methods: dict[str, dict[int, Curves]] = {}
    by_run: dict[str, Curves] = {}
    coverage: dict[str, dict[int, dict[str, Any]]] = {}
    for run in args.runs:
        method, seed = method_seed(run)
        val, test, costs = run_logits(run, args.device, args.macs, args.cache)
        by_run[run.name] = methods.setdefault(method, {})[seed] = all_curves(val, test, costs, args.policies)
        if "risk" in args.policies:
            cov = risk_coverage(val, test, args.levels, args.delta, args.resplits, args.seed + seed)
            coverage.setdefault(method, {})[seed] = cov
        print(f"{run}: done", flush=True)
    summaries = {m: method_summary(dict(sorted(s.items()))) for m, s in methods.items()}
    covered = {m: coverage_summary(c, args.levels) for m, c in coverage.items()}
    env = environment(args.device)
    payload: dict[str, Any] = {
        "environment": env, "macs_convention": args.macs, "summary": summaries, "risk_coverage": covered,
        "settings": {"levels": args.levels, "delta": args.delta, "resplits": args.resplits, "seed": args.seed},
        "runs": {r: {n: [asdict(p) for p in c] for n, c in curves.items()} for r, curves in by_run.items()},
    }  # fmt: skip
    lines = [*header("Exit policies: budgeted curves, paired by seed", command_line(__file__, argv), env)]
    for m, s in summaries.items():
        lines += ["", *policy_table(m, s)]
    for m, c in covered.items():
        lines += ["", *coverage_table(m, c)]
    lines += ["", *run_table(by_run, summaries)]
    out = write_results(args.out, payload, "\n".join(lines), args.results_dir)
    if not args.no_plot:
        plot(methods, out.with_suffix(".png"))
    print("\n".join(lines) + f"\n\nwrote {out}.json, .md" + ("" if args.no_plot else " and .png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
