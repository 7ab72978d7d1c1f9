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

from typing import Literal

import torch

Baseline = Literal["none", "batch_mean"]


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
