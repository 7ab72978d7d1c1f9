"""Self-distillation in a multi-exit network: the last exit teaches the earlier ones.

As in Li et al., "Improved Techniques for Training Adaptive Deep Networks" (ICCV 2019) and Zhang et al., "Be Your
Own Teacher" (ICCV 2019). For a network with exits 0..K, each exit k < K adds

    w_k * T^2 * KL(p_K || p_k),    p = softmax(z / T), p_K detached,

so the teacher exit (and everything that only it depends on) gets no gradient from this term; the earlier exits,
and the shared trunk through them, do. T^2 keeps the gradient scale independent of T (Hinton et al., 2015).
``losses.loss_terms`` multiplies the sum by ``loss.self_distill`` and names it ``self_distill``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from dynsila.config import Config, bounded
from dynsila.methods.technique import ModelBatch, Technique, register_technique


@dataclass
class SelfDistillConfig:
    self_distill: float = bounded(0.0, 0.0)  # weight of T^2 KL(p_last || p_k) for every earlier exit k; 0 = off
    distill_temperature: float = bounded(3.0, 0.0, low_open=True)  # T of self_distill


def self_distillation_loss(
    logits: list[torch.Tensor], exit_weights: list[float], temperature: float,
    teacher: torch.Tensor | None = None, reduction: Literal["batchmean", "mean"] = "batchmean",
) -> torch.Tensor:  # fmt: skip
    """sum_{k<K} w_k T^2 KL(softmax(z_K/T) || softmax(z_k/T)), teacher detached. ``logits[k]``: N x C of exit k.

    ``teacher`` (N x C) stands in for z_K when given (IMTA's frozen first-stage network). ``reduction``: the KL
    summed over classes and averaged over the batch (``batchmean``), or averaged over batch and classes (``mean``,
    ``nn.KLDivLoss()``'s default: batchmean / C). A network with one exit has no student: the result is then 0
    (a 0-d tensor on the logits' device)."""
    *students, last = logits
    teacher = last if teacher is None else teacher
    target = F.log_softmax(teacher.detach() / temperature, dim=1)
    total = teacher.new_zeros(())
    for w, z in zip(exit_weights, students, strict=False):  # exit_weights also holds w_K, which is not used
        kl = F.kl_div(F.log_softmax(z / temperature, dim=1), target, reduction="batchmean", log_target=True)
        if reduction == "mean":  # written out: torch warns that kl_div's own "mean" will become "batchmean"
            kl = kl / z.shape[1]
        total = total + w * kl * temperature * temperature
    return total


class SelfDistillation(Technique):
    """``self_distill`` = ``loss.self_distill`` x the loss above, for a network with several exits and a weight > 0."""

    name = "self_distill"
    settings = SelfDistillConfig
    section = "loss"
    order = 20

    def active(self, cfg: Config) -> bool:
        return cfg.section(SelfDistillConfig).self_distill > 0

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        settings = batch.cfg.section(SelfDistillConfig)
        if not (settings.self_distill > 0 and len(batch.logits) > 1):
            return {}
        distill = self_distillation_loss(batch.logits, batch.exit_weights, settings.distill_temperature)
        return {"self_distill": settings.self_distill * distill}


SELF_DISTILLATION = register_technique(SelfDistillation())
