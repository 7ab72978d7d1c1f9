"""The training loss as a sum of named terms: exit cross-entropy, then what the config adds (SiLa, self-distillation,
gates, DML), and the twin-agreement monitor (logged, never minimised).

Terms stay separate so progress lines and metrics.jsonl show each one, and a NaN names its term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dynsila.config import Config
from dynsila.methods.dml import dml_loss
from dynsila.methods.hrl import hrl_policy_loss
from dynsila.methods.self_distill import self_distillation_loss
from dynsila.methods.sila import SiLaOutput, replaces_exit_ce, sila_loss_terms
from dynsila.models import DynamicOutput


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
    """All terms of one model's loss; their sum is what is minimised.

    ``ce`` = ``loss.ce_weight`` x sum_k w_k CE(z_k, y), except for SiLa ``joint_only``, where the joint 2C softmax
    (``joint_ce``, scaled by the same ``loss.ce_weight``) takes its place; then the SiLa terms, ``self_distill``
    (when ``loss.self_distill`` > 0 and the model has several exits) and the gate terms of gated networks."""
    logits = logits_of(output)
    weights = exit_weights(cfg, len(logits))
    terms: dict[str, torch.Tensor] = {}
    if not (isinstance(output, SiLaOutput) and replaces_exit_ce(cfg.sila)):
        terms["ce"] = cfg.loss.ce_weight * exit_cross_entropy(logits, labels, weights)
    if isinstance(output, SiLaOutput):
        terms.update(sila_loss_terms(output, labels, cfg.sila, weights, cfg.loss.ce_weight))
    if cfg.loss.self_distill > 0 and len(logits) > 1:
        distill = self_distillation_loss(logits, weights, cfg.loss.distill_temperature)
        terms["self_distill"] = cfg.loss.self_distill * distill
    dynamic = output.dynamic if isinstance(output, SiLaOutput) else output
    if isinstance(dynamic, DynamicOutput):
        terms.update(gate_terms(dynamic, labels, cfg))
    return terms


def ensemble_monitor_terms(outputs: Sequence[Output], labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Detached per-exit twin/main agreement of SiLa outputs, for metrics only (never added to the loss).

    For exit k, averaged over the batch and over the SiLa peers: ``twin_gap_e{k}`` = mean |z'_k - z_k| (all
    logits), ``twin_rel_gap_e{k}`` = that gap / mean |z_k|, ``twin_agree_e{k}`` = share of samples whose argmax
    agrees. Empty when no output is SiLa-wrapped. Returns 0-d tensors on the logits' device (no host sync);
    ``labels`` and ``cfg`` are unused today and keep the signature of ``ensemble_loss_terms``."""
    del labels, cfg
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for output in outputs:
            if not isinstance(output, SiLaOutput):
                continue
            for k, (z, z_twin) in enumerate(zip(output.logits, output.twin_logits, strict=True)):
                z, z_twin = z.detach().float(), z_twin.detach().float()
                gap = (z_twin - z).abs().mean()
                values = {
                    f"twin_gap_e{k}": gap,
                    f"twin_rel_gap_e{k}": gap / z.abs().mean().clamp_min(1e-12),
                    f"twin_agree_e{k}": (z_twin.argmax(1) == z.argmax(1)).float().mean(),
                }
                for name, value in values.items():
                    sums[name] = sums[name] + value if name in sums else value
                    counts[name] = counts.get(name, 0) + 1
    return {name: value / counts[name] for name, value in sums.items()}


def gate_terms(output: DynamicOutput, labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Gated networks. SP: plain cross-entropy (SkipNet's reference) plus, if ``loss.gate_cost`` > 0 (ours), that
    times the expected share of gated-block MACs executed (gate probabilities weighted by block cost). HRL:
    SkipNet's policy gradient on the sampled gate actions (``dynsila.hrl``): alpha / G per skip, -CE at the end,
    reward-to-go, ``loss.rl_weight``, no baseline unless ``loss.rl_baseline`` asks for the batch mean."""
    if not output.gate_probs:
        return {}
    if cfg.train.stage == "sp":
        if cfg.loss.gate_cost == 0:
            return {}
        probs = torch.stack(output.gate_probs, dim=1)  # N x G
        return {"gate_cost": cfg.loss.gate_cost * (probs * output.block_cost_share).sum(dim=1).mean()}
    if output.action_log_prob is None:
        raise ValueError("train.stage=hrl needs gate actions sampled in training (gate_mode='sample')")
    policy = hrl_policy_loss(
        probs=torch.stack(output.gate_probs, dim=1),
        actions=torch.stack(output.gate_actions, dim=1),
        task_loss=F.cross_entropy(output.logits[-1], labels, reduction="none"),
        alpha=cfg.loss.hrl_alpha,
        rl_weight=cfg.loss.rl_weight,
        batch_size=cfg.data.batch_size,  # the global batch: the reference sums the term over it
        baseline=cfg.loss.rl_baseline,
    )
    return {"reinforce": policy}


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
