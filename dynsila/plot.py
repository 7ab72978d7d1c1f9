"""``python -m dynsila.plot RUN_DIR [RUN_DIR ...] [--out FILE.png]``: the training curves of runs and their accuracy
against MACs, in one PNG.

Three panels: the training loss per epoch; validation top-1 per exit per epoch (one colour per run, one line style
per exit); test top-1 against MACs from each run's ``eval.json``: every exit alone (points) and the budgeted
max_prob curve (a line), where the run has been evaluated. Several runs share the axes, so they compare at a
glance. The PNG is written atomically; an existing file is kept unless ``--force``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynsila.cli import USER_ERRORS, OneLineParser, fail
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import EVAL_FILE, read_report
from dynsila.evaluation.report import EvalReport
from dynsila.runs.checkpoint import atomic_write
from dynsila.runs.rundir import METRICS, read_metrics

EXIT_STYLES = ["-", "--", ":", "-."]


@dataclass
class RunCurves:
    """What the figure shows of one run."""

    name: str
    epochs: list[int]
    loss: list[float]
    val_top1: list[list[float]]  # per epoch, per exit
    report: EvalReport | None  # eval.json, when the run has been evaluated


def run_curves(run_dir: Path) -> RunCurves:
    """One run's metrics rows (the first network's, when several trained) and its evaluation if any."""
    rows = read_metrics(run_dir)
    if not rows:
        raise DynsilaError(f"{run_dir} has no {METRICS} rows; pass a run directory (runs/<name>) with a finished epoch")
    report = read_report(run_dir) if (run_dir / EVAL_FILE).is_file() else None
    return RunCurves(run_dir.name, [r["epoch"] for r in rows], [r["loss"] for r in rows],
                     [r["val_top1"] for r in rows], report)  # fmt: skip


def draw(runs: list[RunCurves]) -> Any:
    """The three-panel matplotlib figure (Agg: no display needed)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, val_ax, macs_ax) = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        loss_ax.plot(run.epochs, run.loss, ".-", color=colour, label=run.name)  # a point: one epoch shows too
        for k in range(len(run.val_top1[0])):
            style = "." + EXIT_STYLES[k % len(EXIT_STYLES)]
            val_ax.plot(run.epochs, [v[k] for v in run.val_top1], style, color=colour, label=f"{run.name} exit {k + 1}")
        if run.report is not None:
            draw_costs(macs_ax, run.report, run.name, colour)
    loss_ax.set(title="training loss", xlabel="epoch", ylabel="loss (sum of the terms)")
    val_ax.set(title="validation top-1 per exit", xlabel="epoch", ylabel="top-1 (%)")
    conventions = sorted({r.report.macs_convention for r in runs if r.report is not None})
    counted = f" (budgeted: {' / '.join(conventions)} convention)" if conventions else ""
    macs_ax.set(title="test top-1 against MACs (eval.json)", xlabel=f"MACs per image{counted}", ylabel="top-1 (%)")
    if not any(r.report for r in runs):
        macs_ax.text(0.5, 0.5, "no eval.json: run python -m dynsila.evaluate", ha="center", transform=macs_ax.transAxes)
    for ax in (loss_ax, val_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (loss_ax, val_ax, macs_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def draw_costs(ax: Any, report: EvalReport, name: str, colour: str) -> None:
    """Each exit alone as points, and the budgeted max_prob curve as a line, of one run."""
    ax.plot([e.macs_cumulative for e in report.exits], [e.test_top1 for e in report.exits], "o", color=colour,
            label=f"{name} exits")  # fmt: skip
    curve = report.budgeted("max_prob")
    if curve is not None:
        points = sorted((p.avg_macs, p.test_top1) for p in curve.points)
        ax.plot(*zip(*points, strict=True), "-", color=colour, label=f"{name} budgeted")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dynsila.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (runs/<name>)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = parser.parse_args(argv)
    try:
        if args.out.exists() and not args.force:
            raise DynsilaError(f"{args.out} exists; pass --force to overwrite it, or another --out")
        fig = draw([run_curves(run) for run in args.runs])
        atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=100))
    except USER_ERRORS as e:
        return fail(e)
    print(f"wrote {args.out} ({len(args.runs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
