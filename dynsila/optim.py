"""The optimizer and its learning-rate schedule, from the ``train:`` section: what every run steps with."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dynsila.config import TrainConfig


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
