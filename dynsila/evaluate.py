"""Evaluation of multi-exit networks. One pass over a split stores every exit's logits (N x K x C); every
criterion is computed from that array."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from dynsila.data import normalize


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: DataLoader,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (bare, in eval mode) over ``loader``: logits ``N x K x C`` (float32, CPU) and labels ``N``."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        x = normalize(images.to(device, non_blocking=True), mean, std)
        all_logits.append(torch.stack(model(x), dim=1).float().cpu())
        all_labels.append(labels)
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Top-k accuracy in percent of every exit: logits ``N x K x C``, labels ``N`` -> ``K``."""
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[1])
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # N x K x k
    hit = (top == labels[:, None, None]).any(dim=-1).float()
    return hit.mean(dim=0) * 100.0
