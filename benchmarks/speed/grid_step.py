"""The SiLa experiment's training step (``benchmarks/anytime.py --preset cpu``): where its time goes, and whether
drawing the batches on the device instead of by a DataLoader buys anything.

    python benchmarks/speed/grid_step.py [--steps 60] [--repeats 5] [--threads 1]

Needs ``../shared/data/cifar10_dev2.npz`` (the preset's data; see ../shared/data/README.md). First it checks
whether the two data paths train identically from one seed (they would have to, for a switch that leaves the
experiment's losses unchanged: the DataLoader's iterator draws its base seed from the shuffling generator before
the permutation, so they do not). Then both paths train ``--steps`` steps back to back, ``--repeats`` times in one
process (drift cancels in each pair), and one step of each is profiled with ``torch.profiler``: the share of its
wall time in getting the batch versus the step, and the operators the step spends its time in.
Writes ``benchmarks/results/grid_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.toolkit import REPO_ROOT, RESULTS_DIR, command_line, environment, header, write_results
from dynsila import distributed
from dynsila.config import load_config
from dynsila.data import normalize
from dynsila.training.train import build_run, epoch_batches, new_epoch_sums, train_step

PRESET = "configs/cifar10_dev2/msdnet_anytime.yaml"
DATA = REPO_ROOT / "../shared/data/cifar10_dev2.npz"
QUIET = ["train.eval_test_every_epoch=false", "train.log_every=100000", "sila.enabled=false"]
PATHS = {"dataloader": ["data.on_device=false"], "on_device": ["data.on_device=true"]}


def make_run(path: str, out: Path) -> Any:
    cfg = load_config(REPO_ROOT / PRESET, [*QUIET, *PATHS[path], f"out_dir={out}", f"data.root={DATA}"])
    return build_run(cfg, distributed.setup("cpu"), resuming=False)


def train_steps(run: Any, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds for the first ``steps`` steps of epoch 0 (batches drawn, normalised, stepped) and the summed terms."""
    run.networks.train()
    sums = new_epoch_sums(run)
    start = time.perf_counter()
    for step, (images, labels) in enumerate(epoch_batches(run, 0)):
        if step == steps:
            break
        x = normalize(images, run.splits.mean, run.splits.std).contiguous(memory_format=run.memory_format)
        train_step(run, x, labels, step, sums)
    seconds = time.perf_counter() - start
    assert sums.totals is not None
    return seconds, sums.totals.clone()


def same_training(steps: int, out: Path) -> dict[str, Any]:
    """Both paths from the same seed: the loss sums and every weight after ``steps`` steps, compared exactly."""
    runs = {p: make_run(p, out / p) for p in PATHS}
    totals = {p: train_steps(r, steps)[1] for p, r in runs.items()}
    weights = [dict(r.networks.state_dict()) for r in runs.values()]
    same_weights = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    return {"steps": steps, "loss_sums_equal": bool(torch.equal(*totals.values())), "weights_equal": same_weights}


def profile_step(run: Any) -> dict[str, Any]:
    """Share of one step's wall time per phase, from torch.profiler's record_function ranges."""
    from torch.profiler import ProfilerActivity, profile, record_function

    batches = iter(epoch_batches(run, 1))
    next(batches)  # warm the path
    sums = new_epoch_sums(run)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("data"):
            images, labels = next(batches)
            x = normalize(images, run.splits.mean, run.splits.std).contiguous(memory_format=run.memory_format)
        with record_function("step"):
            train_step(run, x, labels, 0, sums)
    events = prof.key_averages()
    wall = {e.key: e.cpu_time_total for e in events if e.key in ("data", "step")}
    total = sum(wall.values())
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    top = {e.key: e.self_cpu_time_total / total for e in ops[:8]}
    return {**{k: v / total for k, v in wall.items()}, "top_ops": top}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="the preset trains with 1 thread per process")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "grid_step")
    args = parser.parse_args(argv)
    if not DATA.exists():
        print(f"error: {DATA} is missing (the preset's data, see ../shared/data/README.md)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    same = same_training(args.steps, args.out)
    runs = {p: make_run(p, args.out / f"timed_{p}") for p in PATHS}
    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    for _ in range(args.repeats):
        for path, run in runs.items():
            seconds[path].append(train_steps(run, args.steps)[0])
    batch = runs["dataloader"].per_rank_batch
    rates = {p: batch * args.steps / statistics.median(s) for p, s in seconds.items()}
    ratios = [a / b for a, b in zip(seconds["on_device"], seconds["dataloader"], strict=True)]
    payload = {
        "command": command_line(__file__, argv), "environment": environment("cpu", args.threads), "preset": PRESET,
        "same_training": same, "images_per_second": rates, "time_ratio_on_device": statistics.median(ratios),
        "profile_share": {p: profile_step(r) for p, r in runs.items()}, "seconds": seconds,
    }  # fmt: skip
    write_results("grid_step", payload, markdown(payload), args.results_dir)
    print(markdown(payload))
    return 0


def markdown(p: dict[str, Any]) -> str:
    same, rates, share = p["same_training"], p["images_per_second"], p["profile_share"]
    lines = header("The experiment preset's training step: DataLoader vs batches on the device", p["command"],
                   p["environment"])  # fmt: skip
    lines += [
        f"Preset `{p['preset']}` (4-exit MSDNet, batch 64, no augmentation), baseline loss, CPU, "
        f"{p['environment']['threads']} thread(s) as the grid runs each process.",
        "",
        f"- Same training: after {same['steps']} steps from the same seed the loss sums are "
        f"{'bit-identical' if same['loss_sums_equal'] else 'DIFFERENT'} and the weights "
        f"{'bit-identical' if same['weights_equal'] else 'DIFFERENT'}.",
        f"- Throughput: DataLoader {rates['dataloader']:.0f} img/s, on the device {rates['on_device']:.0f} img/s; "
        f"time ratio (on device / DataLoader, median of back-to-back pairs) {p['time_ratio_on_device']:.3f}.",
        "- Share of one step's wall time (torch.profiler): "
        + "; ".join(
            f"{path}: data {s.get('data', 0):.1%}, the step {s.get('step', 0):.1%}" for path, s in share.items()
        ),
        "- Where the DataLoader step's time goes (self CPU time of the top operators, share of the whole): "
        + ", ".join(f"`{k}` {v:.1%}" for k, v in share["dataloader"]["top_ops"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
