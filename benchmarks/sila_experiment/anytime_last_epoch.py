"""Secondary analysis of the SiLa experiment: the same comparisons with every run evaluated at its last epoch.

    python benchmarks/sila_experiment/anytime_last_epoch.py              # evaluate what has a checkpoint, then report
    python benchmarks/sila_experiment/anytime_last_epoch.py --report-only

The experiment's protocol (``benchmarks/anytime.py``) evaluates each run at its best-validation epoch, chosen on
2,000 images. That choice is itself noisy: a run whose validation score peaks early is reported at an
under-trained epoch, and the paired differences widen. This script asks how much of the spread that costs, by
evaluating each run's ``last.pt`` (the final epoch of the same cosine schedule) on the same test split.

It needs the checkpoints, which are never committed: runs trained on another machine are left out, and the
report says which. Each evaluated run leaves a small JSON under
``benchmarks/results/anytime_<dataset>/last_epoch/`` (committed), and the report is recomputed from those files.
The primary verdict stays with the pre-registered protocol; this is a diagnostic for the next design.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python benchmarks/sila_experiment/anytime_last_epoch.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks.sila_experiment.anytime import DEFAULT_PLAN, RunSpec, deploy_dirs, load_runs
from benchmarks.sila_experiment.anytime_markdown import diff_cell, table
from benchmarks.sila_experiment.anytime_report import peer0, references
from benchmarks.sila_experiment.paired_stats import paired
from benchmarks.sila_experiment.plan import load_plan
from benchmarks.toolkit import REPO_ROOT, RESULTS_DIR, anytime_area, command_line
from dynsila.data import build_splits, make_loader
from dynsila.evaluation.evaluate import collect_logits, topk_accuracy
from dynsila.runs.checkpoint import atomic_write_text, load_checkpoint, load_weights
from dynsila.runs.rundir import LAST, load_deploy_model

DATASET = "cifar10_dev2"


def last_epoch_test_top1(run_dir: Path) -> tuple[list[float], int]:
    """Test top-1 per exit of peer 0's deploy model with the weights of ``last.pt``, and that epoch."""
    model, cfg = load_deploy_model(deploy_dirs(run_dir)[0])
    checkpoint = load_checkpoint(run_dir / LAST)
    saved, wanted = checkpoint["model"], list(model.state_dict())
    # peer 0 of the training ensemble; a SiLa run wraps the network (``.model``) beside its training-only heads
    prefix = next((p for p in ("peers.0.model.", "peers.0.") if all(p + k in saved for k in wanted)), "peers.0.")
    load_weights(model, {k: saved[prefix + k] for k in wanted if prefix + k in saved}, run_dir / LAST)
    splits = build_splits(cfg.data)
    loader = make_loader(splits.test, 512, False)
    return topk_accuracy(*collect_logits(model, loader, splits.mean, splits.std)).tolist(), int(checkpoint["epoch"])


def evaluate_missing(runs: list[dict[str, Any]], runs_root: Path, out_dir: Path) -> None:
    """Evaluate every run that has a checkpoint here and no last-epoch file yet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        name = RunSpec(run["method"], run["seed"]).name
        target = out_dir / f"{name}.json"
        if target.exists():
            continue
        run_dir = runs_root / name
        if not (run_dir / LAST).exists():
            continue
        top1, epoch = last_epoch_test_top1(run_dir)
        if epoch != run["epochs"]:  # a checkpoint of another training than the run file's
            print(f"{name}: last.pt is epoch {epoch}, the run file's training had {run['epochs']}; left out")
            continue
        record = {"method": run["method"], "seed": run["seed"], "epoch": epoch, "test_top1": top1}
        atomic_write_text(target, json.dumps(record, indent=1) + "\n")
        print(f"{name}: epoch {epoch}, test top-1 per exit {[round(a, 2) for a in top1]}", flush=True)


def areas(runs: list[dict[str, Any]], last: dict[tuple[str, int], dict[str, Any]]) -> dict[str, dict]:
    """Per method and seed, the anytime area at the best-validation epoch and at the last epoch."""
    out: dict[str, dict] = {}
    for run in runs:
        key = (run["method"], run["seed"])
        if key not in last:
            continue
        macs = np.array(peer0(run)["exit_macs"], dtype=float)
        row = out.setdefault(run["method"], {"best": {}, "last": {}})
        row["best"][run["seed"]] = anytime_area(macs, np.array(peer0(run)["test_top1"]))
        row["last"][run["seed"]] = anytime_area(macs, np.array(last[key]["test_top1"]))
    return out


def comparisons(by_method: dict[str, dict]) -> list[dict[str, Any]]:
    """The regime-1 plan's all-pairs comparisons (``anytime_report.references``), paired over the seeds that
    have last-epoch files, under both model-selection rules."""
    plan = load_plan(DEFAULT_PLAN)
    rows = []
    for name in by_method:
        for ref in references(plan, name, by_method):
            if not set(by_method[name]["last"]) & set(by_method[ref]["last"]):
                continue  # no seed both have here
            rows.append({
                "method": name,
                "reference": ref,
                **{rule: paired(by_method[name][rule], by_method[ref][rule]) for rule in ("best", "last")},
            })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], left_out: list[str], command: str) -> str:
    lines = [
        "# SiLa experiment, secondary analysis: best-validation epoch vs last epoch",
        "",
        f"`{command}`. Paired differences in anytime area (test top-1, 10,000 images), 95 % t-interval, over the "
        "seeds whose checkpoints were on the machine that ran this. **Diagnostic only**: the verdict uses the "
        "pre-registered best-validation protocol (`anytime_cifar10_dev2.md`).",
        "",
        *table(
            ["method", "vs", "best-validation epoch", "last epoch"],
            [[r["method"], r["reference"], diff_cell(r["best"]), diff_cell(r["last"])] for r in rows],
        ),
        "",
        f"Runs without a checkpoint here (left out): {', '.join(left_out) if left_out else 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="no evaluation; report from the files")
    parser.add_argument("--runs-root", type=Path, default=REPO_ROOT / "runs" / f"anytime_{DATASET}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = RESULTS_DIR / f"anytime_{DATASET}"
    runs = load_runs(results)
    out_dir = results / "last_epoch"
    if not args.report_only:
        evaluate_missing(runs, args.runs_root, out_dir)
    last = {}
    for path in sorted(out_dir.glob("*.json")):
        record = json.loads(path.read_text())
        last[(record["method"], record["seed"])] = record
    left_out = sorted(RunSpec(r["method"], r["seed"]).name for r in runs if (r["method"], r["seed"]) not in last)
    text = markdown(comparisons(areas(runs, last)), left_out, command_line(__file__, argv))
    atomic_write_text(RESULTS_DIR / f"anytime_{DATASET}_last_epoch.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
