"""Train a multi-exit network: ``python -m dynsila.train CONFIG.yaml [key=value ...] [--force]``.

One loop for every model and technique: loss = exit cross-entropy + the terms of the techniques in the table
(``dynsila.methods.technique``), which also say which networks train, how each is prepared and what deploy drops;
the loop names none of them. ``train`` builds a ``Run``, restores its ``TrainState`` when resuming, then per epoch
``train_one_epoch`` and ``end_of_epoch`` (evaluation, metrics row, checkpoints; rank 0), and finally ``export``.
A step never waits for the device: its statistics accumulate there (``EpochSums``) and the host reads them every
``train.log_every`` steps, so a NaN stops the run up to ``log_every - 1`` steps later, naming where it appeared.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dynsila import distributed
from dynsila.config import Config, config_to_yaml
from dynsila.console import Clock
from dynsila.data import DeviceBatches, Splits, batch_split, build_splits, dataset_size, make_loader, normalize
from dynsila.data import train_loader as shuffled_loader
from dynsila.errors import ConfigError, DynsilaError, TrainingError
from dynsila.evaluation.epoch_sums import EpochSums, nonfinite_report
from dynsila.evaluation.evaluate import EVAL_FILE, evaluate_run, exit_top1, format_report
from dynsila.methods.losses import ensemble_loss_terms, ensemble_monitor_terms, logits_of
from dynsila.methods.technique import TECHNIQUES, Networks, Step, deploy_network, step_rows, unwrap
from dynsila.optim import build_optimizer, learning_rate
from dynsila.runs import checkpoint as ckpt
from dynsila.runs import rundir
from dynsila.runs.events import EventLog, open_event_log
from dynsila.runs.rundir import BEST, CONFIG, DEPLOY, LAST
from dynsila.runs.runlock import refuse_existing_run, run_lock
from dynsila.runtime import autocast_dtype, rng_state, seed_everything

log = logging.getLogger("dynsila.train")  # not __name__: that is "__main__" under python -m dynsila.train
StepStatistics = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    val_top1: list[float]  # per exit, best epoch (the first network when several train)
    test_top1: list[float]
    params: list[int]  # deploy parameters per exit, cumulative (classifiers 1..k included)
    network_dirs: list[Path]  # where each network's deploy weights and eval.json are (the run directory for one)


@dataclass
class Accuracy:
    train_top1: list[float]  # per exit, on the augmented training batches of the epoch
    val_top1: list[float]
    test_top1: list[float] | None  # logged only, never used to select


@dataclass
class TrainState:
    """Where training stands after ``epoch`` finished epochs: what a resumed run continues from."""

    epoch: int = 0
    best_score: float = -math.inf  # mean val top-1 over exits and networks of the best epoch
    best_epoch: int = -1  # 1-based
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch (metrics.jsonl)


@dataclass
class Run:
    """Everything a training run is built from, built once by ``build_run``."""

    cfg: Config  # data.num_classes and data.image_size resolved from the data
    ctx: distributed.Context
    splits: Splits
    configs: list[tuple[str | None, Config]]  # per network: (its folder in the run, or None; what it records)
    nets: list[nn.Module]  # per network, as the techniques prepared it (wrapped in training-only heads, ...)
    networks: Networks  # the nets as one module: what checkpoints hold
    forward: nn.Module  # that module, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    per_rank_batch: int
    micro_batches: int  # train.accumulate_steps
    steps_per_epoch: int
    val_loader: DataLoader
    test_loader: DataLoader
    device_batches: DeviceBatches | None  # data.on_device: the training set on the device
    compute: Callable[..., StepStatistics]  # forward_and_statistics, compiled when train.compile is on
    events: EventLog | None = None  # TensorBoard (rank 0, train.tensorboard, the package installed)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def say(self, line: str) -> None:
        if self.ctx.is_main:
            log.info(line)


def train(cfg: Config, force: bool = False) -> TrainResult:
    """Run (or resume) the training the config describes; returns the best epoch's per-exit accuracies.
    Under torchrun every rank calls this; rank 0 alone logs, evaluates and writes files."""
    cfg = copy.deepcopy(cfg)
    ctx = distributed.setup(cfg.train.device)
    try:
        refuse_existing_run(cfg.run_dir, cfg.resume, force)  # before the data loads: the common mistake, told at once
        rundir.refuse_changed_resume(cfg)
        distributed.barrier(ctx)  # every rank has looked before rank 0 writes anything
        run = build_run(cfg, ctx, cfg.resume and (cfg.run_dir / LAST).exists())
        with contextlib.ExitStack() as held:
            take_run_directory(run, force, held)
            return train_locked(run)
    finally:
        distributed.cleanup(ctx)


def train_locked(run: Run) -> TrainResult:
    """The run with its directory locked (rank 0): restore or start, the epochs, the export."""
    cfg, ctx = run.cfg, run.ctx
    resuming = cfg.resume and (cfg.run_dir / LAST).exists()
    state = restore_state(run) if resuming else TrainState()
    if cfg.resume and not resuming:  # a relaunch script passes resume=true on the first launch too: start fresh
        run.say(f"no checkpoint in {cfg.run_dir} ({LAST}): starting fresh")
    if ctx.is_main:
        ckpt.atomic_write_text(cfg.run_dir / CONFIG, config_to_yaml(run.cfg))
    run.say(describe(run))
    if ctx.is_main and cfg.train.tensorboard:
        run.events = open_event_log(cfg.run_dir, state.metrics)
    clock = Clock(run.steps_per_epoch * (cfg.train.epochs - state.epoch))
    try:
        for epoch in range(state.epoch, cfg.train.epochs):
            end_of_epoch(run, state, epoch, train_one_epoch(run, epoch, clock))
    finally:
        if run.events is not None:
            run.events.close()
    if not ctx.is_main:
        distributed.barrier(ctx)
        return TrainResult(cfg.run_dir, state.best_epoch, [], [], [], [c.run_dir for _, c in run.configs])
    try:
        return export(run, state.best_epoch)
    finally:
        distributed.barrier(ctx)


def take_run_directory(run: Run, force: bool, held: contextlib.ExitStack) -> None:
    """Rank 0 locks the run directory for the rest of the run (released by ``held``, or by the OS should the
    process die) and looks again for a run there; every rank stops when it could not."""
    failure: DynsilaError | None = None
    if run.ctx.is_main:
        try:
            held.enter_context(run_lock(run.cfg.run_dir))
            refuse_existing_run(run.cfg.run_dir, run.cfg.resume, force)
        except DynsilaError as e:
            failure = e
    if distributed.broadcast_flag(failure is not None, run.ctx):
        raise failure or TrainingError(f"rank 0 could not take {run.cfg.run_dir}; see its error line")


# --- building the run ---------------------------------------------------------------------------------------


def build_run(cfg: Config, ctx: distributed.Context, resuming: bool) -> Run:
    """Data, networks (same initial weights on every rank), device placement, DDP, optimizer and loaders."""
    amp_dtype = autocast_dtype(cfg.train.amp, ctx.device)
    if cfg.train.sync_bn and ctx.enabled and ctx.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernels); set it to false")
    per_rank_batch, micro = batch_split(cfg.data.batch_size, cfg.train.accumulate_steps, ctx.world_size)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    splits = build_splits(cfg.data)
    cfg.data.num_classes, cfg.data.image_size = splits.num_classes, splits.image_size  # config rebuilds the model
    cfg.data.mean, cfg.data.std = list(splits.mean), list(splits.std)  # and reads inputs as the run did
    cfg.data.class_names = splits.class_names
    configs, nets = rundir.build_networks(cfg, splits.num_classes, resuming)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    networks, forward = place(nets, cfg.train.sync_bn, memory_format, ctx)
    batch, workers = cfg.data.eval_batch_size, cfg.data.num_workers
    device_batches = None
    if cfg.data.on_device:
        device_batches = DeviceBatches(splits.train, cfg.data, per_rank_batch, ctx.device, ctx.rank, ctx.world_size)
    steps = len(device_batches or loader_for_epoch(splits, cfg, ctx, per_rank_batch, epoch=0))
    return Run(cfg, ctx, splits, configs, nets, networks, forward, build_optimizer(cfg.train, networks),
               torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16), amp_dtype, memory_format,
               per_rank_batch, micro, steps, make_loader(splits.val, batch, shuffle=False, num_workers=workers),
               make_loader(splits.test, batch, shuffle=False, num_workers=workers), device_batches,
               torch.compile(forward_and_statistics) if cfg.train.compile else forward_and_statistics)  # fmt: skip


def place(
    nets: list[nn.Module], sync_bn: bool, memory_format: torch.memory_format, ctx: distributed.Context
) -> tuple[Networks, nn.Module]:
    """(the networks on the device, what the loop calls: that module or its DistributedDataParallel wrapper)."""
    networks = Networks(nets).to(ctx.device)
    networks.to(memory_format=memory_format)
    if not ctx.enabled:
        return networks, networks
    if sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(networks)
    device_ids = None if ctx.device.index is None else [ctx.device.index]
    return networks, nn.parallel.DistributedDataParallel(networks, device_ids=device_ids)


def restore_state(run: Run) -> TrainState:
    """Weights, optimizer, scaler and this rank's RNG state from ``last.pt``; the metrics rows it had written."""
    path, ctx = run.cfg.run_dir / LAST, run.ctx
    epoch, best_score, best_epoch = ckpt.restore_training(path, run.networks, run.optimizer, run.scaler, ctx.rank,
                                                     ctx.world_size)  # fmt: skip
    run.say(f"resuming {run.cfg.run_dir} after epoch {epoch}")
    return TrainState(epoch, best_score, best_epoch, rundir.read_metrics(run.cfg.run_dir)[:epoch])


def describe(run: Run) -> str:
    """The run's first line: what trains on what, with which techniques, where, for how long."""
    cfg, splits = run.cfg, run.splits
    sizes = " / ".join(f"{dataset_size(getattr(splits, s))} {s}" for s in ("train", "val", "test"))
    techniques = ", ".join(t.name for t in TECHNIQUES if t.active(cfg)) or "none"
    return (
        f"{cfg.name}: {', '.join(c.model['name'] for _, c in run.configs)} on {cfg.data.name} ({sizes}, "
        f"{splits.num_classes} classes), techniques: {techniques}, device {run.device} x {run.ctx.world_size} "
        f"process(es), amp {run.amp_dtype or 'off'}, {cfg.train.epochs} epochs x {run.steps_per_epoch} steps"
    )


# --- one epoch ----------------------------------------------------------------------------------------------


def train_one_epoch(run: Run, epoch: int, clock: Clock) -> EpochSums:
    """One pass over this rank's shard of the training set; progress lines every ``train.log_every`` steps."""
    cfg, device = run.cfg, run.device
    run.networks.train()
    sums = new_epoch_sums(run)
    for step, (images, labels) in enumerate(epoch_batches(run, epoch)):
        sums.lr = learning_rate(cfg.train, epoch * run.steps_per_epoch + step, run.steps_per_epoch)
        for group in run.optimizer.param_groups:
            group["lr"] = sums.lr
        x = normalize(images.to(device, non_blocking=True), run.splits.mean, run.splits.std)
        train_step(run, x.contiguous(memory_format=run.memory_format), labels.to(device, non_blocking=True), step, sums)
        clock.tick(len(labels) * run.ctx.world_size)
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == run.steps_per_epoch:
            means = read_progress(run, sums, epoch, step)  # the host's one wait for the device in log_every steps
            terms = ", ".join(f"{k} {means[k]:.3f}" for k in sums.names[1 : sums.num_losses])
            run.say(
                f"epoch {epoch + 1}/{cfg.train.epochs}  step {step + 1}/{run.steps_per_epoch}  "
                f"loss {means['loss']:.4f} ({terms})  lr {sums.lr:.4g}  "
                f"{clock.images_per_second():.0f} img/s  eta {clock.eta()}",
            )
    return sums


def new_epoch_sums(run: Run) -> EpochSums:
    """Zeroed statistics for one epoch, on the run's device."""
    return EpochSums(
        hits=[torch.zeros(unwrap(n).num_exits, dtype=torch.float64, device=run.device) for n in run.nets],
        nonfinite=torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=run.device),
    )


def epoch_batches(run: Run, epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (uint8 images, labels) batches of one epoch, augmented: drawn on the device (data.on_device)
    or by a DataLoader. Either way the order and the augmentation are a function of seed and epoch."""
    if run.device_batches is not None:
        return run.device_batches.epoch(seed=run.cfg.seed * 100_003 + epoch)
    return loader_for_epoch(run.splits, run.cfg, run.ctx, run.per_rank_batch, epoch)


def loader_for_epoch(splits: Splits, cfg: Config, ctx: distributed.Context, batch: int, epoch: int) -> DataLoader:
    shard = (ctx.rank, ctx.world_size) if ctx.enabled else None
    return shuffled_loader(splits.train, batch, cfg.seed, epoch, cfg.data.num_workers, shard)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, step: int, sums: EpochSums) -> None:
    """The optimizer steps of a normalised batch: one on all of it, unless a technique splits it (``step_rows``),
    each after every technique's ``before_step``."""
    for rows in step_rows(run.cfg, len(y)):
        step_view = Step(run.forward, x, y, run.cfg, sums.lr, run.optimizer, rows)
        for technique in TECHNIQUES:
            technique.before_step(step_view)
        part = (x, y) if rows is None else (x[rows], y[rows])
        optimizer_step(run, *part, step, sums)


def optimizer_step(run: Run, x: torch.Tensor, y: torch.Tensor, step: int, sums: EpochSums) -> None:
    """One optimizer step on ``x``, as ``micro_batches`` strided micro-batches (see batch_split). Nothing here waits
    for the device (fp16's GradScaler does, once)."""
    ddp = run.forward if isinstance(run.forward, nn.parallel.DistributedDataParallel) else None
    micro = run.micro_batches
    run.optimizer.zero_grad(set_to_none=True)
    for m in range(micro):  # strided micro-batches: the shards DDP ranks would see
        xs, ys = x[m::micro], y[m::micro]
        with ddp.no_sync() if ddp is not None and m < micro - 1 else contextlib.nullcontext():
            loss, terms, monitors, hits = run.compute(run.forward, run.cfg, run.amp_dtype, xs, ys)
            run.scaler.scale(loss / micro).backward()
        for total, new in zip(sums.hits, hits, strict=True):
            total += new
        sums.add(loss, terms, monitors, len(ys), step)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def forward_and_statistics(
    forward: nn.Module, cfg: Config, amp: torch.dtype | None, x: torch.Tensor, y: torch.Tensor
) -> StepStatistics:
    """What ``train.compile`` compiles: the forward pass under autocast, the loss terms and their sum (0-d), the
    monitor terms and, per network, correct predictions per exit (K). ``x``: N x 3 x H x W normalised, ``y``: N."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        outputs = forward(x)
        terms = ensemble_loss_terms(outputs, y, cfg)
        loss = torch.stack(list(terms.values())).sum()
    monitors = ensemble_monitor_terms(outputs, y, cfg)
    hits = [(torch.stack(logits_of(output), dim=1).argmax(-1) == y[:, None]).sum(0) for output in outputs]
    return loss, terms, monitors, hits


def read_progress(run: Run, sums: EpochSums, epoch: int, step: int) -> dict[str, float]:
    """The host's read of the device statistics: the running means per name. Stops every rank when any rank has
    seen a non-finite loss, naming where it first appeared."""
    assert sums.totals is not None  # called after a step
    host = torch.cat([sums.totals, sums.nonfinite]).tolist()  # one sync
    anywhere = host[-3] >= 0
    if run.ctx.enabled:  # every rank checks at the same steps, so all stop together
        anywhere = float(distributed.sum_across_ranks(torch.tensor([float(anywhere)]), run.ctx)[0]) > 0
    if anywhere:
        last = run.cfg.run_dir / LAST
        kept = f"last good checkpoint kept at {last}" if last.exists() else "no checkpoint yet"
        what = nonfinite_report(sums, host[-3:], epoch, step, run.cfg.train.log_every)
        raise TrainingError(f"{what}; {kept}; lower train.lr or check the data")
    return {name: total / sums.seen for name, total in zip(sums.names, host[:-3], strict=True)}


# --- end of an epoch ----------------------------------------------------------------------------------------


def end_of_epoch(run: Run, state: TrainState, epoch: int, sums: EpochSums) -> None:
    """Sum the epoch's statistics over ranks; rank 0 evaluates, writes the metrics row and checkpoints, and
    logs; a failure there (a full disk) stops every rank."""
    ctx = run.ctx
    assert sums.totals is not None  # an epoch has at least one step
    totals = distributed.sum_across_ranks(torch.cat([sums.totals.new_full((1,), sums.seen), sums.totals]), ctx)
    seen, *values = totals.tolist()
    images_per_second = seen / (time.perf_counter() - sums.start)  # training only: before the evaluation
    means = dict(zip(sums.names, (v / seen for v in values), strict=True))
    hits = [distributed.sum_across_ranks(h, ctx) for h in sums.hits]
    rng_states = distributed.gather_objects(rng_state(), ctx)
    failure: DynsilaError | None = None
    if ctx.is_main:  # evaluation and files: rank 0 only, so nothing is counted or written twice
        try:
            accuracy = evaluate(run, [h / seen * 100 for h in hits])
            row = {"epoch": epoch + 1, **means, "lr": sums.lr, **dataclasses.asdict(accuracy[0])}
            row["seconds"], row["img_per_s"] = time.perf_counter() - sums.start, images_per_second
            if len(accuracy) > 1:
                row["networks"] = [dataclasses.asdict(a) for a in accuracy]
            improved = record_epoch(run, state, row, accuracy, rng_states)
            for (folder, _), a in zip(run.configs, accuracy, strict=True):
                run.say(
                    f"epoch {epoch + 1}{f' {folder}' if folder else ''}: val top-1 per exit {row_text(a.val_top1)}"
                    + (f"  test {row_text(a.test_top1)}" if a.test_top1 else "")
                    + ("  (best)" if improved else "")
                )
        except DynsilaError as e:
            failure = e
    if distributed.broadcast_flag(failure is not None, ctx):
        raise failure or TrainingError("rank 0 failed to evaluate or save; see its error line")
    state.epoch = epoch + 1
    state.best_epoch = int(distributed.sum_across_ranks(torch.tensor([state.best_epoch if ctx.is_main else 0]), ctx)[0])


def evaluate(run: Run, train_top1: list[torch.Tensor]) -> list[Accuracy]:
    """Per network: the epoch's training top-1 (given, per exit), val top-1 and (when configured) test top-1."""
    on, test = (run.splits.mean, run.splits.std, run.device), run.cfg.train.eval_test_every_epoch
    return [Accuracy(acc.tolist(), exit_top1(unwrap(net), run.val_loader, *on),
                     exit_top1(unwrap(net), run.test_loader, *on) if test else None)
            for net, acc in zip(run.nets, train_top1, strict=True)]  # fmt: skip


def record_epoch(
    run: Run, state: TrainState, row: dict[str, Any], accuracy: list[Accuracy], rng_states: list[Any]
) -> bool:
    """Append the metrics row, update the best score, write last.pt (and best.pt when it improved)."""
    state.metrics.append(row)
    score = float(np.mean([np.mean(a.val_top1) for a in accuracy]))  # mean top-1 over exits and networks
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch = score, row["epoch"]
    progress = {"epoch": row["epoch"], "step": row["epoch"] * run.steps_per_epoch, "best_score": state.best_score,
                "best_epoch": state.best_epoch, "rng": rng_states, "world_size": run.ctx.world_size,
                "config": config_to_yaml(run.cfg)}  # fmt: skip
    checkpoint = ckpt.training_checkpoint(run.networks, run.optimizer, run.scaler, progress)
    # best.pt before last.pt: a kill between the two then leaves last.pt one epoch behind (that epoch reruns and
    # rewrites best.pt identically), never a last.pt whose best_epoch names weights best.pt does not hold
    rundir.write_metrics(run.cfg.run_dir, state.metrics)
    if run.events is not None:
        run.events.write(row)
    if improved:
        ckpt.save_checkpoint(run.cfg.run_dir / BEST, checkpoint)
    ckpt.save_checkpoint(run.cfg.run_dir / LAST, checkpoint)
    return improved


# --- after training -----------------------------------------------------------------------------------------


def export(run: Run, best_epoch: int) -> TrainResult:
    """Best weights -> deploy model per network (training-only parts dropped), each evaluated. Rank 0 only."""
    run_dir = run.cfg.run_dir
    ckpt.load_weights(run.networks, ckpt.load_checkpoint(run_dir / BEST)["model"], run_dir / BEST)
    many = " and networks" if len(run.nets) > 1 else ""
    log.info(f"\nbest epoch {best_epoch} (selected by mean val top-1 over exits{many})")
    reports = []
    for net, (_, net_cfg) in zip(run.nets, run.configs, strict=True):
        net_dir, net_yaml = net_cfg.run_dir, config_to_yaml(net_cfg)
        ckpt.atomic_write_text(net_dir / CONFIG, net_yaml)
        ckpt.save_deploy(net_dir / DEPLOY, deploy_network(net).cpu().eval().to(memory_format=torch.contiguous_format),
                    net_yaml)  # fmt: skip
        reports.append(evaluate_run(net_dir, device=str(run.device)))  # writes eval.json: costs, anytime, budgeted
        log.info(format_report(reports[-1], criteria=["max_prob"]))
        log.info(f"\ndeploy weights (training-only heads pruned): {net_dir / DEPLOY}; all criteria in {EVAL_FILE}")
    exits = reports[0].exits
    return TrainResult(run_dir, best_epoch, [e.val_top1 for e in exits], [e.test_top1 for e in exits],
                       [e.params_cumulative for e in exits], [c.run_dir for _, c in run.configs])  # fmt: skip


def row_text(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)
