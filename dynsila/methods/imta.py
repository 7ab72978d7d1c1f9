"""IMTA's inline subnetwork collaboration (ISC) and one-for-all knowledge distillation (OFA).

Li, Zhang, Qi, Yang and Huang, "Improved Techniques for Training Adaptive Deep Networks", ICCV 2019
(arXiv 1908.06294; code github.com/kalviny/IMTA). Anchor: the paper's CIFAR-100 and ImageNet budgeted curves for
MSDNet with GE + ISC + OFA (README figures of the authors' repository); their numbers are not verified here.

ISC changes the deploy network: exit k (k >= 1) also reads exit k-1's logits z_{k-1} (N x C). In the authors' code
(``models/msdnet_imta.py``) a small layer maps z_{k-1} to a d_k-wide feature, Linear(C, d_k) -> BatchNorm1d ->
ReLU, and exit k's last linear layer reads [h_k, that feature] (2 d_k wide). A linear layer on a concatenation is
the sum of two linear layers, so here exit k keeps its own ``fc`` on h_k and the link adds
Linear(d_k, C, no bias) of the feature: the same function, with the exit's ``fc`` untouched (SiLa's hooks attach as
on the plain network). The link costs 2 C d_k multiply-adds and 2 C d_k + 3 d_k parameters (the batch norm's two
affine vectors and the first linear's bias; the batch norm is not counted in conv+linear MACs). z_{k-1} is detached
by default (``imta.detach``), as the paper describes ISC (forward only); the authors' code does not detach, but
trains the classifiers on a frozen backbone, where the difference is only the earlier classifier's own gradient.

OFA: every exit but the last learns from the last exit's softened prediction (teacher detached):

    L = CE(z_K, y) + sum_{k<K} w_k [ (1 - gamma) CE(z_k, y) + gamma T^2 KL(p_K^T || p_k^T) ]

with the authors' ``gamma`` = 0.1 and T = 1 (``run_IMTA.sh``; the paper's own values not verified here); the KL is
``self_distill.self_distillation_loss`` (batch mean; the authors' ``nn.KLDivLoss()`` also averages over classes,
which divides their term by C; ``imta.kl_reduction: mean`` reduces as they do). The exit weights w_k apply to the
CE of the last exit too, as in ``ce``.

By default (``imta.stage: joint``) one run trains backbone, classifiers and links together from scratch, with the
network's own last exit as teacher. The authors first train an MSDNet with Gradient Equilibrium (``ge.enabled``),
then train new classifiers and the links on the frozen backbone with the pretrained last exit as teacher:
``imta.stage: heads`` (``imta_heads``; with ``imta.detach: false`` and ``imta.kl_reduction: mean`` it is their
protocol, ``configs/cifar100/msdnet_imta_authors.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynsila.config import Config, bounded
from dynsila.errors import ConfigError
from dynsila.methods.exit_chain import chain_exits
from dynsila.methods.imta_heads import TaughtLogits, TaughtNetwork
from dynsila.methods.self_distill import SelfDistillConfig, self_distillation_loss
from dynsila.methods.technique import ModelBatch, Technique, register_technique
from dynsila.models import MultiExitNetwork


@dataclass
class IMTAConfig:
    enabled: bool = False
    gamma: float = bounded(0.1, 0.0, 1.0)  # OFA: (1 - gamma) CE + gamma T^2 KL(p_last || p_k) for every earlier exit
    temperature: float = bounded(1.0, 0.0, low_open=True)  # T of the OFA distillation
    detach: bool = True  # ISC reads the previous exit's logits without sending them a gradient
    # OFA's KL: summed over classes, averaged over the batch (batchmean), or averaged over batch and classes (mean:
    # batchmean / C), as the authors' nn.KLDivLoss() in KDLoss (utils.py of github.com/kalviny/IMTA) reduces it
    kl_reduction: Literal["batchmean", "mean"] = "batchmean"
    # joint: backbone, classifiers and links trained together from scratch, the network's own last exit as teacher;
    # heads: the authors' second stage (main_IMTA.py): from a first-stage run (train.init_from, e.g. one with
    # ge.enabled) new exit classifiers and the links train on the frozen network, whose last exit teaches
    stage: Literal["joint", "heads"] = "joint"


def isc_link(num_classes: int, width: int) -> nn.Sequential:
    """The ISC link into an exit whose ``fc`` reads ``width`` features: N x C logits of the previous exit -> N x C
    addend, Linear(C, width) -> BatchNorm1d -> ReLU -> Linear(width, C, no bias)."""
    return nn.Sequential(
        nn.Linear(num_classes, width),
        nn.BatchNorm1d(width),
        nn.ReLU(inplace=True),
        nn.Linear(width, num_classes, bias=False),
    )


def imta_loss_terms(
    logits: list[torch.Tensor], labels: torch.Tensor, exit_weights: list[float], cfg: IMTAConfig, ce_weight: float,
    teacher: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``ce`` = ce_weight x [sum_{k<K} w_k (1 - gamma) CE(z_k, y) + w_K CE(z_K, y)] and ``ofa`` = gamma x the
    self-distillation loss at T, reduced by ``cfg.kl_reduction``, taught by ``teacher`` (N x C) when given, else
    by the last exit (``logits[k]``: N x C of exit k; ``labels``: N)."""
    scale = [1.0 - cfg.gamma] * (len(logits) - 1) + [1.0]
    ce = [s * w * F.cross_entropy(z, labels) for s, w, z in zip(scale, exit_weights, logits, strict=True)]
    distill = self_distillation_loss(logits, exit_weights, cfg.temperature, teacher, cfg.kl_reduction)
    return {"ce": ce_weight * torch.stack(ce).sum(), "ofa": cfg.gamma * distill}


class IMTA(Technique):
    """ISC links in the deploy network (``deploy_form``), and the OFA loss standing in for the exit CE."""

    name = "imta"
    settings = IMTAConfig
    order = 70

    def active(self, cfg: Config) -> bool:
        return bool(cfg.section(IMTAConfig).enabled)

    def deploy_form(self, model: MultiExitNetwork, cfg: Config) -> MultiExitNetwork:
        settings = cfg.section(IMTAConfig)
        if not settings.enabled:
            return model
        return chain_exits(model, "imta", lambda k, previous, fc: isc_link(fc.out_features, fc.in_features),
                           detach=settings.detach)  # fmt: skip

    def prepare(self, net: nn.Module, cfg: Config) -> nn.Module:
        settings = cfg.section(IMTAConfig)
        if not (settings.enabled and settings.stage == "heads"):
            return net
        if not cfg.train.init_from:
            raise ConfigError("imta.stage=heads trains new classifiers on a trained network; set train.init_from to "
                              "the first-stage run (e.g. one trained with ge.enabled=true)")  # fmt: skip
        return TaughtNetwork(net)

    def deploy(self, net: nn.Module) -> nn.Module:
        return net.without_teacher() if isinstance(net, TaughtNetwork) else net

    def validate(self, nets: Sequence[nn.Module], cfg: Config) -> None:
        if not cfg.section(IMTAConfig).enabled:
            return
        if cfg.section(SelfDistillConfig).self_distill > 0:
            raise ConfigError("imta's OFA already distils the last exit into the others; set loss.self_distill=0")
        sila = getattr(cfg, "sila", None)
        if sila is not None and sila.enabled and sila.softmax == "joint_only":
            raise ConfigError("imta and sila.softmax=joint_only both replace the exit cross-entropy; pick one")

    def replaces_exit_ce(self, batch: ModelBatch) -> bool:
        return bool(batch.cfg.section(IMTAConfig).enabled)

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        settings = batch.cfg.section(IMTAConfig)
        if not settings.enabled:
            return {}
        teacher = batch.logits.teacher if isinstance(batch.logits, TaughtLogits) else None
        return imta_loss_terms(batch.logits, batch.labels, batch.exit_weights, settings, batch.cfg.loss.ce_weight,
                               teacher)  # fmt: skip


IMTA_TECHNIQUE = register_technique(IMTA())
