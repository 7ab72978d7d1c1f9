"""Train a multi-exit network: ``python -m dynsila.train CONFIG.yaml [key=value ...] [--force]``.

One loop for every model: loss = exit cross-entropy + the terms the config switches on (SiLa, ...); optimizer
and schedule from the config; per-epoch validation (model selection) and test (logged only); checkpoints and
deploy weights in ``runs/<name>/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from dynsila import distributed
from dynsila.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    load_weights,
    read_deploy,
    save_checkpoint,
    save_deploy,
)
from dynsila.config import Config, DMLConfig, TrainConfig, config_to_yaml, load_config
from dynsila.data import Splits, build_splits, dataset_size, make_loader, normalize
from dynsila.dml import exit_pairs
from dynsila.errors import ConfigError, DynsilaError, TrainingError
from dynsila.evaluate import EVAL_FILE, collect_logits, evaluate_run, format_report, topk_accuracy
from dynsila.losses import Output, ensemble_loss_terms, logits_of
from dynsila.models import gated_body
from dynsila.rundir import BEST, CONFIG, DEPLOY, LAST, build_model, read_metrics, write_metrics
from dynsila.sila import SiLa, prune, unwrap


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


def peer_configs(cfg: Config) -> list[Config]:
    """One config per DML peer: its own model section, no DML, and its own directory inside the run's."""
    if cfg.dml.peers == 1:
        return [cfg]
    sections = cfg.dml.models or [cfg.model] * cfg.dml.peers
    return [
        dataclasses.replace(cfg, name=f"peer{i}", out_dir=str(cfg.run_dir), model=dict(section), dml=DMLConfig())
        for i, section in enumerate(sections)
    ]


class Ensemble(nn.Module):
    """The networks trained together (one, or the DML peers), as one module for DDP and checkpoints."""

    def __init__(self, peers: list[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, x: torch.Tensor) -> list[Output]:
        return [peer(x) for peer in self.peers]


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
    run_dir, device, say = cfg.run_dir, ctx.device, _printer(ctx)
    resuming = cfg.resume and (run_dir / LAST).exists()
    if run_dir.exists() and any(run_dir.iterdir()) and not (cfg.resume or force):
        raise DynsilaError(
            f"run directory {run_dir} already exists; pass resume=true to continue it, --force to "
            "overwrite it, or another name=..."
        )
    distributed.barrier(ctx)  # every rank has looked before rank 0 writes anything
    amp_dtype = autocast_dtype(cfg.train.amp, device)
    if cfg.train.sync_bn and ctx.enabled and device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernels); set it to false")
    per_rank_batch, micro = _batch_split(cfg, ctx)

    seed_everything(cfg.seed)  # identical initial weights on every rank
    splits = build_splits(cfg.data)
    cfg.data.num_classes, cfg.data.image_size = splits.num_classes, splits.image_size  # config rebuilds the model
    peers_cfg = peer_configs(cfg)
    nets: list[nn.Module] = []
    for i, peer_cfg in enumerate(peers_cfg):
        model = build_model(peer_cfg, splits.num_classes)
        if cfg.train.init_from and not resuming:
            initialise_from(model, Path(cfg.train.init_from), i if len(peers_cfg) > 1 else None)
        set_training_stage(model, cfg.train.stage)
        nets.append(SiLa(model, cfg.sila) if cfg.sila.enabled else model)
    exits_per_peer = [unwrap(net).num_exits for net in nets]
    for i in range(1, len(nets)):
        exit_pairs(exits_per_peer[0], exits_per_peer[i], cfg.dml.align)  # fails early on mismatched peers
    ensemble = Ensemble(nets).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    ensemble.to(memory_format=memory_format)
    if cfg.train.sync_bn and ctx.enabled:
        nn.SyncBatchNorm.convert_sync_batchnorm(ensemble)
    ddp = None
    if ctx.enabled:
        ddp = nn.parallel.DistributedDataParallel(ensemble, device_ids=None if device.index is None else [device.index])
    forward: nn.Module = ddp if ddp is not None else ensemble
    optimizer = build_optimizer(cfg.train, ensemble)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    steps_per_epoch = len(_train_loader(splits, cfg, ctx, per_rank_batch, epoch=0))
    total_steps = steps_per_epoch * cfg.train.epochs
    val_loader = make_loader(splits.val, cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    test_loader = make_loader(splits.test, cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)

    start_epoch, best_score, best_epoch, metrics = 0, -math.inf, -1, []
    if resuming:
        checkpoint = load_checkpoint(run_dir / LAST)
        load_weights(ensemble, checkpoint["model"], run_dir / LAST)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint["rng"]
        set_rng_state(states[ctx.rank] if len(states) == ctx.world_size else states[0])
        start_epoch, best_score, best_epoch = checkpoint["epoch"], checkpoint["best_score"], checkpoint["best_epoch"]
        metrics = read_metrics(run_dir)[:start_epoch]
        say(f"resuming {run_dir} after epoch {start_epoch}")
    config_yaml = config_to_yaml(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG, config_yaml)
    sizes = " / ".join(f"{dataset_size(getattr(splits, s))} {s}" for s in ("train", "val", "test"))
    say(
        f"{cfg.name}: {', '.join(pc.model['name'] for pc in peers_cfg)} on {cfg.data.name} ({sizes}, "
        f"{splits.num_classes} classes), sila={'on' if cfg.sila.enabled else 'off'}, dml peers {cfg.dml.peers}, "
        f"device {device} x {ctx.world_size} process(es), amp {amp_dtype or 'off'}, "
        f"{cfg.train.epochs} epochs x {steps_per_epoch} steps"
    )

    clock = Clock(total_steps - start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_start = time.perf_counter()
        loader = _train_loader(splits, cfg, ctx, per_rank_batch, epoch)
        ensemble.train()
        sums: dict[str, float] = {}
        hits_per_peer = [torch.zeros(k, dtype=torch.float64) for k in exits_per_peer]
        seen = 0
        for step, (images, labels) in enumerate(loader):
            lr = learning_rate(cfg.train, epoch * steps_per_epoch + step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = normalize(images.to(device, non_blocking=True), splits.mean, splits.std)
            x = x.contiguous(memory_format=memory_format)
            y = labels.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            for m in range(micro):  # strided micro-batches: the shards DDP ranks would see (see _batch_split)
                xs, ys = x[m::micro], y[m::micro]
                sync = ddp.no_sync() if ddp is not None and m < micro - 1 else contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        outputs = forward(xs)
                        terms = ensemble_loss_terms(outputs, ys, cfg)
                        loss = torch.stack(list(terms.values())).sum()
                    check_finite(loss, terms, epoch, step, run_dir, ctx)
                    scaler.scale(loss / micro).backward()
                for hits, output in zip(hits_per_peer, outputs, strict=True):
                    hits += (torch.stack(logits_of(output), dim=1).argmax(-1) == ys[:, None]).sum(0).cpu()
                for name, value in {"loss": loss, **terms}.items():
                    sums[name] = sums.get(name, 0.0) + value.item() * len(ys)
                seen += len(ys)
            scaler.step(optimizer)
            scaler.update()
            clock.tick(len(y) * ctx.world_size)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps_per_epoch:
                parts = ", ".join(f"{k} {v / seen:.3f}" for k, v in sums.items() if k != "loss")
                say(
                    f"epoch {epoch + 1}/{cfg.train.epochs}  step {step + 1}/{steps_per_epoch}  "
                    f"loss {sums['loss'] / seen:.4f} ({parts})  lr {lr:.4g}  {clock.images_per_second():.0f} img/s  "
                    f"eta {clock.eta()}",
                )

        # metrics over all ranks: sums of per-sample losses and hits, divided by the global sample count
        totals = distributed.sum_across_ranks(torch.tensor([seen, *sums.values()], dtype=torch.float64), ctx)
        seen_all, sums = float(totals[0]), dict(zip(sums, totals[1:].tolist(), strict=True))
        hits_all = [distributed.sum_across_ranks(h, ctx) for h in hits_per_peer]
        rng_states = distributed.gather_objects(rng_state(), ctx)
        failure: DynsilaError | None = None
        improved = False
        if ctx.is_main:  # evaluation and files: rank 0 only, so nothing is counted or written twice
            try:
                accuracy = [
                    _peer_accuracy(net, hits, seen_all, val_loader, test_loader, splits, device, cfg)
                    for net, hits in zip(nets, hits_all, strict=True)
                ]
                row: dict[str, Any] = {
                    "epoch": epoch + 1,
                    **{k: v / seen_all for k, v in sums.items()},
                    "lr": lr,
                    **dataclasses.asdict(accuracy[0]),
                    "seconds": time.perf_counter() - epoch_start,
                }
                if len(nets) > 1:
                    row["peers"] = [dataclasses.asdict(a) for a in accuracy]
                metrics.append(row)
                score = float(np.mean([np.mean(a.val_top1) for a in accuracy]))  # mean top-1 over exits and peers
                improved = score > best_score
                if improved:
                    best_score, best_epoch = score, epoch + 1
                checkpoint = {
                    "model": ensemble.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "epoch": epoch + 1,
                    "step": (epoch + 1) * steps_per_epoch,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "rng": rng_states,
                    "world_size": ctx.world_size,
                    "config": config_yaml,
                }
                write_metrics(run_dir, metrics)
                save_checkpoint(run_dir / LAST, checkpoint)
                if improved:
                    save_checkpoint(run_dir / BEST, checkpoint)
                for i, a in enumerate(accuracy):
                    who = f"epoch {epoch + 1}" + (f" peer {i}" if len(nets) > 1 else "")
                    say(
                        f"{who}: val top-1 per exit {format_row(a.val_top1)}"
                        + (f"  test {format_row(a.test_top1)}" if a.test_top1 else "")
                        + ("  (best)" if improved else "")
                    )
            except DynsilaError as e:
                failure = e
        if distributed.broadcast_flag(failure is not None, ctx):
            raise failure or TrainingError("rank 0 failed to evaluate or save; see its error line")
        best_epoch = int(distributed.sum_across_ranks(torch.tensor([best_epoch if ctx.is_main else 0]), ctx)[0])

    if not ctx.is_main:
        distributed.barrier(ctx)
        return TrainResult(run_dir, best_epoch, [], [], [], [pc.run_dir for pc in peers_cfg])
    try:
        result = _export(cfg, ensemble, nets, peers_cfg, best_epoch, device)
    finally:
        distributed.barrier(ctx)
    return result


def _export(
    cfg: Config,
    ensemble: nn.Module,
    nets: list[nn.Module],
    peers_cfg: list[Config],
    best_epoch: int,
    device: torch.device,
) -> TrainResult:
    """Best weights -> pruned deploy model per peer, each evaluated (eval.json) and summarised."""
    run_dir = cfg.run_dir
    best = load_checkpoint(run_dir / BEST)
    load_weights(ensemble, best["model"], run_dir / BEST)
    many = len(nets) > 1
    print(f"\nbest epoch {best_epoch} (selected by mean val top-1 over exits{' and peers' if many else ''})")
    reports = []
    for net, peer_cfg in zip(nets, peers_cfg, strict=True):
        peer_dir = peer_cfg.run_dir
        peer_yaml = config_to_yaml(peer_cfg)
        atomic_write_text(peer_dir / CONFIG, peer_yaml)
        deploy = prune(net).cpu().eval().to(memory_format=torch.contiguous_format)
        save_deploy(peer_dir / DEPLOY, deploy, peer_yaml)
        reports.append(evaluate_run(peer_dir, device=str(device)))  # writes eval.json: costs, anytime, budgeted
        print(format_report(reports[-1], criteria=["max_prob"]))
        print(f"\ndeploy weights (training-only heads pruned): {peer_dir / DEPLOY}; all criteria in {EVAL_FILE}")
    exits = reports[0]["exits"]
    return TrainResult(
        run_dir,
        best_epoch,
        [e["val_top1"] for e in exits],
        [e["test_top1"] for e in exits],
        [e["params_cumulative"] for e in exits],
        [pc.run_dir for pc in peers_cfg],
    )


def _peer_accuracy(
    net: nn.Module,
    hits: torch.Tensor,
    seen: float,
    val_loader: DataLoader,
    test_loader: DataLoader,
    splits: Splits,
    device: torch.device,
    cfg: Config,
) -> PeerAccuracy:
    bare = unwrap(net)
    val_top1 = topk_accuracy(*collect_logits(bare, val_loader, splits.mean, splits.std, device)).tolist()
    test_top1 = (
        topk_accuracy(*collect_logits(bare, test_loader, splits.mean, splits.std, device)).tolist()
        if cfg.train.eval_test_every_epoch
        else None
    )
    return PeerAccuracy((hits / seen * 100).tolist(), val_top1, test_top1)


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


def _printer(ctx: distributed.Context) -> Callable[[str], None]:
    def say(line: str) -> None:
        if ctx.is_main:
            print(line, flush=True)

    return say


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
    params = [p for p in net.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step: linear warm-up, then multistep (x gamma at each milestone, given as a
    fraction of training), cosine to zero, or constant."""
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


def check_finite(
    loss: torch.Tensor,
    terms: dict[str, torch.Tensor],
    epoch: int,
    step: int,
    run_dir: Path,
    ctx: distributed.Context | None = None,
) -> None:
    """Stop on a NaN or infinite loss, naming the step and the term; every DDP rank stops together."""
    finite = bool(torch.isfinite(loss))
    if ctx is not None and ctx.enabled:
        finite = distributed.sum_across_ranks(torch.tensor([0.0 if finite else 1.0]), ctx).item() == 0
    if finite:
        return
    bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "loss")
    kept = f"last good checkpoint kept at {run_dir / LAST}" if (run_dir / LAST).exists() else "no checkpoint yet"
    raise TrainingError(
        f"loss term '{bad}' is {terms.get(bad, loss).item()} at epoch {epoch + 1} step {step + 1}; "
        f"{kept}; lower train.lr or check the data"
    )


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
    parser = argparse.ArgumentParser(prog="python -m dynsila.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config, e.g. configs/msdnet_sila.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 sila.enabled=false")
    parser.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    args = parser.parse_args(argv)
    try:
        train(load_config(args.config, args.overrides), force=args.force)
    except DynsilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
