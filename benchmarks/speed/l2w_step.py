"""What does L2W-DEN cost per training step? One optimizer step of a small MSDNet with the meta update and the
weighted loss, against the same step with L2W off, paired back to back in one process.

    python benchmarks/speed/l2w_step.py [--threads 2] [--repeats 7] [--smoke]

A 4-exit CIFAR-style MSDNet (random weights: only timing matters), batch 64 at 32x32, CPU, SGD. The L2W step is
the technique's ``before_step`` (a virtual step with second-order autograd on half the batch, the meta loss on the
other half, Adam on the weight net) plus the forward, weighted loss, backward and optimizer step; the baseline is
the forward, exit CE, backward and optimizer step. Both start from the same weights. Writes
benchmarks/results/l2w_step.{json,md} (``--smoke``: 2 exits, batch 8, 1 repeat, under ``--results-dir`` only).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import RESULTS_DIR, command_line, environment, header, paired_ratio, paired_times, write_results
from dynsila.config import Config, load_config
from dynsila.methods.losses import ensemble_loss_terms
from dynsila.methods.technique import TECHNIQUES, Networks, Step, prepare_network
from dynsila.optim import build_optimizer
from dynsila.runs.rundir import build_model

MODEL = ["model.name=msdnet", "model.stem=cifar", "model.step=2", "model.base=2", "model.n_channels=8",
         "model.growth_rate=4", "model.gr_factor=[1,2,4]", "model.bn_factor=[1,2,4]"]  # fmt: skip


def training_step(cfg: Config, images: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One optimizer step of a freshly seeded network as ``cfg`` prepares it (every technique's hooks)."""
    torch.manual_seed(0)
    networks = Networks([prepare_network(build_model(cfg), cfg).train()])
    optimizer = build_optimizer(cfg.train, networks)

    def step() -> None:
        for technique in TECHNIQUES:
            technique.before_step(Step(networks, images, labels, cfg, cfg.train.lr))
        optimizer.zero_grad(set_to_none=True)
        terms = ensemble_loss_terms(networks(images), labels, cfg)
        torch.stack(list(terms.values())).sum().backward()
        optimizer.step()

    return step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    exits, batch, repeats = (2, 8, 1) if args.smoke else (4, 64, args.repeats)
    common = [*MODEL, f"model.n_blocks={exits}", "data.num_classes=100", "data.image_size=32", "sila.enabled=false"]
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 100, (batch,), generator=g)
    plain = training_step(load_config(None, common), images, labels)
    weighted = training_step(load_config(None, [*common, "l2w.enabled=true"]), images, labels)
    ratio = paired_ratio(weighted, plain, repeats=repeats, warmup=1)
    with_l2w, without = paired_times(weighted, plain, repeats=repeats, warmup=0)
    command = command_line(__file__, argv)
    env = environment(threads=args.threads)
    load = {"start": load_start, "end": os.getloadavg()[0]}
    note = (
        f"1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} at the end ({args.threads} "
        "threads timed; a load above that means other work shared the cores). Pairs are timed back to back."
    )
    payload = {"command": command, "environment": env, "exits": exits, "batch": batch, "repeats": repeats,
               "step_time_ratio": ratio, "seconds_with_l2w": with_l2w, "seconds_without": without,
               "load_average_1min": load}  # fmt: skip
    lines = [*header("L2W-DEN training-step cost", command, env), note, "",
             f"MSDNet, {exits} exits, batch {batch} at 32x32, {args.threads} threads, {repeats} pairs.", "",
             "| step | median seconds |", "| --- | --- |",
             f"| without L2W | {sorted(without)[len(without) // 2]:.4f} |",
             f"| with L2W (meta update every step) | {sorted(with_l2w)[len(with_l2w) // 2]:.4f} |", "",
             f"Paired step-time ratio (median of back-to-back pairs): **{ratio:.2f}x**."]  # fmt: skip
    write_results("l2w_step", payload, "\n".join(lines), args.results_dir)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
