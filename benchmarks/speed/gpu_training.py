"""MSDNet training throughput on one device: a plain eager loop against dynsila's own training loop, with its
performance options switched on one after another (the training rows of ``benchmarks/speed/gpu_check.py``).

Both sides train the same network from the same preset on the same synthetic CIFAR-shaped data (random uint8
images and labels written as an npz file: throughput does not depend on the pixels), with the same SGD settings,
and are timed per epoch: every epoch starts its data loader, as training does, and an epoch's images divided by
its seconds is the throughput. The first epoch (compilation, cuDNN autotuning, worker start) is reported apart.

- The plain loop is what one writes first: a CPU ``DataLoader`` whose workers augment each image (pad-4 crop and
  flip, dynsila's own CPU transform), normalisation on the device, fp32, NCHW, eager, and ``loss.item()`` every
  step (a progress bar or running mean), which makes the host wait for the GPU once per step.
- dynsila's rows build a real run (``dynsila.train.build_run``) from the preset with config overrides and time
  ``dynsila.train.train_one_epoch``: what ``python -m dynsila.train`` executes, its own logging included.

Nothing here imports fvcore until a dynsila run is built (``dynsila.train`` needs it; the caller decides what to
do with the ImportError).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from benchmarks.toolkit import REPO_ROOT, run_seconds
from dynsila import models
from dynsila.config import Config, DataConfig, TrainConfig, load_config
from dynsila.data import build_splits, dataset_size, make_loader, normalize
from dynsila.methods.losses import exit_cross_entropy
from dynsila.models import MultiExitNetwork

PRESETS = {
    False: REPO_ROOT / "configs" / "cifar100" / "msdnet_baseline.yaml",
    True: REPO_ROOT / "configs" / "cifar100" / "msdnet_sila.yaml",
}
# Every row trains at this learning rate: a random-label run at the paper's 0.1 could diverge and end a one-shot
# device run; the speed of a step does not depend on it.
LEARNING_RATE = 0.01
# dynsila's performance options, switched on cumulatively in this order: (row label, config overrides). A row
# whose keys this checkout's config does not have is reported as unavailable rather than run.
STACK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dynsila loop (no per-step host sync), CPU loader, fp32, NCHW, eager", ()),
    ("+ data on the device (on-device augmentation)", ("data.on_device=true",)),
    ("+ channels-last", ("train.channels_last=true",)),
    ("+ bf16 autocast", ("train.amp=bf16",)),
    ("+ torch.compile", ("train.compile=true",)),
)
# --smoke: a 3-exit MSDNet small enough for a CPU test (the same tiny model as the other benchmarks' smoke runs)
SMOKE_MODEL = {"n_blocks": 3, "step": 1, "base": 1, "n_channels": 4, "growth_rate": 4, "head_channels": 8}
NUM_CLASSES = 100
HELD_OUT = 64  # validation and test images: the runs need both splits, nothing here evaluates them


@dataclass(frozen=True)
class Setup:
    """What every training row shares."""

    data: Path  # the synthetic npz file
    device: str  # "cuda" or "cpu"
    workers: int  # CPU DataLoader workers (the preset's 4 on the GPU machine; 0 for the smoke run)
    out_dir: Path  # dynsila runs need a run directory name; nothing is written there by the timed epochs
    smoke: bool = False


@dataclass
class Epochs:
    """One training setup, ready to run: ``epoch()`` trains one epoch of ``images`` images."""

    epoch: Callable[[], object]
    images: int


def write_synthetic_cifar(path: Path, n_train: int, seed: int = 0) -> Path:
    """uint8 NHWC 32 x 32 random images in dynsila's npz layout: ``n_train`` training images whose labels cycle
    through ``0..NUM_CLASSES-1`` (every class a few-image run can hold), and ``HELD_OUT`` validation and test
    images each, labelled only with classes the training split has (the data loader refuses any other)."""
    rng = np.random.default_rng(seed)
    classes = min(NUM_CLASSES, n_train)
    path.parent.mkdir(parents=True, exist_ok=True)

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)

    np.savez(
        path,
        x_train=images(n_train),
        y_train=rng.permutation(np.arange(n_train) % classes),
        x_val=images(HELD_OUT),
        y_val=rng.integers(0, classes, HELD_OUT),
        x_test=images(HELD_OUT),
        y_test=rng.integers(0, classes, HELD_OUT),
    )
    return path


def missing_keys(options: Sequence[str]) -> list[str]:
    """The ``section.key=value`` overrides whose key this checkout's config does not define."""
    sections = {"data": DataConfig, "train": TrainConfig}
    missing = []
    for option in options:
        section, _, key = option.partition("=")[0].partition(".")
        if key not in {f.name for f in dataclasses.fields(sections[section])}:
            missing.append(option.partition("=")[0])
    return missing


def training_config(setup: Setup, batch: int, options: Sequence[str], sila: bool = False) -> Config:
    """The CIFAR-100 b7 preset (baseline or SiLa twin) on the synthetic data, with ``options`` applied."""
    overrides = [
        f"name=gpu_check_{'sila' if sila else 'baseline'}_{batch}",
        f"out_dir={setup.out_dir}",
        "data.name=npz",
        f"data.root={setup.data}",
        f"data.val_size={HELD_OUT}",
        f"data.num_classes={NUM_CLASSES}",
        f"data.batch_size={batch}",
        f"data.num_workers={setup.workers}",
        f"train.device={setup.device}",
        f"train.lr={LEARNING_RATE}",
        "train.amp='off'",  # quoted: YAML reads a bare off as false
        *options,
    ]
    if setup.smoke:
        overrides += [f"model.{k}={v}" for k, v in SMOKE_MODEL.items()]
    return load_config(PRESETS[sila], overrides)


def dynsila_epochs(cfg: Config) -> Epochs:
    """A dynsila training run built as ``python -m dynsila.train`` builds it; each call trains the next epoch."""
    from dynsila import distributed  # dynsila.train imports fvcore (through dynsila.evaluate): only here
    from dynsila.console import Clock
    from dynsila.training.train import build_run, train_one_epoch

    run = build_run(cfg, distributed.setup(cfg.train.device), resuming=False)
    epochs, clock = itertools.count(), Clock(10**9)
    return Epochs(lambda: train_one_epoch(run, next(epochs), clock), run.steps_per_epoch * run.per_rank_batch)


def plain_epochs(cfg: Config) -> Epochs:
    """The plain eager loop on the same data, network and optimizer settings as ``cfg``'s dynsila run."""
    device = torch.device(cfg.train.device)
    torch.manual_seed(cfg.seed)
    splits = build_splits(cfg.data)  # the training split augments each image on the CPU, in the workers
    model = cast(MultiExitNetwork, models.build(cfg.model["name"], num_classes=NUM_CLASSES, **cfg.model_kwargs()))
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    weights = [1.0] * model.num_exits
    batch, epochs = cfg.data.batch_size, itertools.count()

    def epoch() -> None:
        model.train()
        seed = cfg.seed * 100_003 + next(epochs)
        for images, labels in make_loader(splits.train, batch, True, seed, cfg.data.num_workers, drop_last=True):
            x = normalize(images.to(device), splits.mean, splits.std)
            loss = exit_cross_entropy(model(x), labels.to(device), weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the host waits for this step's kernels before it queues the next batch

    return Epochs(epoch, (dataset_size(splits.train) // batch) * batch)


def throughput(epochs: Epochs, device: torch.device, timed_epochs: int) -> dict[str, Any]:
    """Images per second over whole epochs (median of ``timed_epochs``), after a first epoch (compilation,
    cuDNN autotuning) whose seconds are reported apart."""
    first = run_seconds(epochs.epoch, device)
    seconds = statistics.median(run_seconds(epochs.epoch, device) for _ in range(timed_epochs))
    return {
        "images_per_second": epochs.images / seconds,
        "epoch_seconds": seconds,
        "first_epoch_seconds": first,
        "images_per_epoch": epochs.images,
        "timed_epochs": timed_epochs,
    }


def stack_options(upto: int) -> tuple[str, ...]:
    """The overrides of ``STACK``'s rows 0..upto together."""
    return tuple(option for _, options in STACK[: upto + 1] for option in options)
