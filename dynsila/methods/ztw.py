"""Zero Time Waste (ZTW): cascading connections between the internal classifiers and their geometric ensembles.

Wołczyk, Wójcik, Bałazy, Podolak, Tabor, Śmieja and Trzciński, "Zero Time Waste: Recycling Predictions in Early
Exit Neural Networks", NeurIPS 2021 (arXiv 2106.05409; code github.com/gmum/Zero-Time-Waste). Anchor: the paper's
tables of accuracy at a share of the backbone's cost (e.g. ResNet-56 on CIFAR-100); its numbers are not verified
here.

Both parts change the deploy network (``exit_chain.ChainedExits``); the internal classifiers (ICs) are every exit
but the last, which stays the backbone's own classifier (in the authors' ``ZTWCascading`` no cascading connection
touches the backbone's head; by default no ensemble does either, ``ztw.ensemble_last`` below):

- cascading: IC k (k >= 1) also reads IC k-1's logits z_{k-1} (N x C), detached (the authors' ``ZTWCascading``
  default ``detach=True``): its last linear layer reads [h_k, z_{k-1}], written here as the exit's own ``fc`` on h_k
  plus Linear(C, C, no bias) of z_{k-1} (the same function); C^2 multiply-adds and parameters per link.
- ensemble (``ztw.stage: ensemble``): IC k answers with the geometric ensemble of ICs 0..k,

      s_k = 1/(k+1) sum_{j<=k} exp(w_kj) log softmax(z_j) + b_k,     softmax(s_k) ∝ prod_j p_j^(exp(w_kj)/(k+1)) e^(b_k)

  with weights w_k (k+1, drawn from N(0, 0.01) as the authors do) and a per-class bias b_k (C, zeros), so the
  evaluator's anytime table, its budgeted thresholds and the runner's exit decisions all use the ensembled scores.
  The weighted sum is a matrix product of (k+1) C multiply-adds at IC k, counted as such; the log-softmax is free.

Training, in two runs as the paper's stages (SkipNet's SP -> HRL pattern): ``stage: ics`` trains the network with
the cascading connections on the exit cross-entropy; ``stage: ensemble`` starts from that run
(``train.init_from``; the ensembles start fresh), freezes everything else (batch-norm statistics included) and
fits the ensembles on the training data with the same exit cross-entropy, which is then their negative
log-likelihood. ``ztw.ensemble_last`` gives the last exit an ensemble too, over all K exits (the NeurIPS code
ensembles the final head with the ICs); no cascading connection reaches it, as in that code. Deviation: the paper
attaches ICs to a pretrained, frozen backbone and trains only them in the first stage; here backbone and ICs
train together in ``ics``, as MSDNet and our other exits do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dynsila.config import Config
from dynsila.errors import ConfigError
from dynsila.methods.exit_chain import ChainedExits, chain_exits
from dynsila.methods.technique import Technique, register_technique, unwrap
from dynsila.models import MultiExitNetwork


@dataclass
class ZTWConfig:
    enabled: bool = False
    # ics: train the network with the cascading connections; ensemble: from an ics run (train.init_from), fit only
    # the geometric ensembles of the internal classifiers, everything else frozen
    stage: Literal["ics", "ensemble"] = "ics"
    detach: bool = True  # a cascading connection sends the previous classifier no gradient
    # the last exit also answers with the geometric ensemble of all exits, itself included (the NeurIPS code's
    # running ensembles: ztw_cv_original/model_funcs.py, run_ensb_train, appends the final head's logits to the
    # ICs' before a head's ensemble reads them, so the ensemble at the final head holds every head); off: the
    # final head answers alone
    ensemble_last: bool = False


class GeometricEnsemble(nn.Module):
    """The weighted geometric ensemble of ``n`` classifiers: logits z_0..z_{n-1} (each N x C) -> N x C scores
    1/n sum_j exp(w_j) log softmax(z_j) + b."""

    starts_fresh = True  # a run started from a stage without ensembles keeps this initialisation

    def __init__(self, n: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        log_p = torch.stack([torch.log_softmax(z, dim=-1) for z in logits], dim=-1)  # N x C x n
        scale = (self.weight.exp() / len(logits))[:, None]  # n x 1
        return torch.matmul(log_p, scale)[..., 0] + self.bias


class ZeroTimeWaste(Technique):
    """ZTW's cascading connections and (stage ``ensemble``) ensembles in the deploy network (``deploy_form``);
    the ensemble stage trains nothing else (``prepare``)."""

    name = "ztw"
    settings = ZTWConfig
    order = 80

    def active(self, cfg: Config) -> bool:
        return bool(cfg.section(ZTWConfig).enabled)

    def deploy_form(self, model: MultiExitNetwork, cfg: Config) -> MultiExitNetwork:
        settings = cfg.section(ZTWConfig)
        if not settings.enabled:
            return model
        last, fc = model.num_exits - 1, model.exits[0].fc
        num_classes = fc.out_features if isinstance(fc, nn.Linear) else 0  # chain_exits refuses a non-Linear fc

        def cascade(k: int, previous: nn.Linear, fc: nn.Linear) -> nn.Module | None:
            return nn.Linear(previous.out_features, fc.out_features, bias=False) if k < last else None

        def ensemble(k: int, n: int) -> nn.Module | None:
            ensembled = k < last or settings.ensemble_last
            return GeometricEnsemble(k + 1, num_classes) if ensembled and settings.stage == "ensemble" else None

        return chain_exits(model, "ztw", cascade, ensemble, detach=settings.detach)

    def prepare(self, net: nn.Module, cfg: Config) -> nn.Module:
        settings = cfg.section(ZTWConfig)
        if settings.enabled and settings.stage == "ensemble":
            if not cfg.train.init_from:
                raise ConfigError(
                    "ztw.stage=ensemble fits the ensembles of a trained network; set train.init_from to the run "
                    "trained with ztw.stage=ics"
                )
            freeze_all_but_ensembles(unwrap(net))
        return net


def freeze_all_but_ensembles(model: MultiExitNetwork) -> None:
    """Only the ensembles' weights train; every other parameter is frozen and batch norms keep their statistics."""
    for module in model.modules():
        if not isinstance(module, GeometricEnsemble):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
    assert isinstance(model, ChainedExits)
    model.trains_only_readouts = True


ZTW = register_technique(ZeroTimeWaste())
