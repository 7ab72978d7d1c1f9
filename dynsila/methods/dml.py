"""Deep Mutual Learning (Zhang et al., CVPR 2018) across peers, per exit, composable with SiLa.

Each peer i adds, for every exit pair (k_i, k_j) matched with peer j,

    dml.weight / (N - 1) * sum_j w_k * T^2 * KL(p_j || p_i),    p = softmax(z / T), p_j detached,

on top of its own exit cross-entropy and SiLa terms. T^2 keeps the gradient scale independent of T (as in
distillation); at T = 1 it is the paper's loss. Exit matching (``dml.align``): ``strict`` requires equal exit
counts and pairs exit k with exit k; ``tail`` pairs exits from the last backwards (a 4-exit and a 7-exit peer
match their last 4 exits), earlier unmatched exits get no DML term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dynsila.config import DMLConfig
from dynsila.errors import ConfigError
from dynsila.methods.technique import ModelBatch, Technique


def exit_pairs(num_exits_i: int, num_exits_j: int, align: str) -> list[tuple[int, int]]:
    """(exit of peer i, exit of peer j) pairs that distil into each other."""
    if align == "strict":
        if num_exits_i != num_exits_j:
            raise ConfigError(
                f"DML peers have {num_exits_i} and {num_exits_j} exits; give them the same number "
                "of exits or set dml.align=tail (match exits from the last backwards)"
            )
        return [(k, k) for k in range(num_exits_i)]
    m = min(num_exits_i, num_exits_j)
    return [(num_exits_i - m + t, num_exits_j - m + t) for t in range(m)]


def dml_loss(peer_logits: list[list[torch.Tensor]], cfg: DMLConfig, exit_weights: list[list[float]]) -> torch.Tensor:
    """The summed DML term of all peers. ``peer_logits[i][k]``: N x C logits of peer i's exit k."""
    n_peers, t = len(peer_logits), cfg.temperature
    log_p = [[F.log_softmax(z / t, dim=1) for z in peer] for peer in peer_logits]
    total = peer_logits[0][0].new_zeros(())
    for i in range(n_peers):
        for j in range(n_peers):
            if i == j:
                continue
            for k_i, k_j in exit_pairs(len(peer_logits[i]), len(peer_logits[j]), cfg.align):
                target = log_p[j][k_j].detach()  # the other peer is a fixed teacher for this term
                kl = F.kl_div(log_p[i][k_i], target, reduction="batchmean", log_target=True)  # KL(p_j || p_i)
                total = total + exit_weights[i][k_i] * kl * t * t
    return cfg.weight / (n_peers - 1) * total


class MutualLearning(Technique):
    """``dml``: the mutual-learning term of the peers trained together, when there are several."""

    name = "dml"
    config_section = "dml"

    def ensemble_terms(self, batches: Sequence[ModelBatch]) -> dict[str, torch.Tensor]:
        if len(batches) < 2:
            return {}
        logits, weights = [b.logits for b in batches], [b.exit_weights for b in batches]
        return {"dml": dml_loss(logits, batches[0].cfg.dml, weights)}


DML = MutualLearning()
