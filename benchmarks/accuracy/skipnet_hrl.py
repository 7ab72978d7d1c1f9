"""SkipNet trained as its authors train it, on a CPU: supervised pre-training, then hybrid RL at several alphas.

    python benchmarks/accuracy/skipnet_hrl.py                       # SkipNet-20 on cifar10_dev, alpha 0.1 ... 1
    python benchmarks/accuracy/skipnet_hrl.py --alphas 0.25 1 --runs-dir runs/skipnet_hrl --reuse

Trains the SP run of ``--sp-config`` once and one HRL run of ``--hrl-config`` per alpha from it
(``train.init_from``; only ``loss.hrl_alpha`` differs between them), then measures every deploy model on the
test split at SkipNet's fixed gate threshold 0.5, skipped blocks not computed: test top-1, SkipNet's computation
% ((sum of gated blocks run + 1) / (G + 1)), dynsila's share of gated blocks run, and average MACs per image.
Checks the acceptance criteria set before the runs (the alphas give distinct points, the larger one runs fewer
blocks, none runs 10 % of the gated blocks or less, every HRL model runs fewer blocks than its SP model) and writes
benchmarks/results/skipnet_hrl.{json,md,png}. ``--reuse`` keeps finished runs instead of training them again.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import (
    RESULTS_DIR,
    command_line,
    environment,
    header,
    run_seconds,
    save_figure,
    schedule_text,
    verdict,
    write_results,
)
from dynsila.budget.flops import gated_costs
from dynsila.config import Config, load_config
from dynsila.console import log_lines_to
from dynsila.data import build_splits, dataset_size, make_loader, normalize
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import MACS_UNITS
from dynsila.methods.hrl import GateLossConfig
from dynsila.models import DynamicOutput
from dynsila.models.skipnet import skipnet_computation_percent
from dynsila.runs.rundir import DEPLOY, input_shape, load_deploy_model
from dynsila.training.train import train

STEM = "skipnet_hrl"
MIN_EXECUTED = 0.10  # a model running this share of the gated blocks or less has collapsed to skipping


@dataclass
class StagePoint:
    """One trained model at gate threshold 0.5 on the test split."""

    stage: str  # "sp" or "hrl"
    alpha: float | None  # HRL's skip reward (None for SP)
    run_dir: str
    test_top1: float
    val_top1: float
    skipnet_computation_percent: float  # SkipNet's definition: (sum of gated blocks run + 1) / (G + 1)
    executed_share: float  # dynsila's: mean share of the G gated blocks run
    executed_per_gate: list[float]  # share of test samples that run each gated block
    avg_macs: float  # per image, skipped blocks not computed
    train_seconds: float | None  # wall time of training and its evaluation (None: reused)
    train_cpu_seconds: float | None  # this process's CPU time over the same span


def train_stage(cfg: Config, reuse: bool) -> tuple[float | None, float | None]:
    """Train ``cfg`` (unless ``reuse`` and its deploy weights exist); (wall, CPU) seconds, or Nones if reused."""
    if reuse and (cfg.run_dir / DEPLOY).exists():
        print(f"reusing {cfg.run_dir}")
        return None, None
    cpu = time.process_time()
    wall = run_seconds(lambda: train(cfg, force=True))
    return wall, time.process_time() - cpu


@torch.no_grad()
def measure(run_dir: Path) -> dict[str, Any]:
    """Top-1 (val, test), gate decisions and MACs of a run's deploy model at threshold 0.5 (eval mode)."""
    model, cfg = load_deploy_model(run_dir)
    body = model.gated_body()
    if body is None:
        raise DynsilaError(f"{run_dir} holds a {cfg.model['name']}, not a gated network; pass SkipNet configs")
    body.threshold = 0.5  # SkipNet's fixed threshold: its trade-off knob is alpha, not the threshold
    splits, costs = build_splits(cfg.data), gated_costs(model, input_shape(cfg))
    result: dict[str, Any] = {}
    for split in ("val", "test"):
        hits, executed = 0, []
        for images, labels in make_loader(getattr(splits, split), cfg.data.eval_batch_size, shuffle=False):
            out = model(normalize(images, splits.mean, splits.std))
            assert isinstance(out, DynamicOutput)
            hits += int((out.logits[-1].argmax(1) == labels).sum())
            executed.append(torch.stack(out.gate_actions, dim=1))
        run = torch.cat(executed)
        result[split] = {"top1": 100.0 * hits / len(run), "executed": run, "macs": costs.per_sample(run)}
    return result


def stage_point(
    stage: str, alpha: float | None, run_dir: Path, seconds: tuple[float | None, float | None]
) -> StagePoint:
    m = measure(run_dir)
    executed = m["test"]["executed"]
    return StagePoint(
        stage=stage,
        alpha=alpha,
        run_dir=str(run_dir),
        test_top1=m["test"]["top1"],
        val_top1=m["val"]["top1"],
        skipnet_computation_percent=skipnet_computation_percent(executed),
        executed_share=float(executed.mean()),
        executed_per_gate=executed.mean(dim=0).tolist(),
        avg_macs=float(m["test"]["macs"].mean()),
        train_seconds=seconds[0],
        train_cpu_seconds=seconds[1],
    )


def acceptance(sp: StagePoint, hrl: Sequence[StagePoint]) -> list[dict[str, Any]]:
    """The acceptance checks, each with what was measured."""
    by_alpha = sorted(hrl, key=lambda p: p.alpha or 0.0)
    shares = [p.executed_share for p in by_alpha]
    labels = ", ".join(f"alpha {p.alpha:g}: {100 * p.executed_share:.1f} %" for p in by_alpha)
    collapsed = [f"{p.alpha:g}" for p in by_alpha if p.executed_share <= MIN_EXECUTED]
    return [
        {
            "check": "a larger alpha runs fewer gated blocks (distinct points)",
            "met": all(a > b for a, b in zip(shares, shares[1:], strict=False)),
            "measured": labels,
        },
        {
            "check": f"no model collapses: every one runs more than {100 * MIN_EXECUTED:.0f} % of the gated blocks",
            "met": not collapsed,
            "measured": labels + (f"; collapsed: alpha {', '.join(collapsed)}" if collapsed else ""),
        },
        {
            "check": "every HRL model runs fewer gated blocks than the SP model it started from",
            "met": all(s < sp.executed_share for s in shares),
            "measured": f"SP: {100 * sp.executed_share:.1f} %; {labels}",
        },
    ]


def passing_pairs(sp: StagePoint, hrl: Sequence[StagePoint]) -> list[tuple[float, float]]:
    """The pairs of alphas (smaller first) that meet all of the acceptance checks on their own."""
    return [
        (a.alpha or 0.0, b.alpha or 0.0)
        for a, b in itertools.combinations(sorted(hrl, key=lambda p: p.alpha or 0.0), 2)
        if all(c["met"] for c in acceptance(sp, [a, b]))
    ]


def markdown(
    command: str, env: dict[str, Any], setup: dict[str, Any], points: list[StagePoint], checks: list[dict[str, Any]]
) -> str:
    def seconds(p: StagePoint) -> str:
        return (
            "reused"
            if p.train_seconds is None
            else f"{p.train_seconds / 60:.1f} / {(p.train_cpu_seconds or 0) / 60:.1f}"
        )

    lines = [
        *header("SkipNet: supervised pre-training, then hybrid RL at several alphas", command, env),
        f"Setup: {setup['description']}",
        "",
        f"Every model is measured on the test split ({setup['test_size']} images) at SkipNet's fixed gate threshold "
        f"0.5, skipped blocks not computed. MACs: {MACS_UNITS}, per image (all {setup['gates']} gated blocks run: "
        f"{setup['macs_all_blocks'] / 1e6:.2f} M; the plain ResNet without gates: {setup['macs_plain'] / 1e6:.2f} M). "
        "SkipNet's computation % = (sum over gates of the share of samples running the block + 1) / (G + 1), the "
        "always-run first block counted; dynsila's share = the mean share of the G gated blocks run.",
        "",
        "| stage | alpha | test top-1 | val top-1 | SkipNet computation % | gated blocks run | avg MACs "
        "| train wall / CPU min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        alpha = "-" if p.alpha is None else f"{p.alpha:g}"
        lines.append(
            f"| {p.stage.upper()} | {alpha} | {p.test_top1:.2f} | {p.val_top1:.2f} | "
            f"{p.skipnet_computation_percent:.1f} | {100 * p.executed_share:.1f} % | {p.avg_macs / 1e6:.2f} M "
            f"| {seconds(p)} |"
        )
    lines += ["", "Share of test samples running each gated block:", ""]
    for p in points:
        name = "SP" if p.alpha is None else f"HRL alpha {p.alpha:g}"
        lines.append(f"- {name}: " + " ".join(f"{s:.2f}" for s in p.executed_per_gate))
    lines += ["", "## Acceptance", "", "| check | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {c['measured']} | {verdict(c['met'])} |" for c in checks]
    pairs = passing_pairs(points[0], points[1:])
    named = ", ".join(f"{a:g} and {b:g}" for a, b in pairs) or "none"
    lines += ["", f"Pairs of alphas that meet all three checks on their own: {named}.", "", setup["notes"]]
    return "\n".join(lines)


def plot(points: list[StagePoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in points:
        name = "SP" if p.alpha is None else f"HRL, alpha {p.alpha:g}"
        label = f"{name}: {p.skipnet_computation_percent:.0f} % computation (SkipNet)"
        ax.plot(p.avg_macs / 1e6, p.test_top1, "s" if p.alpha is None else "o", markersize=8, label=label)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("average MACs per test image (M, conv + linear)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("SkipNet-20 on cifar10_dev: SP, then HRL per alpha (threshold 0.5)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def run_stages(args: argparse.Namespace) -> tuple[Config, Config, list[StagePoint]]:
    """The SP run, then one HRL run per alpha from it (only ``loss.hrl_alpha`` differs), each measured."""
    sp_cfg = load_config(args.sp_config, [f"out_dir={args.runs_dir}", "name=sp", *args.overrides])
    points = [stage_point("sp", None, sp_cfg.run_dir, train_stage(sp_cfg, args.reuse))]
    hrl_cfg = sp_cfg
    for alpha in args.alphas:
        overrides = [f"out_dir={args.runs_dir}", f"name=hrl_alpha{alpha:g}", f"train.init_from={sp_cfg.run_dir}"]
        hrl_cfg = load_config(args.hrl_config, [*overrides, f"loss.hrl_alpha={alpha}", *args.overrides])
        points.append(stage_point("hrl", alpha, hrl_cfg.run_dir, train_stage(hrl_cfg, args.reuse)))
    return sp_cfg, hrl_cfg, points


def main(argv: list[str] | None = None) -> int:
    prog = "python benchmarks/accuracy/skipnet_hrl.py"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--sp-config", default="configs/cifar10_dev/skipnet_sp.yaml")
    parser.add_argument("--hrl-config", default="configs/cifar10_dev/skipnet_hrl.yaml")
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=[0.1, 0.15, 0.25, 0.35, 0.5, 1.0], help="one HRL run each"
    )
    parser.add_argument("--runs-dir", default="runs/skipnet_hrl", help="where the runs go (out_dir)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs instead of training them again")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    # one thread: on a 2-core machine shared with other jobs, two threads waiting on each other ran 10-20x slower
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="key=value for both stages, e.g. train.epochs=1 (smoke runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        with log_lines_to(sys.stdout):  # training's progress lines, as python -m dynsila.train prints them
            sp_cfg, hrl_cfg, points = run_stages(args)
    except DynsilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checks = acceptance(points[0], points[1:])
    model, cfg = load_deploy_model(sp_cfg.run_dir)
    costs = gated_costs(model, input_shape(cfg))
    setup = describe(
        sp_cfg, hrl_cfg, costs.full, costs.plain, len(costs.blocks), dataset_size(build_splits(cfg.data).test)
    )
    command = command_line(__file__, argv)
    env = environment("cpu", args.threads)
    payload = {
        "command": command,
        "environment": env,
        "setup": setup,
        "points": [asdict(p) for p in points],
        "acceptance": checks,
        "pairs_meeting_acceptance": passing_pairs(points[0], points[1:]),
    }
    out = write_results(STEM, payload, markdown(command, env, setup, points, checks), args.results_dir)
    plot(points, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


def describe(sp: Config, hrl: Config, macs_all: int, macs_plain: int, gates: int, test_size: int) -> dict[str, Any]:
    """The runs' setup, in words and numbers, for the result files."""
    m, size = sp.model, sp.data.image_size or 32
    data = sp.data.root if sp.data.name == "npz" else sp.data.name
    return {
        "description": (
            f"SkipNet-{m['depth']} ({m['gate']} gates, {gates} gated blocks) on {data} at {size} x {size}, seed "
            f"{sp.seed}, batch {sp.data.batch_size}. SP: {sp.train.epochs} epoch(s), SGD lr {sp.train.lr:g} "
            f"{schedule_text(sp.train)}, plain cross-entropy (loss.gate_cost "
            f"{sp.section(GateLossConfig).gate_cost:g}). "
            f"HRL from the SP weights: {hrl.train.epochs} epoch(s), SGD lr {hrl.train.lr:g} {hrl.train.schedule}, "
            f"rl_weight {hrl.section(GateLossConfig).rl_weight:g} (per sample, summed over the batch), baseline "
            f"{hrl.section(GateLossConfig).rl_baseline}; only alpha differs between the HRL runs."
        ),
        "sp_config": sp.name,
        "hrl_config": hrl.name,
        "gates": gates,
        "macs_all_blocks": macs_all,
        "macs_plain": macs_plain,
        "test_size": test_size,
        "notes": (
            f"Scaled to a shared 2-core CPU, not the reference's SkipNet-110 settings (the paper's smallest network "
            f"is ResNet-38; this one has {gates} gates against 53). A skip earns alpha / G; alpha 0.1 is the "
            "reference's value, larger ones probe where the policy gives up the gated blocks. Single seed; "
            f"{test_size} test images (binomial standard error of top-1 about "
            f"{100 * (0.25 / test_size) ** 0.5:.1f} points at most). Times are wall / process-CPU minutes of "
            "training plus its built-in evaluation, on a machine shared with other jobs."
        ),
    }


if __name__ == "__main__":
    sys.exit(main())
