"""Deep Mutual Learning (Zhang et al., CVPR 2018) across peers, per exit, composable with SiLa.

Each peer i adds, for every exit pair (k_i, k_j) matched with peer j,

    dml.weight / (N - 1) * sum_j w_k * T^2 * KL(p_j || p_i),    p = softmax(z / T), p_j detached,

on top of its own exit cross-entropy and SiLa terms. T^2 keeps the gradient scale independent of T (as in
distillation); at T = 1 it is the paper's loss. Exit matching (``dml.align``): ``strict`` requires equal exit
counts and pairs exit k with exit k; ``tail`` pairs exits from the last backwards (a 4-exit and a 7-exit peer
match their last 4 exits), earlier unmatched exits get no DML term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynsila.config import Config, bounded, validate_model_section
from dynsila.errors import ConfigError
from dynsila.methods.technique import ModelBatch, Technique, register_technique, unwrap


@dataclass
class DMLConfig:
    peers: int = bounded(1, 1)  # models trained jointly; 1 = no mutual learning
    weight: float = bounded(1.0, 0.0)  # each peer adds weight / (N - 1) * sum_j KL(p_j || p_i) per exit
    temperature: float = bounded(1.0, 0.0, low_open=True)
    align: Literal["strict", "tail"] = "strict"  # peers' exits: equal counts, or matched from the last backwards
    models: list[dict[str, Any]] | None = None  # one model section per peer (heterogeneous); None: copies of model

    def check(self, cfg: Config) -> None:
        """One model section per peer, each valid for its model (with the rest of the config)."""
        if self.models is None:
            return
        if len(self.models) != self.peers:
            raise ConfigError(
                f"dml.models has {len(self.models)} model sections for dml.peers={self.peers}; "
                "give one per peer or drop dml.models to copy model"
            )
        self.models = [validate_model_section(m, f"dml.models[{i}]") for i, m in enumerate(self.models)]

    def model_sections(self, cfg: Config) -> list[tuple[str, dict[str, Any]]] | None:
        """The networks the run trains, when the peers have model sections of their own."""
        return None if self.models is None else [(f"dml.models[{i}]", m) for i, m in enumerate(self.models)]


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
    """``dml``: the peers (``network_configs``: one network each, in ``peer<i>/``) and their mutual-learning term."""

    name = "dml"
    settings = DMLConfig
    order = 40

    def active(self, cfg: Config) -> bool:
        return cfg.section(DMLConfig).peers > 1

    def network_configs(self, cfg: Config) -> list[tuple[str, Config]] | None:
        """One config per peer: its own model section, no DML, and its own directory inside the run's."""
        settings = cfg.section(DMLConfig)
        if settings.peers == 1:
            return None
        sections = settings.models or [cfg.model] * settings.peers
        return [
            (f"peer{i}", replace_model(cfg.with_section(DMLConfig()), f"peer{i}", section))
            for i, section in enumerate(sections)
        ]

    def validate(self, nets: Sequence[nn.Module], cfg: Config) -> None:
        exits = [unwrap(net).num_exits for net in nets]
        for other in exits[1:]:
            exit_pairs(exits[0], other, cfg.section(DMLConfig).align)  # fails early on mismatched peers

    def ensemble_terms(self, batches: Sequence[ModelBatch]) -> dict[str, torch.Tensor]:
        if len(batches) < 2:
            return {}
        logits, weights = [b.logits for b in batches], [b.exit_weights for b in batches]
        return {"dml": dml_loss(logits, batches[0].cfg.section(DMLConfig), weights)}


def replace_model(cfg: Config, name: str, model: dict[str, Any]) -> Config:
    """``cfg`` as one peer's: its name, its folder inside the run's, its model section."""
    return dataclasses.replace(cfg, name=name, out_dir=str(cfg.run_dir), model=dict(model))


DML = register_technique(MutualLearning())
