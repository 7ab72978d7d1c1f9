"""Train a multi-exit network: ``python -m dynsila.train CONFIG.yaml [key=value ...] [--force]``.

One loop for every model: loss = exit cross-entropy + the terms the config switches on (SiLa, ...); optimizer
and schedule from the config; per-epoch validation (model selection) and test (logged only); checkpoints and
deploy weights in ``runs/<name>/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from dynsila.checkpoint import atomic_write_text, load_checkpoint, load_weights, save_checkpoint, save_deploy
from dynsila.config import Config, DMLConfig, TrainConfig, config_to_yaml, load_config
from dynsila.data import build_splits, dataset_size, make_loader, normalize
from dynsila.dml import exit_pairs
from dynsila.errors import DynsilaError, TrainingError
from dynsila.evaluate import EVAL_FILE, collect_logits, evaluate_run, format_report, topk_accuracy
from dynsila.losses import ensemble_loss_terms
from dynsila.rundir import BEST, CONFIG, DEPLOY, LAST, build_model, read_metrics, write_metrics
from dynsila.sila import SiLa, SiLaOutput, prune, unwrap


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


def train(cfg: Config, force: bool = False) -> TrainResult:
    """Run (or resume) the training the config describes; returns the best epoch's per-exit accuracies."""
    cfg = copy.deepcopy(cfg)
    run_dir = cfg.run_dir
    resuming = cfg.resume and (run_dir / LAST).exists()
    if run_dir.exists() and any(run_dir.iterdir()) and not (cfg.resume or force):
        raise DynsilaError(
            f"run directory {run_dir} already exists; pass resume=true to continue it, --force to "
            "overwrite it, or another name=..."
        )

    seed_everything(cfg.seed)
    device = select_device(cfg.train.device)
    splits = build_splits(cfg.data)
    cfg.data.num_classes, cfg.data.image_size = splits.num_classes, splits.image_size  # config rebuilds the model
    peers_cfg = peer_configs(cfg)
    nets: list[nn.Module] = []
    for peer_cfg in peers_cfg:
        model = build_model(peer_cfg, splits.num_classes)
        nets.append(SiLa(model, cfg.sila) if cfg.sila.enabled else model)
    exits_per_peer = [unwrap(net).num_exits for net in nets]
    for i in range(1, len(nets)):
        exit_pairs(exits_per_peer[0], exits_per_peer[i], cfg.dml.align)  # fails early on mismatched peers
    ensemble = nn.ModuleList(nets).to(device)
    optimizer = build_optimizer(cfg.train, ensemble)

    batch_size = min(cfg.data.batch_size, dataset_size(splits.train))
    steps_per_epoch = dataset_size(splits.train) // batch_size  # drop_last: no 1-sample batch-norm batches
    total_steps = steps_per_epoch * cfg.train.epochs
    val_loader = make_loader(splits.val, cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    test_loader = make_loader(splits.test, cfg.data.eval_batch_size, shuffle=False, num_workers=cfg.data.num_workers)

    start_epoch, best_score, best_epoch, metrics = 0, -math.inf, -1, []
    if resuming:
        checkpoint = load_checkpoint(run_dir / LAST)
        load_weights(ensemble, checkpoint["model"], run_dir / LAST)
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"])
        start_epoch, best_score, best_epoch = checkpoint["epoch"], checkpoint["best_score"], checkpoint["best_epoch"]
        metrics = read_metrics(run_dir)[:start_epoch]
        print(f"resuming {run_dir} after epoch {start_epoch}")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = config_to_yaml(cfg)
    atomic_write_text(run_dir / CONFIG, config_yaml)
    sizes = " / ".join(f"{dataset_size(getattr(splits, s))} {s}" for s in ("train", "val", "test"))
    print(
        f"{cfg.name}: {', '.join(pc.model['name'] for pc in peers_cfg)} on {cfg.data.name} ({sizes}, "
        f"{splits.num_classes} classes), sila={'on' if cfg.sila.enabled else 'off'}, dml peers {cfg.dml.peers}, "
        f"device {device}, {cfg.train.epochs} epochs x {steps_per_epoch} steps"
    )

    clock = Clock(total_steps - start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        epoch_start = time.perf_counter()
        loader = make_loader(
            splits.train,
            batch_size,
            shuffle=True,
            seed=cfg.seed * 100_003 + epoch,
            num_workers=cfg.data.num_workers,
            drop_last=True,
        )
        ensemble.train()
        sums: dict[str, float] = {}
        train_hits = [torch.zeros(k) for k in exits_per_peer]
        seen = 0
        for step, (images, labels) in enumerate(loader):
            global_step = epoch * steps_per_epoch + step
            lr = learning_rate(cfg.train, global_step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = normalize(images.to(device, non_blocking=True), splits.mean, splits.std)
            y = labels.to(device, non_blocking=True)
            outputs = [net(x) for net in nets]
            terms = ensemble_loss_terms(outputs, y, cfg)
            loss = torch.stack(list(terms.values())).sum()
            check_finite(loss, terms, epoch, step, run_dir)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            for hits, output in zip(train_hits, outputs, strict=True):
                logits = output.logits if isinstance(output, SiLaOutput) else output
                hits += (torch.stack(logits, dim=1).argmax(-1) == y[:, None]).sum(0).float().cpu()
            seen += len(y)
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(y)
            clock.tick(len(y))
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == steps_per_epoch:
                parts = ", ".join(f"{k} {v / seen:.3f}" for k, v in sums.items() if k != "loss")
                print(
                    f"epoch {epoch + 1}/{cfg.train.epochs}  step {step + 1}/{steps_per_epoch}  "
                    f"loss {sums['loss'] / seen:.4f} ({parts})  lr {lr:.4g}  {clock.images_per_second():.0f} img/s  "
                    f"eta {clock.eta()}",
                    flush=True,
                )

        accuracy: list[PeerAccuracy] = []
        for net, hits in zip(nets, train_hits, strict=True):
            bare = unwrap(net)
            val_top1 = topk_accuracy(*collect_logits(bare, val_loader, splits.mean, splits.std, device)).tolist()
            test_top1 = (
                topk_accuracy(*collect_logits(bare, test_loader, splits.mean, splits.std, device)).tolist()
                if cfg.train.eval_test_every_epoch
                else None
            )
            accuracy.append(PeerAccuracy((hits / seen * 100).tolist(), val_top1, test_top1))
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            **{k: v / seen for k, v in sums.items()},
            "lr": lr,
            **dataclasses.asdict(accuracy[0]),
            "seconds": time.perf_counter() - epoch_start,
        }
        if len(nets) > 1:
            row["peers"] = [dataclasses.asdict(a) for a in accuracy]
        metrics.append(row)
        score = float(np.mean([np.mean(a.val_top1) for a in accuracy]))  # mean top-1 over exits (and peers)
        improved = score > best_score
        if improved:
            best_score, best_epoch = score, epoch + 1
        checkpoint = {
            "model": ensemble.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "best_score": best_score,
            "best_epoch": best_epoch,
            "rng": rng_state(),
            "config": config_yaml,
        }
        write_metrics(run_dir, metrics)
        save_checkpoint(run_dir / LAST, checkpoint)
        if improved:
            save_checkpoint(run_dir / BEST, checkpoint)
        for i, a in enumerate(accuracy):
            who = f"epoch {epoch + 1}" + (f" peer {i}" if len(nets) > 1 else "")
            print(
                f"{who}: val top-1 per exit {format_row(a.val_top1)}"
                + (f"  test {format_row(a.test_top1)}" if a.test_top1 else "")
                + ("  (best)" if improved else ""),
                flush=True,
            )

    best = load_checkpoint(run_dir / BEST)
    load_weights(ensemble, best["model"], run_dir / BEST)
    print(f"\nbest epoch {best_epoch} (selected by mean val top-1 over exits{' and peers' if len(nets) > 1 else ''})")
    reports = []
    for net, peer_cfg in zip(nets, peers_cfg, strict=True):
        peer_dir = peer_cfg.run_dir
        peer_yaml = config_to_yaml(peer_cfg)
        atomic_write_text(peer_dir / CONFIG, peer_yaml)
        save_deploy(peer_dir / DEPLOY, prune(net).cpu().eval(), peer_yaml)
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


def check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int, step: int, run_dir: Path) -> None:
    if torch.isfinite(loss):
        return
    bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "loss")
    kept = f"last good checkpoint kept at {run_dir / LAST}" if (run_dir / LAST).exists() else "no checkpoint yet"
    raise TrainingError(
        f"loss term '{bad}' is {float(terms.get(bad, loss))} at epoch {epoch + 1} step {step + 1}; "
        f"{kept}; lower train.lr or check the data"
    )


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise DynsilaError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


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
