"""Accuracy versus MACs for trained runs: anytime exits (markers) and budgeted curves (lines).

    python benchmarks/flops_vs_acc.py                      # every run under runs/; trains the digits pair if none
    python benchmarks/flops_vs_acc.py --runs runs/a runs/b --out flops_vs_acc_cifar10_dev --save

Prints the comparison; writes <out>.{json,md,png} only when asked: to benchmarks/results/ with ``--save``, or to
the folder ``--results-dir`` names. A gated run (SkipNet: one exit, no exit thresholds) is left out with a
line saying so (``benchmarks/accuracy/skipnet_hrl.py`` compares those). Each run is evaluated from its deploy
weights (training-only heads pruned) with ``dynsila.evaluate``; an up-to-date ``eval.json`` in the run directory is
reused.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import (
    PLOTTED_CRITERION,
    REPO_ROOT,
    RESULTS_DIR,
    accuracy_at,
    budget_points,
    command_line,
    environment,
    header,
    save_figure,
    schedule_text,
    write_results,
)
from dynsila.cli import USER_ERRORS, OneLineParser, fail, plain_name
from dynsila.config import load_config
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import EVAL_FILE, MACS_UNITS, evaluate_run
from dynsila.evaluation.report import EvalReport
from dynsila.runs.rundir import DEPLOY, read_run_config
from dynsila.training.train import train

DEFAULT_CONFIGS = ("configs/msdnet_baseline.yaml", "configs/msdnet_sila.yaml")
MATCHED_BUDGETS = 5  # budgets compared across runs, evenly spaced over the MACs range every run covers


def find_runs(root: Path) -> list[Path]:
    """Every deploy model under ``root``: runs, and each peer of a DML run (runs/<name>/peer<i>/)."""
    return sorted(p.parent for p in root.rglob(DEPLOY))


def report_for(run_dir: Path) -> EvalReport:
    """The run's evaluation, recomputed unless eval.json is newer than the deploy weights."""
    eval_path, deploy = run_dir / EVAL_FILE, run_dir / DEPLOY
    if eval_path.exists() and eval_path.stat().st_mtime >= deploy.stat().st_mtime:
        try:
            return EvalReport.from_json(eval_path.read_text())
        except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, or not a report: recomputed once removed
            raise DynsilaError(f"{eval_path} is not JSON; delete it (it is recomputed) and run again") from None
    return evaluate_run(run_dir)


def comparable(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries with a budgeted curve to compare (a gated network has none); the rest named in a printed line."""
    kept = []
    for e in entries:
        if e["report"].budgeted(PLOTTED_CRITERION) is None:
            print(f"left out {e['report'].run}: a gated network (one exit, no exit thresholds) has no budgeted "
                  "curve; compare SkipNet runs with python benchmarks/accuracy/skipnet_hrl.py")  # fmt: skip
        else:
            kept.append(e)
    if not kept:
        raise DynsilaError("none of the runs has exit thresholds to compare (gated networks only); pass --runs "
                           "with multi-exit runs")  # fmt: skip
    return kept


def run_setup(run_dir: Path) -> dict[str, Any]:
    cfg = read_run_config(run_dir)
    return {
        "model": cfg.model,
        "data": {"name": cfg.data.name, "root": cfg.data.root, "image_size": cfg.data.image_size},
        "seed": cfg.seed,
        "epochs": cfg.train.epochs,
        "schedule": f"{cfg.train.optimizer} lr {cfg.train.lr} {schedule_text(cfg.train)}, "
        f"batch {cfg.data.batch_size}, wd {cfg.train.weight_decay}",
        "sila": vars(cfg.sila),
    }


def markdown(command: str, entries: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        *header("Accuracy versus MACs", command, env),
        f"Units: {MACS_UNITS}. Test top-1 in %. Budgeted rows: thresholds fitted on the validation split "
        f"({PLOTTED_CRITERION} criterion), applied to test.",
        "",
        "## Runs",
        "",
        "| run | model | data | seed | epochs | schedule | SiLa |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        s = e["setup"]
        sila = (
            "off" if not s["sila"]["enabled"] else ", ".join(f"{k}={v}" for k, v in s["sila"].items() if k != "enabled")
        )
        lines.append(
            f"| {e['report'].run} | {s['model']['name']} | {s['data']['name']} | {s['seed']} | "
            f"{s['epochs']} | {s['schedule']} | {sila} |"
        )
    lines += ["", "## Anytime prediction (test top-1 per exit)", ""]
    names = [e["report"].run for e in entries]
    first = entries[0]["report"].exits
    lines += ["| exit | MACs (as evaluated) | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
    for k, exit_row in enumerate(first):
        accs = []
        for e in entries:
            exits = e["report"].exits
            accs.append(f"{exits[k].test_top1:.2f}" if k < len(exits) else "-")
        lines.append(f"| {k + 1} | {exit_row.macs_cumulative / 1e6:.2f}M | " + " | ".join(accs) + " |")
    lines += ["", "## Budgeted batch classification at matched budgets (interpolated)", ""]
    lo = max(min(p["avg_macs"] for p in budget_points(e["report"])) for e in entries)
    hi = min(max(p["avg_macs"] for p in budget_points(e["report"])) for e in entries)
    lines += ["| avg MACs | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for macs in np.linspace(lo, hi, MATCHED_BUDGETS) if hi > lo else []:
        matched = [float(accuracy_at(budget_points(e["report"]), macs)) for e in entries]
        lines.append(
            f"| {macs / 1e6:.2f}M | " + " | ".join("-" if math.isnan(a) else f"{a:.2f}" for a in matched) + " |"
        )
    for e in entries:
        lines += [
            "",
            f"## {e['report'].run}: budgeted sweep ({PLOTTED_CRITERION})",
            "",
            "| q | avg MACs | test top-1 | val top-1 | exit fractions (test) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for p in budget_points(e["report"])[::2]:
            fractions = " ".join(f"{f:.2f}" for f in p["exit_fractions"])
            lines.append(
                f"| {p['q']:.2f} | {p['avg_macs'] / 1e6:.2f}M | {p['test_top1']:.2f} | "
                f"{p['val_top1']:.2f} | {fractions} |"
            )
    return "\n".join(lines) + "\n"


def plot(entries: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, e in enumerate(entries):
        color = f"C{i}"
        report = e["report"]
        exits = report.exits
        ax.plot(
            [x.macs_cumulative / 1e6 for x in exits],
            [x.test_top1 for x in exits],
            "o",
            color=color,
            markersize=6,
            label=f"{report.run}: anytime exits",
        )
        for curve in report.curves:
            if curve.kind == "budgeted" and curve.criterion != PLOTTED_CRITERION:
                continue
            pts = sorted(curve.points, key=lambda p: p.avg_macs)
            ax.plot(
                [p.avg_macs / 1e6 for p in pts],
                [p.test_top1 for p in pts],
                "-",
                color=color,
                linewidth=1.5,
                label=f"{report.run}: {curve.name}",
            )
    ax.set_xlabel("MACs per image (millions, multiply-accumulates, conv+linear)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python benchmarks/flops_vs_acc.py", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, help="run directories (default: every run under runs/)")
    parser.add_argument("--out", type=plain_name, default="flops_vs_acc", help="result name under benchmarks/results/")
    parser.add_argument("--title", default="Accuracy vs MACs (deploy models)")
    parser.add_argument("--save", action="store_true", help="write <out>.{json,md,png} to benchmarks/results/")
    parser.add_argument("--results-dir", type=Path, help="write <out>.{json,md,png} to this folder instead")
    args = parser.parse_args(argv)
    command = command_line(__file__, argv)
    try:
        runs = args.runs or find_runs(Path("runs"))
        if not runs:
            print("no runs under runs/: training the embedded-data pair first (about 2 minutes)", flush=True)
            runs = [train(load_config(REPO_ROOT / c)).run_dir for c in DEFAULT_CONFIGS]
        entries = comparable([{"report": report_for(r), "setup": run_setup(r)} for r in runs])
    except USER_ERRORS as e:
        return fail(e)
    env = environment()
    runs_json = [{"report": e["report"].to_dict(), "setup": e["setup"]} for e in entries]
    payload = {"command": command, "environment": env, "units": MACS_UNITS, "runs": runs_json}
    md = markdown(command, entries, env)
    print(md)
    if not (args.save or args.results_dir):
        print(f"not saved; pass --save to write benchmarks/results/{args.out}.{{json,md,png}}, or --results-dir DIR")
        return 0
    out = write_results(args.out, payload, md, args.results_dir or RESULTS_DIR)
    plot(entries, out.with_suffix(".png"), args.title)
    print(f"wrote {out}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
