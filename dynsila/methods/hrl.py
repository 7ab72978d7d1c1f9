"""SkipNet's hybrid reinforcement learning (HRL) objective, as its authors' CIFAR code trains it.

Each sample is an episode of G gate decisions a_g (1 = run the block, 0 = skip it), drawn from the gates'
Bernoulli policies. A skip earns alpha / G on the spot; the episode ends with the task reward -CE(logits, y).
Gate g is reinforced with its reward-to-go (discount 1):

    R_g = -CE + sum_{g' >= g} (1 - a_g') * alpha / G

and the policy-gradient term, scaled by ``rl_weight``, is summed over the batch (the reference's PyTorch 0.2
``action.reinforce(rl_weight * R)`` gives every sample its full weight, while its cross-entropy is a batch
mean):

    L_pg = -rl_weight * sum_n sum_g (R_ng - b_g) * log pi(a_ng)

with b_g = 0 (the reference) or, as an option of ours, the batch mean of R_g. The network itself keeps its
cross-entropy on the sampled path (the "hybrid" part), added by the loss module, not here.

The authors' ImageNet code (``imagenet/train_rl.py``) trains another objective, not implemented here: the task
reward is scaled like a skip reward (R_G = -CE * alpha / G), each gate's term is a batch *mean* per GPU chunk
(not a sum over samples), the gate projection is divided by a temperature (0.05: logits x20) when the stage
starts, and its defaults differ (alpha 0.01, lr 1e-4, 40 epochs). Its released checkpoints convert and evaluate
like any other (``dynsila.convert``); training them further with this objective is the CIFAR recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynsila.config import Config, bounded
from dynsila.errors import ConfigError
from dynsila.methods.technique import ModelBatch, Technique, register_technique, unwrap
from dynsila.models import DynamicOutput, gated_body

Baseline = Literal["none", "batch_mean"]


@dataclass
class GateStageConfig:
    stage: Literal["sp", "hrl"] = "sp"  # gated nets: supervised pre-training, or hybrid reinforcement learning


@dataclass
class GateLossConfig:
    # gated nets, SP stage only: + gate_cost x the expected share of gated-block MACs executed. An addition of ours:
    # the SkipNet reference's SP stage is plain cross-entropy (gate_cost 0); the HRL stage ignores it
    gate_cost: float = bounded(0.0, 0.0)
    # gated nets, HRL stage (SkipNet's hybrid RL, methods/hrl.py): a skip earns hrl_alpha / G (G gates), the task
    # reward is -CE; the policy-gradient term is scaled by rl_weight per sample and summed over the batch, as the
    # reference (alpha 0.1, rl_weight 0.01). hrl_alpha is SkipNet's accuracy/cost knob: sweep it, one run each
    hrl_alpha: float = bounded(0.1, 0.0)
    rl_weight: float = bounded(0.01, 0.0)
    rl_baseline: Literal["none", "batch_mean"] = "none"  # none: the reference; batch_mean: ours, R_g - mean_batch(R_g)

    @property
    def needs_block_costs(self) -> bool:
        """The gate-cost term weighs each gated block by its MACs, which the model builder then counts."""
        return self.gate_cost != 0


def skip_rewards(actions: torch.Tensor, alpha: float) -> torch.Tensor:
    """Immediate reward of every decision: alpha / G for a skip, 0 for a run. actions N x G (0/1) -> N x G."""
    return (1 - actions) * (alpha / actions.shape[1])


def reward_to_go(step_rewards: torch.Tensor, final_reward: torch.Tensor) -> torch.Tensor:
    """R_g = final + sum of the step rewards from gate g on (discount 1). N x G and N -> N x G."""
    from_here = step_rewards.flip(1).cumsum(1).flip(1)
    return from_here + final_reward[:, None]


def action_log_probs(probs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a) of each decision under Bernoulli(p = P(run)): log p for a run, log(1 - p) for a skip. N x G."""
    return torch.where(actions > 0, probs, 1 - probs).clamp_min(1e-8).log()


def hrl_policy_loss(
    probs: torch.Tensor,
    actions: torch.Tensor,
    task_loss: torch.Tensor,
    alpha: float,
    rl_weight: float,
    batch_size: int,
    baseline: Baseline = "none",
) -> torch.Tensor:
    """The REINFORCE surrogate whose gradient is SkipNet's policy gradient (a scalar to minimise).

    probs: N x G gate probabilities of running (with gradients); actions: N x G sampled decisions (0/1);
    task_loss: N per-sample cross-entropy of the sampled path (its gradient is ignored). ``batch_size`` is the
    global batch the reference sums over: the term is written as that times the mean over these N samples, so
    splitting a batch into micro-batches or DDP ranks (whose gradients are averaged) sums it exactly as one
    process would."""
    actions = actions.detach()
    returns = reward_to_go(skip_rewards(actions, alpha), -task_loss.detach())
    if baseline == "batch_mean":
        returns = returns - returns.mean(dim=0, keepdim=True)
    per_sample = -(returns * action_log_probs(probs, actions)).sum(dim=1)
    return rl_weight * batch_size * per_sample.mean()


def gate_terms(output: DynamicOutput, labels: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """Gated networks. SP: plain cross-entropy (SkipNet's reference) plus, if ``loss.gate_cost`` > 0 (ours), that
    times the expected share of gated-block MACs executed (gate probabilities weighted by block cost). HRL:
    SkipNet's policy gradient on the sampled gate actions (``hrl_policy_loss``): alpha / G per skip, -CE at the end,
    reward-to-go, ``loss.rl_weight``, no baseline unless ``loss.rl_baseline`` asks for the batch mean."""
    if not output.gate_probs:
        return {}
    settings = cfg.section(GateLossConfig)
    if cfg.section(GateStageConfig).stage == "sp":
        if settings.gate_cost == 0:
            return {}
        probs = torch.stack(output.gate_probs, dim=1)  # N x G
        return {"gate_cost": settings.gate_cost * (probs * output.block_cost_share).sum(dim=1).mean()}
    if output.action_log_prob is None:
        raise ValueError("train.stage=hrl needs gate actions sampled in training (gate_mode='sample')")
    policy = hrl_policy_loss(
        probs=torch.stack(output.gate_probs, dim=1),
        actions=torch.stack(output.gate_actions, dim=1),
        task_loss=F.cross_entropy(output.logits[-1], labels, reduction="none"),
        alpha=settings.hrl_alpha,
        rl_weight=settings.rl_weight,
        batch_size=cfg.data.batch_size,  # the global batch: the reference sums the term over it
        baseline=settings.rl_baseline,
    )
    return {"reinforce": policy}


class GateStage(Technique):
    """SkipNet's two training stages: straight-through gates for supervised pre-training (SP), sampled gate
    actions for hybrid reinforcement learning (HRL, a run started from the SP run's weights: ``train.init_from``)."""

    name = "gate_stage"
    settings = GateStageConfig
    section = "train"
    order = 29

    def active(self, cfg: Config) -> bool:
        return cfg.section(GateStageConfig).stage == "hrl"

    def prepare(self, net: nn.Module, cfg: Config) -> nn.Module:
        stage = cfg.section(GateStageConfig).stage
        body = gated_body(unwrap(net))
        if stage == "hrl" and body is None:
            raise ConfigError(
                f"train.stage=hrl needs a gated model (skipnet), not {type(unwrap(net)).__name__}; use sp"
            )
        if body is not None:
            body.gate_mode = "sample" if stage == "hrl" else "straight_through"
        return net


class GateTerms(Technique):
    """The gate terms of a gated network (SkipNet): the SP stage's optional gate cost, the HRL stage's policy
    gradient. Networks without gates get nothing."""

    name = "gates"
    settings = GateLossConfig
    section = "loss"
    order = 30

    def active(self, cfg: Config) -> bool:
        return cfg.section(GateLossConfig).gate_cost > 0

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        return {} if batch.gates is None else gate_terms(batch.gates, batch.labels, batch.cfg)


GATE_STAGE = register_technique(GateStage())
GATES = register_technique(GateTerms())
