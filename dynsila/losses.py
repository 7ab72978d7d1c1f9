"""The training loss as a sum of named terms: exit cross-entropy, then whatever the config adds (SiLa, ...).

Terms stay separate so progress lines and metrics.jsonl show each one, and a NaN names its term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dynsila.config import Config
from dynsila.dml import dml_loss
from dynsila.models import DynamicOutput
from dynsila.sila import SiLaOutput, sila_loss_terms


def exit_weights(cfg: Config, num_exits: int) -> list[float]:
    weights = cfg.loss.exit_weights or [1.0] * num_exits
    if len(weights) != num_exits:
        raise ValueError(f"loss.exit_weights has {len(weights)} entries but the model has {num_exits} exits")
    return weights


def exit_cross_entropy(logits: list[torch.Tensor], labels: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_k w_k CE(z_k, y), the anytime-prediction loss of MSDNet."""
    return torch.stack([w * F.cross_entropy(z, labels) for w, z in zip(weights, logits, strict=True)]).sum()


Output = list[torch.Tensor] | DynamicOutput | SiLaOutput


def logits_of(output: Output) -> list[torch.Tensor]:
    """The per-exit logits of any training output (plain, gated or SiLa-wrapped)."""
    return output.logits if isinstance(output, SiLaOutput | DynamicOutput) else output


def loss_terms(output: Output, labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """All terms of one model's loss; their sum is what is minimised."""
    logits = logits_of(output)
    weights = exit_weights(cfg, len(logits))
    terms = {"ce": exit_cross_entropy(logits, labels, weights)}
    if isinstance(output, SiLaOutput):
        terms.update(sila_loss_terms(output, labels, cfg.sila, weights))
    dynamic = output.dynamic if isinstance(output, SiLaOutput) else output
    if isinstance(dynamic, DynamicOutput):
        terms.update(gate_terms(dynamic, labels, cfg))
    return terms


def gate_terms(output: DynamicOutput, labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Gated networks. SP: ``gate_cost`` x expected share of gated-block MACs executed (gate probabilities
    weighted by block cost), so the gates learn to trade accuracy for cost. HRL: REINFORCE on the sampled gate
    actions with reward -CE(sample) + gate_cost x (blocks skipped), baseline = the batch's mean reward."""
    if not output.gate_probs:
        return {}
    if cfg.train.stage == "sp":
        if cfg.loss.gate_cost == 0:
            return {}
        probs = torch.stack(output.gate_probs, dim=1)  # N x G
        return {"gate_cost": cfg.loss.gate_cost * (probs * output.block_cost_share).sum(dim=1).mean()}
    if output.action_log_prob is None:
        raise ValueError("train.stage=hrl needs gate actions sampled in training (gate_mode='sample')")
    ce = F.cross_entropy(output.logits[-1], labels, reduction="none").detach()
    skipped = (1 - torch.stack(output.gate_actions, dim=1)).sum(dim=1)
    reward = -ce + cfg.loss.gate_cost * skipped
    return {"reinforce": -((reward - reward.mean()) * output.action_log_prob).mean()}


def ensemble_loss_terms(outputs: Sequence[Output], labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Terms of all DML peers summed by name, plus the mutual-learning term when there are several peers."""
    terms: dict[str, torch.Tensor] = {}
    for output in outputs:
        for name, value in loss_terms(output, labels, cfg).items():
            terms[name] = terms[name] + value if name in terms else value
    if len(outputs) > 1:
        logits = [logits_of(o) for o in outputs]
        weights = [exit_weights(cfg, len(z)) for z in logits]
        terms["dml"] = dml_loss(logits, cfg.dml, weights)
    return terms
