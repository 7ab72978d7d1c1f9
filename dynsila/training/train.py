"""Train a multi-exit network: ``python -m dynsila.train CONFIG.yaml [key=value ...] [--force]``.

One loop for every model: loss = exit cross-entropy + the terms the config switches on (SiLa, DML, ...);
optimizer and schedule from the config; per-epoch validation (model selection) and test (logged only);
checkpoints and deploy weights in ``runs/<name>/``. Read top to bottom, the way torchvision's classification
reference reads: ``train`` builds a ``Run`` (data, the peers as one ``Ensemble``, optimizer), restores its
``TrainState`` when resuming, then per epoch ``train_one_epoch`` and ``end_of_epoch`` (``evaluate`` every
peer, metrics row, checkpoints; rank 0), and finally ``export`` (pruned deploy weights, evaluated). ``main`` is
the command line. The library logs (``logging``, rank 0 only); the command line prints the records as lines.

A training step never waits for the device: loss terms, monitor terms, hit counts and the non-finite check
accumulate on it (``EpochSums``), and the host reads them once every ``train.log_every`` steps and at the epoch's
end. A NaN or infinite loss therefore stops the run up to ``log_every - 1`` steps after it happened; the error
still names the epoch, step and term where it first appeared, and no checkpoint is written after it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dynsila.cli import USER_ERRORS, OneLineParser, fail
from dynsila.config import Config, DMLConfig, TrainConfig, config_to_yaml, load_config
from dynsila.console import log_lines_to
from dynsila.data import DeviceBatches, Splits, build_splits, dataset_size, make_loader, normalize
from dynsila.errors import CheckpointError, ConfigError, DynsilaError, TrainingError
from dynsila.evaluation.evaluate import EVAL_FILE, collect_logits, evaluate_run, format_report, topk_accuracy
from dynsila.methods.dml import exit_pairs
from dynsila.methods.losses import Output, ensemble_loss_terms, ensemble_monitor_terms, logits_of
from dynsila.methods.sila import SiLa, prune, unwrap
from dynsila.models import gated_body
from dynsila.runs.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_weights,
    read_deploy,
    save_checkpoint,
    save_deploy,
)
from dynsila.runs.rundir import BEST, CONFIG, DEPLOY, LAST, build_model, read_metrics, write_metrics
from dynsila.runs.runlock import holds_run, run_lock
from dynsila.training import distributed

log = logging.getLogger("dynsila.train")  # not __name__: that is "__main__" under python -m dynsila.train


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    val_top1: list[float]  # per exit, best epoch (peer 0 when DML trains several)
    test_top1: list[float]
    params: list[int]  # deploy parameters per exit, cumulative (classifiers 1..k included)
    peer_dirs: list[Path]  # where each peer's deploy weights and eval.json are (the run directory for one peer)


@dataclass
class PeerAccuracy:
    train_top1: list[float]  # per exit, on the augmented training batches of the epoch
    val_top1: list[float]
    test_top1: list[float] | None  # logged only, never used to select


@dataclass
class TrainState:
    """Where training stands after ``epoch`` finished epochs: what a resumed run continues from."""

    epoch: int = 0
    best_score: float = -math.inf  # mean val top-1 over exits and peers of the best epoch
    best_epoch: int = -1  # 1-based
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch (metrics.jsonl)


@dataclass
class EpochSums:
    """One epoch's training statistics on this process, kept on the device so that a step never waits for the
    host: per-sample sums of the loss, its terms and the monitor terms; correct predictions per exit; the first
    non-finite loss. The host reads them every ``train.log_every`` steps and at the epoch's end."""

    hits: list[torch.Tensor]  # per peer: K correct predictions (float64, on the device)
    nonfinite: torch.Tensor  # [step, index into names, value] of the first non-finite loss term; step -1: none
    names: list[str] = field(default_factory=list)  # "loss", its terms, then the monitor terms (first step's)
    num_losses: int = 0  # the first num_losses names are "loss" and its terms; the rest are monitors
    totals: torch.Tensor | None = None  # per-sample sums in the order of names (float64, on the device)
    seen: int = 0
    lr: float = 0.0  # at the last step
    start: float = field(default_factory=time.perf_counter)

    def add(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
        monitors: dict[str, torch.Tensor],
        count: int,
        step: int,
    ) -> None:
        """Accumulate one micro-batch of ``count`` samples (0-d loss, terms and monitors), on the device."""
        values = torch.stack([loss, *terms.values(), *monitors.values()]).detach().double()
        if self.totals is None:
            self.names, self.num_losses = ["loss", *terms, *monitors], 1 + len(terms)
            self.totals = torch.zeros_like(values)
        self.totals += values * count
        self.seen += count
        self.nonfinite = first_nonfinite(self.nonfinite, values[: self.num_losses], step)


StepStatistics = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], list[torch.Tensor]]


class Ensemble(nn.Module):
    """The networks trained together (one, or the DML peers), as one module for DDP and checkpoints."""

    def __init__(self, peers: list[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, x: torch.Tensor) -> list[Output]:
        return [peer(x) for peer in self.peers]


@dataclass
class Run:
    """Everything a training run is built from, built once by ``build_run``."""

    cfg: Config  # data.num_classes and data.image_size resolved from the data
    ctx: distributed.Context
    splits: Splits
    peer_cfgs: list[Config]  # one per peer: what each peer's deploy directory records
    nets: list[nn.Module]  # per peer: the model, wrapped in its SiLa heads when SiLa is on
    ensemble: Ensemble  # the nets as one module: what checkpoints hold
    forward: nn.Module  # the ensemble, or its DDP wrapper
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
        return _train(cfg, force, ctx)
    finally:
        distributed.cleanup(ctx)


def _train(cfg: Config, force: bool, ctx: distributed.Context) -> TrainResult:
    refuse_existing_run(cfg, force)  # before the data loads: the common mistake, told at once
    distributed.barrier(ctx)  # every rank has looked before rank 0 writes anything
    run = build_run(cfg, ctx, cfg.resume and (cfg.run_dir / LAST).exists())
    with contextlib.ExitStack() as held:
        take_run_directory(run, force, held)
        return _train_locked(run)


def _train_locked(run: Run) -> TrainResult:
    """The run with its directory locked (rank 0): restore or start, the epochs, the export."""
    cfg, ctx = run.cfg, run.ctx
    resuming = cfg.resume and (cfg.run_dir / LAST).exists()
    state = restore_state(run) if resuming else TrainState()
    if cfg.resume and not resuming:
        # resume=true with nothing to resume starts fresh, saying so, rather than refusing: a torchrun relaunch
        # script passes the same command line (resume=true) on every launch, the first included, and a job
        # preempted before its first checkpoint must simply start again
        run.say(f"no checkpoint in {cfg.run_dir} ({LAST}): starting fresh")
    if ctx.is_main:
        atomic_write_text(cfg.run_dir / CONFIG, config_to_yaml(run.cfg))
    run.say(describe(run))

    clock = Clock(run.steps_per_epoch * (cfg.train.epochs - state.epoch))
    for epoch in range(state.epoch, cfg.train.epochs):
        sums = train_one_epoch(run, epoch, clock)
        end_of_epoch(run, state, epoch, sums)

    if not ctx.is_main:
        distributed.barrier(ctx)
        return TrainResult(cfg.run_dir, state.best_epoch, [], [], [], [pc.run_dir for pc in run.peer_cfgs])
    try:
        return export(run, state.best_epoch)
    finally:
        distributed.barrier(ctx)


def refuse_existing_run(cfg: Config, force: bool) -> None:
    if holds_run(cfg.run_dir) and not (cfg.resume or force):
        raise DynsilaError(
            f"run directory {cfg.run_dir} already exists; pass resume=true to continue it, --force to "
            "overwrite it, or another name=..."
        )


def take_run_directory(run: Run, force: bool, held: contextlib.ExitStack) -> None:
    """Rank 0 locks the run directory for the rest of the run (released by ``held``, or by the OS should the
    process die) and looks again for a run there, now that no other process can write one; every rank stops
    when it could not."""
    failure: DynsilaError | None = None
    if run.ctx.is_main:
        try:
            held.enter_context(run_lock(run.cfg.run_dir))
            refuse_existing_run(run.cfg, force)
        except DynsilaError as e:
            failure = e
    if distributed.broadcast_flag(failure is not None, run.ctx):
        raise failure or TrainingError(f"rank 0 could not take {run.cfg.run_dir}; see its error line")


# --- building the run ---------------------------------------------------------------------------------------


def build_run(cfg: Config, ctx: distributed.Context, resuming: bool) -> Run:
    """Data, peers (same initial weights on every rank), device placement, DDP, optimizer and loaders."""
    amp_dtype = autocast_dtype(cfg.train.amp, ctx.device)
    if cfg.train.sync_bn and ctx.enabled and ctx.device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernels); set it to false")
    per_rank_batch, micro = _batch_split(cfg, ctx)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    splits = build_splits(cfg.data)
    cfg.data.num_classes, cfg.data.image_size = splits.num_classes, splits.image_size  # config rebuilds the model
    peer_cfgs = peer_configs(cfg)
    nets = build_peers(cfg, peer_cfgs, splits.num_classes, resuming)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    ensemble, forward = place_ensemble(nets, cfg.train.sync_bn, memory_format, ctx)
    batch, workers = cfg.data.eval_batch_size, cfg.data.num_workers
    device_batches = None
    if cfg.data.on_device:
        device_batches = DeviceBatches(splits.train, cfg.data, per_rank_batch, ctx.device, ctx.rank, ctx.world_size)
    train_loader = device_batches or _train_loader(splits, cfg, ctx, per_rank_batch, epoch=0)
    return Run(
        cfg=cfg,
        ctx=ctx,
        splits=splits,
        peer_cfgs=peer_cfgs,
        nets=nets,
        ensemble=ensemble,
        forward=forward,
        optimizer=build_optimizer(cfg.train, ensemble),
        scaler=torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16),
        amp_dtype=amp_dtype,
        memory_format=memory_format,
        per_rank_batch=per_rank_batch,
        micro_batches=micro,
        steps_per_epoch=len(train_loader),
        val_loader=make_loader(splits.val, batch, shuffle=False, num_workers=workers),
        test_loader=make_loader(splits.test, batch, shuffle=False, num_workers=workers),
        device_batches=device_batches,
        compute=torch.compile(forward_and_statistics) if cfg.train.compile else forward_and_statistics,
    )


def peer_configs(cfg: Config) -> list[Config]:
    """One config per DML peer: its own model section, no DML, and its own directory inside the run's."""
    if cfg.dml.peers == 1:
        return [cfg]
    sections = cfg.dml.models or [cfg.model] * cfg.dml.peers
    return [
        dataclasses.replace(cfg, name=f"peer{i}", out_dir=str(cfg.run_dir), model=dict(section), dml=DMLConfig())
        for i, section in enumerate(sections)
    ]


def build_peers(cfg: Config, peer_cfgs: list[Config], num_classes: int, resuming: bool) -> list[nn.Module]:
    """Each peer's network (initialised from ``train.init_from`` unless resuming), in its SiLa heads if on."""
    nets: list[nn.Module] = []
    for i, peer_cfg in enumerate(peer_cfgs):
        model = build_model(peer_cfg, num_classes)
        if cfg.train.init_from and not resuming:
            initialise_from(model, Path(cfg.train.init_from), i if len(peer_cfgs) > 1 else None)
        set_training_stage(model, cfg.train.stage)
        nets.append(SiLa(model, cfg.sila) if cfg.sila.enabled else model)
    exits_per_peer = [unwrap(net).num_exits for net in nets]
    for i in range(1, len(nets)):
        exit_pairs(exits_per_peer[0], exits_per_peer[i], cfg.dml.align)  # fails early on mismatched peers
    return nets


def place_ensemble(
    nets: list[nn.Module], sync_bn: bool, memory_format: torch.memory_format, ctx: distributed.Context
) -> tuple[Ensemble, nn.Module]:
    """(the ensemble on the device, what the loop calls: the ensemble or its DistributedDataParallel wrapper)."""
    ensemble = Ensemble(nets).to(ctx.device)
    ensemble.to(memory_format=memory_format)
    if not ctx.enabled:
        return ensemble, ensemble
    if sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(ensemble)
    device_ids = None if ctx.device.index is None else [ctx.device.index]
    return ensemble, nn.parallel.DistributedDataParallel(ensemble, device_ids=device_ids)


def restore_state(run: Run) -> TrainState:
    """Weights, optimizer, scaler and this rank's RNG state from ``last.pt``; the metrics rows it had written."""
    path = run.cfg.run_dir / LAST
    checkpoint = load_checkpoint(path)
    try:
        load_weights(run.ensemble, checkpoint["model"], path)
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            run.scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint["rng"]
        set_rng_state(states[run.ctx.rank] if len(states) == run.ctx.world_size else states[0])
        epoch, best_score = int(checkpoint["epoch"]), float(checkpoint["best_score"])
        best_epoch = int(checkpoint["best_epoch"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        detail = f"no entry {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise CheckpointError(
            f"{path} is not a whole training checkpoint ({detail}); resume from a last.pt written by dynsila.train "
            "or start again without resume=true"
        ) from None
    run.say(f"resuming {run.cfg.run_dir} after epoch {epoch}")
    return TrainState(epoch, best_score, best_epoch, read_metrics(run.cfg.run_dir)[:epoch])


def describe(run: Run) -> str:
    """The run's first line: what trains on what, where, for how long."""
    cfg, splits = run.cfg, run.splits
    sizes = " / ".join(f"{dataset_size(getattr(splits, s))} {s}" for s in ("train", "val", "test"))
    return (
        f"{cfg.name}: {', '.join(pc.model['name'] for pc in run.peer_cfgs)} on {cfg.data.name} ({sizes}, "
        f"{splits.num_classes} classes), sila={'on' if cfg.sila.enabled else 'off'}, dml peers {cfg.dml.peers}, "
        f"device {run.device} x {run.ctx.world_size} process(es), amp {run.amp_dtype or 'off'}, "
        f"{cfg.train.epochs} epochs x {run.steps_per_epoch} steps"
    )


# --- one epoch ----------------------------------------------------------------------------------------------


def train_one_epoch(run: Run, epoch: int, clock: Clock) -> EpochSums:
    """One pass over this rank's shard of the training set; progress lines every ``train.log_every`` steps."""
    cfg, device = run.cfg, run.device
    run.ensemble.train()
    sums = new_epoch_sums(run)
    for step, (images, labels) in enumerate(epoch_batches(run, epoch)):
        sums.lr = learning_rate(cfg.train, epoch * run.steps_per_epoch + step, run.steps_per_epoch)
        for group in run.optimizer.param_groups:
            group["lr"] = sums.lr
        x = normalize(images.to(device, non_blocking=True), run.splits.mean, run.splits.std)
        x = x.contiguous(memory_format=run.memory_format)
        train_step(run, x, labels.to(device, non_blocking=True), step, sums)
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
    return _train_loader(run.splits, run.cfg, run.ctx, run.per_rank_batch, epoch)


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, step: int, sums: EpochSums) -> None:
    """One optimizer step on a normalised batch, as ``micro_batches`` strided micro-batches (see _batch_split).
    Nothing here waits for the device (with fp16, PyTorch's GradScaler does, once per step)."""
    ddp = run.forward if isinstance(run.forward, nn.parallel.DistributedDataParallel) else None
    micro = run.micro_batches
    run.optimizer.zero_grad(set_to_none=True)
    for m in range(micro):  # strided micro-batches: the shards DDP ranks would see
        xs, ys = x[m::micro], y[m::micro]
        sync = ddp.no_sync() if ddp is not None and m < micro - 1 else contextlib.nullcontext()
        with sync:
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
    monitor terms (detached diagnostics, never added to the loss) and, per peer, correct predictions per exit (K).
    ``x``: N x 3 x H x W normalised images, ``y``: N labels."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        outputs = forward(x)
        terms = ensemble_loss_terms(outputs, y, cfg)
        loss = torch.stack(list(terms.values())).sum()
    monitors = ensemble_monitor_terms(outputs, y, cfg)
    hits = [(torch.stack(logits_of(output), dim=1).argmax(-1) == y[:, None]).sum(0) for output in outputs]
    return loss, terms, monitors, hits


def first_nonfinite(record: torch.Tensor, losses: torch.Tensor, step: int) -> torch.Tensor:
    """``record`` ([step, index, value]; step -1: nothing yet) updated with one micro-batch's ``losses`` ([loss,
    term 1, term 2, ...]) on the device, without a host sync. The first bad step is kept; a bad term is named
    before the total."""
    bad = ~torch.isfinite(losses)
    bad_terms = bad[1:]
    index = torch.where(bad_terms.any(), bad_terms.int().argmax() + 1, 0)
    value = losses.gather(0, index.view(1))[0]  # not losses[index]: a 0-d index tensor is read on the host
    now = torch.stack([losses.new_full((), step), index.to(losses.dtype), value])
    return torch.where(bad.any() & (record[0] < 0), now, record)


def read_progress(run: Run, sums: EpochSums, epoch: int, step: int) -> dict[str, float]:
    """The host's read of the device statistics (every log_every steps and at the epoch's end): the running means
    per name. Stops every rank when any rank has seen a non-finite loss, naming where it first appeared."""
    assert sums.totals is not None  # called after a step
    host = torch.cat([sums.totals, sums.nonfinite]).tolist()  # one sync
    bad_step, bad_index, bad_value = int(host[-3]), int(host[-2]), host[-1]
    anywhere = bad_step >= 0
    if run.ctx.enabled:  # every rank checks at the same steps, so all stop together
        anywhere = float(distributed.sum_across_ranks(torch.tensor([float(anywhere)]), run.ctx)[0]) > 0
    if anywhere:
        run_dir = run.cfg.run_dir
        kept = f"last good checkpoint kept at {run_dir / LAST}" if (run_dir / LAST).exists() else "no checkpoint yet"
        what = f"loss term '{sums.names[bad_index]}' is {bad_value} at epoch {epoch + 1} step {bad_step + 1}"
        if bad_step < 0:
            what = f"a loss term is not finite on another process by epoch {epoch + 1} step {step + 1}"
        elif bad_step != step:
            what += f" (seen at step {step + 1}: the check runs every train.log_every={run.cfg.train.log_every} steps)"
        raise TrainingError(f"{what}; {kept}; lower train.lr or check the data")
    return {name: total / sums.seen for name, total in zip(sums.names, host[:-3], strict=True)}


# --- end of an epoch ----------------------------------------------------------------------------------------


def end_of_epoch(run: Run, state: TrainState, epoch: int, sums: EpochSums) -> None:
    """Sum the epoch's statistics over ranks; rank 0 evaluates, writes the metrics row and checkpoints, and
    logs; a failure there (a full disk) stops every rank."""
    ctx = run.ctx
    assert sums.totals is not None  # an epoch has at least one step
    seen_and_totals = torch.cat([sums.totals.new_full((1,), sums.seen), sums.totals])
    totals = distributed.sum_across_ranks(seen_and_totals, ctx).tolist()
    seen = totals[0]
    means = {name: value / seen for name, value in zip(sums.names, totals[1:], strict=True)}
    hits = [distributed.sum_across_ranks(h, ctx) for h in sums.hits]
    rng_states = distributed.gather_objects(rng_state(), ctx)
    failure: DynsilaError | None = None
    if ctx.is_main:  # evaluation and files: rank 0 only, so nothing is counted or written twice
        try:
            accuracy = evaluate(run, [h / seen * 100 for h in hits])
            row = {"epoch": epoch + 1, **means, "lr": sums.lr, **dataclasses.asdict(accuracy[0])}
            row["seconds"] = time.perf_counter() - sums.start
            if len(accuracy) > 1:
                row["peers"] = [dataclasses.asdict(a) for a in accuracy]
            improved = record_epoch(run, state, row, accuracy, rng_states)
            log_accuracy(run, epoch, accuracy, improved)
        except DynsilaError as e:
            failure = e
    if distributed.broadcast_flag(failure is not None, ctx):
        raise failure or TrainingError("rank 0 failed to evaluate or save; see its error line")
    state.epoch = epoch + 1
    state.best_epoch = int(distributed.sum_across_ranks(torch.tensor([state.best_epoch if ctx.is_main else 0]), ctx)[0])


def evaluate(run: Run, train_top1: list[torch.Tensor]) -> list[PeerAccuracy]:
    """Per peer: the epoch's training top-1 (given, per exit), val top-1 and (when configured) test top-1."""
    accuracy = []
    for net, train_acc in zip(run.nets, train_top1, strict=True):
        bare, mean, std = unwrap(net), run.splits.mean, run.splits.std
        val_top1 = topk_accuracy(*collect_logits(bare, run.val_loader, mean, std, run.device)).tolist()
        test_top1 = None
        if run.cfg.train.eval_test_every_epoch:
            test_top1 = topk_accuracy(*collect_logits(bare, run.test_loader, mean, std, run.device)).tolist()
        accuracy.append(PeerAccuracy(train_acc.tolist(), val_top1, test_top1))
    return accuracy


def record_epoch(
    run: Run, state: TrainState, row: dict[str, Any], accuracy: list[PeerAccuracy], rng_states: list[Any]
) -> bool:
    """Append the metrics row, update the best score, write last.pt (and best.pt when it improved)."""
    state.metrics.append(row)
    score = float(np.mean([np.mean(a.val_top1) for a in accuracy]))  # mean top-1 over exits and peers
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch = score, row["epoch"]
    checkpoint = {
        "model": run.ensemble.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
        "epoch": row["epoch"],
        "step": row["epoch"] * run.steps_per_epoch,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "rng": rng_states,
        "world_size": run.ctx.world_size,
        "config": config_to_yaml(run.cfg),
    }
    # best.pt before last.pt: a kill between the two then leaves last.pt one epoch behind (that epoch reruns and
    # rewrites best.pt identically), never a last.pt whose best_epoch names weights best.pt does not hold
    write_metrics(run.cfg.run_dir, state.metrics)
    if improved:
        save_checkpoint(run.cfg.run_dir / BEST, checkpoint)
    save_checkpoint(run.cfg.run_dir / LAST, checkpoint)
    return improved


def log_accuracy(run: Run, epoch: int, accuracy: list[PeerAccuracy], improved: bool) -> None:
    for i, a in enumerate(accuracy):
        who = f"epoch {epoch + 1}" + (f" peer {i}" if len(accuracy) > 1 else "")
        run.say(
            f"{who}: val top-1 per exit {format_row(a.val_top1)}"
            + (f"  test {format_row(a.test_top1)}" if a.test_top1 else "")
            + ("  (best)" if improved else "")
        )


# --- after training -----------------------------------------------------------------------------------------


def export(run: Run, best_epoch: int) -> TrainResult:
    """Best weights -> pruned deploy model per peer, each evaluated (eval.json) and summarised. Rank 0 only."""
    run_dir = run.cfg.run_dir
    best = load_checkpoint(run_dir / BEST)
    load_weights(run.ensemble, best["model"], run_dir / BEST)
    many = len(run.nets) > 1
    log.info(f"\nbest epoch {best_epoch} (selected by mean val top-1 over exits{' and peers' if many else ''})")
    reports = []
    for net, peer_cfg in zip(run.nets, run.peer_cfgs, strict=True):
        peer_dir = peer_cfg.run_dir
        peer_yaml = config_to_yaml(peer_cfg)
        atomic_write_text(peer_dir / CONFIG, peer_yaml)
        deploy = prune(net).cpu().eval().to(memory_format=torch.contiguous_format)
        save_deploy(peer_dir / DEPLOY, deploy, peer_yaml)
        reports.append(evaluate_run(peer_dir, device=str(run.device)))  # writes eval.json: costs, anytime, budgeted
        log.info(format_report(reports[-1], criteria=["max_prob"]))
        log.info(f"\ndeploy weights (training-only heads pruned): {peer_dir / DEPLOY}; all criteria in {EVAL_FILE}")
    exits = reports[0].exits
    return TrainResult(
        run_dir,
        best_epoch,
        [e.val_top1 for e in exits],
        [e.test_top1 for e in exits],
        [e.params_cumulative for e in exits],
        [pc.run_dir for pc in run.peer_cfgs],
    )


def initialise_from(model: nn.Module, source: Path, peer: int | None) -> None:
    """Load the deploy weights of a finished run (its peer ``peer`` for DML) into ``model``: e.g. the SP run a
    SkipNet HRL stage starts from. Training-only heads start fresh."""
    if peer is not None and (source / f"peer{peer}").is_dir():
        source = source / f"peer{peer}"
    path = source if source.suffix == ".safetensors" else source / DEPLOY
    state, _ = read_deploy(path)
    load_weights(model, state, path)


def set_training_stage(model: nn.Module, stage: str) -> None:
    """SkipNet stages: straight-through gates for supervised pre-training, sampled gate actions for HRL."""
    body = gated_body(model)
    if stage == "hrl" and body is None:
        raise ConfigError(f"train.stage=hrl needs a gated model (skipnet), not {type(model).__name__}; use sp")
    if body is not None:
        body.gate_mode = "sample" if stage == "hrl" else "straight_through"


def _batch_split(cfg: Config, ctx: distributed.Context) -> tuple[int, int]:
    """(batch per rank, micro-batches per step). data.batch_size is the global batch: ranks x micro-batches
    must divide it. Micro-batches are strided (x[m::M]), which is exactly how DistributedSampler shards a global
    batch over M ranks, so M micro-batches on one process compute what M DDP ranks compute."""
    global_batch, micro = cfg.data.batch_size, cfg.train.accumulate_steps
    if micro < 1 or global_batch % (ctx.world_size * micro):
        raise ConfigError(
            f"data.batch_size={global_batch} must be divisible by the {ctx.world_size} process(es) "
            f"x train.accumulate_steps={micro}; change one of them"
        )
    return global_batch // ctx.world_size, micro


def _train_loader(splits: Splits, cfg: Config, ctx: distributed.Context, batch_size: int, epoch: int) -> DataLoader:
    """Shuffled, drop_last (no 1-sample batch-norm batches). Single process: order seeded by seed and epoch.
    DDP: DistributedSampler (same global permutation on every rank, each rank a strided shard)."""
    n_train = dataset_size(splits.train)
    batch_size = min(batch_size, n_train)
    if not ctx.enabled:
        return make_loader(
            splits.train,
            batch_size,
            shuffle=True,
            seed=cfg.seed * 100_003 + epoch,
            num_workers=cfg.data.num_workers,
            drop_last=True,
        )
    sampler: DistributedSampler = DistributedSampler(
        splits.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        splits.train, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=cfg.data.num_workers
    )


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None (full precision) or the autocast dtype. auto: bf16 on CUDA where supported, else fp16 (with a
    GradScaler); off on CPU, where bf16 autocast is only faster on CPUs with bf16 units: ask for it with bf16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs CUDA (its GradScaler); use train.amp=bf16 on a CPU, or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


# --- pieces of the loop -------------------------------------------------------------------------------------


def build_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    params = parameter_groups(net, cfg.decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def parameter_groups(net: nn.Module, decay: str) -> list[dict[str, Any]]:
    """The trainable parameters as optimizer groups: one group when weight decay reaches ``all`` of them; with
    ``weights``, a second group without decay for norms, biases (every parameter of at most one dimension) and the
    parameters a module names in its ``no_weight_decay()`` (a ViT's class token and position embedding)."""
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    if decay == "all":
        return [{"params": [p for _, p in trainable]}]
    exempt = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in net.named_modules()
        if callable(getattr(module, "no_weight_decay", None))
        for name in module.no_weight_decay()
    }
    spared = {name for name, p in trainable if p.ndim <= 1 or name in exempt}
    decayed = [p for name, p in trainable if name not in spared]
    plain = [p for name, p in trainable if name in spared]
    return [{"params": decayed}, {"params": plain, "weight_decay": 0.0}]


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step: a constant warm-up lr for ``constant_warmup_steps`` steps (SkipNet-110's
    400 at 0.01), or a linear warm-up, then multistep (x gamma at each milestone, given as a fraction of
    training), cosine to zero, or constant."""
    if step < cfg.constant_warmup_steps:
        return cfg.constant_warmup_lr
    epoch = step / max(1, steps_per_epoch)
    if epoch < cfg.warmup_epochs:
        return cfg.lr * (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "multistep":
        passed = sum(epoch >= m * cfg.epochs for m in cfg.milestones)
        return cfg.lr * cfg.gamma**passed
    if cfg.schedule == "cosine":
        span = max(1e-9, cfg.epochs - cfg.warmup_epochs)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    return cfg.lr


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and numbers (``weights_only``-loadable)."""
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    _, keys, pos, has_gauss, cached = legacy
    version, py_state, gauss = random.getstate()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Clock:
    """Throughput and ETA over the steps this process runs."""

    def __init__(self, total_steps: int) -> None:
        self.start, self.total, self.steps, self.images = time.perf_counter(), total_steps, 0, 0

    def tick(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def images_per_second(self) -> float:
        return self.images / max(1e-9, time.perf_counter() - self.start)

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / max(1, self.steps) * (self.total - self.steps)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))


def format_row(values: list[float]) -> str:
    return " ".join(f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dynsila.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config, e.g. configs/msdnet_sila.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 sila.enabled=false")
    parser.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    args = parser.parse_args(argv)
    with log_lines_to(sys.stdout):  # the library's log records, printed as plain lines
        try:
            train(load_config(args.config, args.overrides), force=args.force)
        except USER_ERRORS as e:
            return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
