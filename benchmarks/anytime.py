"""Does SiLa help? Anytime prediction over seeds, with intervals, paired tests and the generalisation gap.

    python benchmarks/anytime.py --preset cpu        # small MSDNet on ../shared/data/cifar10_dev.npz, ~1 hour
    python benchmarks/anytime.py --preset paper      # CIFAR-100 MSDNet b7, 300 epochs per run: GPUs

Trains every method of the grid on every seed (same data split, schedule and architecture), evaluates each
deploy model, and writes benchmarks/results/anytime_<dataset>.{json,md,png}. Finished runs under
runs/anytime_<dataset>/ are reused, so an interrupted benchmark continues where it stopped.

Methods: baseline; SiLa with the twin head on features, on logits, and with the joint softmax; DML (2 peers);
SiLa + DML. For DML runs the statistics use peer 0 (peers are exchangeable; both are in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from dynsila.checkpoint import atomic_write, atomic_write_text
from dynsila.config import load_config
from dynsila.data import ArrayDataset, build_splits, make_loader
from dynsila.errors import DynsilaError
from dynsila.evaluate import EVAL_FILE, collect_logits, json_safe, topk_accuracy
from dynsila.rundir import DEPLOY, load_deploy_model
from dynsila.train import train

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

METHODS: dict[str, list[str]] = {
    "baseline": ["sila.enabled=false"],
    "sila_features": ["sila.enabled=true", "sila.attach=features", "sila.softmax=separate"],
    "sila_logits": ["sila.enabled=true", "sila.attach=logits", "sila.softmax=separate"],
    "sila_joint": ["sila.enabled=true", "sila.attach=features", "sila.softmax=joint"],
    "dml": ["sila.enabled=false", "dml.peers=2"],
    "sila_dml": ["sila.enabled=true", "sila.attach=features", "sila.softmax=separate", "dml.peers=2"],
}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "dataset": "cifar10_dev",
        "config": "configs/cifar10_dev/msdnet_sila.yaml",
        "needs": "../shared/data/cifar10_dev.npz",
        "overrides": [
            "train.epochs=10",
            "train.schedule=cosine",
            "train.eval_test_every_epoch=false",
            "train.log_every=100000",
        ],
        "seeds": [0, 1, 2],
    },
    "paper": {
        "dataset": "cifar100",
        "config": "configs/cifar100/msdnet_sila.yaml",
        "needs": "data/cifar-100-python",
        "overrides": ["train.eval_test_every_epoch=false"],
        "seeds": [0, 1, 2],
    },
}


# --- running the grid ---------------------------------------------------------------------------------------


def run_dirs(run_dir: Path) -> list[Path]:
    """The deploy directories of a run: itself, or peer0, peer1, ... for DML."""
    return [run_dir] if (run_dir / DEPLOY).exists() else sorted(run_dir.glob("peer*"))


def train_or_reuse(config: Path, overrides: list[str], run_dir: Path) -> float:
    """Train the run unless it finished before; returns the seconds spent (0 when reused)."""
    dirs = run_dirs(run_dir)
    if dirs and all((d / EVAL_FILE).exists() for d in dirs):
        return 0.0
    cfg = load_config(config, [*overrides, f"out_dir={run_dir.parent}", f"name={run_dir.name}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir / "train.log").open("w") as log, contextlib.redirect_stdout(log):
        train(cfg, force=True)
    return time.perf_counter() - start


def clean_train_accuracy(deploy_dir: Path) -> list[float]:
    """Top-1 per exit on the training split without augmentation (for the generalisation gap); cached."""
    cache = deploy_dir / "train_top1.json"
    if cache.exists():
        return list(json.loads(cache.read_text()))
    model, cfg = load_deploy_model(deploy_dir)
    splits = build_splits(cfg.data)
    train_set = splits.train
    if not isinstance(train_set, ArrayDataset):
        raise DynsilaError("the generalisation gap needs an in-memory dataset (digits, cifar, npz)")
    clean = ArrayDataset(train_set.images, train_set.labels)
    accuracy = topk_accuracy(*collect_logits(model, make_loader(clean, 512, False), splits.mean, splits.std)).tolist()
    atomic_write_text(cache, json.dumps(accuracy))
    return accuracy


def collect(run_dir: Path) -> dict[str, Any]:
    peers = []
    for d in run_dirs(run_dir):
        report = json.loads((d / EVAL_FILE).read_text())
        peers.append({"eval": report, "train_top1_clean": clean_train_accuracy(d)})
    return {"run_dir": str(run_dir), "peers": peers}


# --- statistics ---------------------------------------------------------------------------------------------


def interval(values: np.ndarray) -> dict[str, float]:
    """Mean, sample std and the 95 % t-interval half-width over seeds."""
    n = len(values)
    std = float(np.std(values, ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": float(np.mean(values)), "std": std, "ci95": half}


def paired(values: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Paired difference to the baseline over seeds, with its 95 % interval and a paired t-test."""
    diff = values - baseline
    result = interval(diff)
    if len(diff) > 1 and np.std(diff) > 0:
        result["p_value"] = float(stats.ttest_rel(values, baseline).pvalue)
    else:
        result["p_value"] = math.nan
    return result


def anytime_area(macs: np.ndarray, accuracy: np.ndarray) -> float:
    """Mean accuracy over the exits' MACs range: trapezoid area under accuracy vs MACs, divided by the range."""
    if len(macs) == 1:
        return float(accuracy[0])
    return float(np.trapezoid(accuracy, macs) / (macs[-1] - macs[0]))


def budgeted_at(points: list[dict[str, Any]], grid: np.ndarray) -> np.ndarray:
    xs = np.array([p["avg_macs"] for p in points])
    ys = np.array([p["test_top1"] for p in points])
    order = np.argsort(xs)
    return np.interp(grid, xs[order], ys[order])


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method: per-exit intervals, anytime area, budgeted curve, generalisation gap, paired tests."""
    first = next(iter(runs.values()))[0]["peers"][0]["eval"]
    macs = np.array([e["macs_cumulative"] for e in first["exits"]], dtype=float)
    lo = max(min(p["avg_macs"] for p in _budget_points(r)) for rs in runs.values() for r in rs)
    hi = min(max(p["avg_macs"] for p in _budget_points(r)) for rs in runs.values() for r in rs)
    grid = np.linspace(lo, hi, 8)
    table: dict[str, dict[str, Any]] = {}
    for method, seeds in runs.items():
        test = np.array([[e["test_top1"] for e in r["peers"][0]["eval"]["exits"]] for r in seeds])  # S x K
        train_clean = np.array([r["peers"][0]["train_top1_clean"] for r in seeds])
        area = np.array([anytime_area(macs, t) for t in test])
        budget = np.array([budgeted_at(_budget_points(r), grid) for r in seeds])  # S x G
        table[method] = {
            "seeds": len(seeds),
            "test_top1": [interval(test[:, k]) for k in range(test.shape[1])],
            "anytime_area": interval(area),
            "budgeted_top1": [interval(budget[:, g]) for g in range(len(grid))],
            "budgeted_mean": interval(budget.mean(axis=1)),
            "gap": [interval(train_clean[:, k] - test[:, k]) for k in range(test.shape[1])],
            "gap_mean": interval((train_clean - test).mean(axis=1)),
            "_test": test,
            "_area": area,
            "_budget": budget.mean(axis=1),
            "_gap": (train_clean - test).mean(axis=1),
        }
    base = table["baseline"]
    for _method, row in table.items():
        row["vs_baseline"] = {
            "test_top1": [paired(row["_test"][:, k], base["_test"][:, k]) for k in range(row["_test"].shape[1])],
            "anytime_area": paired(row["_area"], base["_area"]),
            "budgeted_mean": paired(row["_budget"], base["_budget"]),
            "gap_mean": paired(row["_gap"], base["_gap"]),
        }
    for row in table.values():
        for key in [k for k in row if k.startswith("_")]:
            del row[key]
    return {"exit_macs": macs.tolist(), "budget_grid_macs": grid.tolist(), "methods": table}


def _budget_points(run: dict[str, Any]) -> list[dict[str, Any]]:
    curves = run["peers"][0]["eval"]["curves"]
    return next(c["points"] for c in curves if c.get("criterion") == "max_prob")


def verdict(row: dict[str, Any]) -> str:
    d = row["vs_baseline"]["anytime_area"]
    if math.isnan(d["ci95"]) or abs(d["mean"]) <= d["ci95"]:
        return "no difference beyond noise"
    return "better than the baseline" if d["mean"] > 0 else "worse than the baseline"


# --- reporting ----------------------------------------------------------------------------------------------


def fmt(i: dict[str, float], digits: int = 2) -> str:
    return f"{i['mean']:.{digits}f} ± {i['ci95']:.{digits}f}"


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    methods = s["methods"]
    k_exits = len(s["exit_macs"])
    lines = [
        f"# Anytime prediction on {payload['dataset']}: does SiLa help?",
        "",
        f"Command: `{payload['command']}`  ",
        f"Date: {payload['environment']['date']}; {payload['environment']['platform']}; torch "
        f"{payload['environment']['torch']}; wall time {payload['wall_seconds'] / 60:.1f} min "
        f"({payload['trained_seconds'] / 60:.1f} min of it training in this invocation)",
        "",
        f"Setup: `{payload['config']}` with overrides `{' '.join(payload['overrides'])}`; seeds "
        f"{payload['seeds']}; identical data split, schedule and architecture for every method. "
        "Test top-1 in %, mean ± 95 % t-interval half-width over seeds. MACs = multiply-accumulates of the deploy "
        "model (training-only heads pruned), as evaluated. DML rows report peer 0.",
        "",
        "## Verdict",
        "",
        "Anytime area = mean test top-1 over the exits' MACs range (trapezoid). Difference to the baseline paired "
        "by seed; 'beyond noise' means the 95 % interval of the paired difference excludes 0.",
        "",
        "| method | anytime area | Δ vs baseline | p (paired t) | budgeted mean | Δ budgeted | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in methods.items():
        d, b = row["vs_baseline"]["anytime_area"], row["vs_baseline"]["budgeted_mean"]
        lines.append(
            f"| {name} | {fmt(row['anytime_area'])} | {fmt(d)} | {d['p_value']:.3f} | "
            f"{fmt(row['budgeted_mean'])} | {fmt(b)} | {verdict(row) if name != 'baseline' else '-'} |"
        )
    lines += [
        "",
        "## Test top-1 per exit",
        "",
        "| method | " + " | ".join(f"exit {k + 1} ({m / 1e6:.2f}M)" for k, m in enumerate(s["exit_macs"])) + " |",
        "| --- " * (k_exits + 1) + "|",
    ]
    for name, row in methods.items():
        lines.append(f"| {name} | " + " | ".join(fmt(i) for i in row["test_top1"]) + " |")
    lines += [
        "",
        "## Paired difference to the baseline per exit (points; p of the paired t-test)",
        "",
        "| method | " + " | ".join(f"exit {k + 1}" for k in range(k_exits)) + " |",
        "| --- " * (k_exits + 1) + "|",
    ]
    for name, row in methods.items():
        if name == "baseline":
            continue
        cells = [f"{fmt(d)} (p {d['p_value']:.2f})" for d in row["vs_baseline"]["test_top1"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Budgeted batch classification (max_prob thresholds fitted on val), test top-1 at matched average MACs",
        "",
        "| method | " + " | ".join(f"{m / 1e6:.2f}M" for m in s["budget_grid_macs"]) + " |",
        "| --- " * (len(s["budget_grid_macs"]) + 1) + "|",
    ]
    for name, row in methods.items():
        lines.append(f"| {name} | " + " | ".join(fmt(i, 1) for i in row["budgeted_top1"]) + " |")
    lines += [
        "",
        "## Generalisation: train (clean, no augmentation) minus test top-1, mean over exits",
        "",
        "| method | gap | Δ vs baseline | p |",
        "| --- | --- | --- | --- |",
    ]
    for name, row in methods.items():
        d = row["vs_baseline"]["gap_mean"]
        lines.append(f"| {name} | {fmt(row['gap_mean'])} | {fmt(d)} | {d['p_value']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = payload["summary"]
    macs = np.array(s["exit_macs"]) / 1e6
    grid = np.array(s["budget_grid_macs"]) / 1e6
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for i, (name, row) in enumerate(s["methods"].items()):
        mean = [x["mean"] for x in row["test_top1"]]
        ci = [x["ci95"] for x in row["test_top1"]]
        offset = (i - len(s["methods"]) / 2) * 0.01 * (macs[-1] - macs[0])  # side by side error bars
        ax1.errorbar(macs + offset, mean, yerr=ci, marker="o", capsize=3, label=name, color=f"C{i}")
        ax2.plot(grid, [x["mean"] for x in row["budgeted_top1"]], "-", label=name, color=f"C{i}")
    ax1.set_title("anytime prediction (mean ± 95 % CI over seeds)")
    ax2.set_title("budgeted batch classification (mean over seeds)")
    for ax in (ax1, ax2):
        ax.set_xlabel("MACs per image (millions)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"{payload['dataset']}: {payload['seeds']} seeds", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--extra", nargs="*", default=[], help="further config overrides for every run")
    parser.add_argument("--config", type=Path, help="train this config instead of the preset's (same grid)")
    parser.add_argument("--runs-root", type=Path, default=Path("runs"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if "baseline" not in args.methods:
        args.methods = ["baseline", *args.methods]
    config = args.config or REPO / preset["config"]
    needs = Path(preset["needs"])
    if args.config is None and not needs.exists():
        print(
            f"error: --preset {args.preset} needs {needs} (relative to the repository root, where this runs); "
            f"{'see ../shared/data/README.md' if args.preset == 'cpu' else 'download CIFAR-100 into data/'}",
            file=sys.stderr,
        )
        return 2
    seeds = args.seeds or preset["seeds"]
    overrides = [*preset["overrides"], *args.extra]
    command = "python benchmarks/anytime.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    start, trained = time.perf_counter(), 0.0
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for method in args.methods:
            for seed in seeds:
                run_dir = args.runs_root / f"anytime_{preset['dataset']}" / f"{method}_seed{seed}"
                spent = train_or_reuse(config, [*overrides, *METHODS[method], f"seed={seed}"], run_dir)
                trained += spent
                runs.setdefault(method, []).append(collect(run_dir))
                print(f"{method} seed {seed}: " + (f"trained in {spent:.0f} s" if spent else "reused"), flush=True)
    except DynsilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    payload = {
        "command": command,
        "dataset": preset["dataset"],
        "config": str(args.config or preset["config"]),
        "overrides": overrides,
        "seeds": seeds,
        "environment": {
            "date": datetime.date.today().isoformat(),
            "platform": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
        },
        "wall_seconds": time.perf_counter() - start,
        "trained_seconds": trained,
        "summary": summarise(runs),
        "runs": runs,
    }
    out = args.results_dir / f"anytime_{preset['dataset']}"
    atomic_write_text(out.with_suffix(".json"), json.dumps(json_safe(payload), indent=1))
    atomic_write_text(out.with_suffix(".md"), markdown(payload))
    plot(payload, out.with_suffix(".png"))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
