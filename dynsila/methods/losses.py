"""The training loss as a sum of named terms: exit cross-entropy, then what each training technique adds.

``dynsila.methods.technique.TECHNIQUES`` is the one table of techniques; its order is the order in which terms are
added and summed, so it is part of the numerics. Terms stay separate so progress lines and metrics.jsonl show each
one, and a NaN names its term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dynsila.config import Config
from dynsila.methods.technique import TECHNIQUES, ModelBatch, register_technique
from dynsila.models import DynamicOutput

__all__ = ["TECHNIQUES", "register_technique", "loss_terms", "ensemble_loss_terms", "ensemble_monitor_terms"]

Output = object  # what a training network returns: a list of logits, a DynamicOutput, or a wrapper's output


def exit_weights(cfg: Config, num_exits: int) -> list[float]:
    weights = cfg.loss.exit_weights or [1.0] * num_exits
    if len(weights) != num_exits:
        raise ValueError(f"loss.exit_weights has {len(weights)} entries but the model has {num_exits} exits")
    return weights


def exit_cross_entropy(logits: list[torch.Tensor], labels: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_k w_k CE(z_k, y), the anytime-prediction loss of MSDNet."""
    return torch.stack([w * F.cross_entropy(z, labels) for w, z in zip(weights, logits, strict=True)]).sum()


def logits_of(output: Output) -> list[torch.Tensor]:
    """The per-exit logits of any training output: a list of logits, or an output holding them as ``.logits``
    (a gated network's ``DynamicOutput``, a technique wrapper's output)."""
    logits = getattr(output, "logits", output)
    assert isinstance(logits, list)
    return logits


def gates_of(output: Output) -> DynamicOutput | None:
    """The gate decisions of a gated network's output, itself or inside a wrapper's (``.dynamic``)."""
    gated = getattr(output, "dynamic", output)
    return gated if isinstance(gated, DynamicOutput) else None


def model_batch(output: Output, labels: torch.Tensor, cfg: Config) -> ModelBatch:
    """What the techniques see of one network's output on a batch."""
    logits = logits_of(output)
    return ModelBatch(output, logits, gates_of(output), labels, exit_weights(cfg, len(logits)), cfg)


def model_terms(batch: ModelBatch) -> dict[str, torch.Tensor]:
    """``ce`` = ``loss.ce_weight`` x sum_k w_k CE(z_k, y) unless a technique stands in for it (SiLa ``joint_only``),
    then each technique's terms in table order."""
    terms: dict[str, torch.Tensor] = {}
    if not any(technique.replaces_exit_ce(batch) for technique in TECHNIQUES):
        terms["ce"] = batch.cfg.loss.ce_weight * exit_cross_entropy(batch.logits, batch.labels, batch.exit_weights)
    for technique in TECHNIQUES:
        terms.update(technique.model_terms(batch))
    return terms


def loss_terms(output: Output, labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """All terms of one model's loss; their sum is what is minimised."""
    return model_terms(model_batch(output, labels, cfg))


def ensemble_loss_terms(outputs: Sequence[Output], labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Terms of all networks summed by name, then the terms that couple them (DML's, when there are several)."""
    batches = [model_batch(output, labels, cfg) for output in outputs]
    terms: dict[str, torch.Tensor] = {}
    for batch in batches:
        for name, value in model_terms(batch).items():
            terms[name] = terms[name] + value if name in terms else value
    for technique in TECHNIQUES:
        terms.update(technique.ensemble_terms(batches))
    return terms


def ensemble_monitor_terms(outputs: Sequence[Output], labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Detached diagnostics of the techniques (SiLa's twin/main agreement), for metrics only, never in the loss."""
    batches = [model_batch(output, labels, cfg) for output in outputs]
    terms: dict[str, torch.Tensor] = {}
    for technique in TECHNIQUES:
        terms.update(technique.monitor_terms(batches))
    return terms
