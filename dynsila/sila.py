"""SiLa: Siamese Labels auxiliary learning (the formulation is fixed in DESIGN.md).

Every exit k of a multi-exit network gets a siamese head g_k trained on a twin copy of the same labels:

    L = sum_k w_k [ CE(z_k, y) + lambda * CE(z'_k, y) + mu * T^2 * KL(softmax(z'_k / T) || softmax(z_k / T)) ]

with z_k the exit's logits and z'_k = g_k(h_k) (``attach: features``, h_k the input of the exit's ``fc``) or
z'_k = g_k(z_k) (``attach: logits``). With ``softmax: joint`` the twin term becomes one softmax over
[z_k, z'_k] (2C classes) against the duplicated label 1/2 [onehot(y), onehot(y)]; the main CE is kept so the
deployed exit is trained on its own softmax.

Heads attach through forward hooks on ``model.exits[k].fc``: the model code never knows SiLa exists, and
``prune`` hands back the bare model with exactly the parameters (and so the FLOPs) of a plain one.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from dynsila.config import SiLaConfig
from dynsila.models import DynamicOutput, MultiExitNetwork, exit_logits


class SiameseHead(nn.Module):
    """The twin classifier: a linear layer, or a one-hidden-layer MLP (``hidden`` wide, ReLU)."""

    def __init__(self, in_features: int, num_classes: int, kind: str = "linear", hidden: int = 256) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_features, num_classes)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SiLaOutput(NamedTuple):
    logits: list[torch.Tensor]  # main exits, N x C each: what the deployed network computes
    twin_logits: list[torch.Tensor]  # siamese heads, N x C each (training only)
    dynamic: DynamicOutput | None = None  # a gated network's full output (gate decisions), else None


class SiLa(nn.Module):
    """Training wrapper: ``SiLa(model, cfg)(x, upto)`` returns main and twin logits of exits ``0..upto``."""

    def __init__(self, model: MultiExitNetwork, cfg: SiLaConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.heads = nn.ModuleList()
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._capturing = False  # hooks are inert outside this wrapper's forward (e.g. evaluating self.model)
        self._handles: list[RemovableHandle] = []
        for k, exit_module in enumerate(model.exits):
            fc = exit_module.fc
            if not isinstance(fc, nn.Linear):
                raise TypeError(f"exit {k} of {type(model).__name__} must end in an nn.Linear named fc")
            in_features = fc.in_features if cfg.attach == "features" else fc.out_features
            self.heads.append(SiameseHead(in_features, fc.out_features, cfg.head, cfg.hidden))
            self._handles.append(fc.register_forward_hook(self._capture_hook(k)))

    def _capture_hook(self, k: int) -> Any:
        def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._capturing:
                self._captured[k] = (inputs[0], output)

        return capture

    def forward(self, x: torch.Tensor, upto: int | None = None) -> SiLaOutput:
        self._captured.clear()
        self._capturing = True
        try:
            output = self.model(x, upto=upto)
        finally:
            self._capturing = False
        logits = exit_logits(output)
        twins = []
        for k in range(len(logits)):
            features, z = self._captured[k]
            twins.append(self.heads[k](features if self.cfg.attach == "features" else z))
        self._captured.clear()  # hold no activations between steps
        return SiLaOutput(logits, twins, output if isinstance(output, DynamicOutput) else None)

    def bare_model(self) -> MultiExitNetwork:
        """A copy of the wrapped model without the siamese hooks: the deploy network."""
        bare = copy.deepcopy(self.model)
        for exit_module, handle in zip(bare.exits, self._handles, strict=True):
            fc = exit_module.fc
            assert isinstance(fc, nn.Module)
            fc._forward_hooks.pop(handle.id, None)
        return bare


def _strip_wrappers(net: nn.Module) -> nn.Module:
    net = getattr(net, "_orig_mod", net)  # torch.compile
    return getattr(net, "module", net)  # DistributedDataParallel


def unwrap(net: nn.Module) -> MultiExitNetwork:
    """The bare network inside DDP / torch.compile / SiLa wrappers, sharing its weights (no copy)."""
    net = _strip_wrappers(net)
    bare = net.model if isinstance(net, SiLa) else net
    if not isinstance(bare, MultiExitNetwork):
        raise TypeError(f"{type(bare).__name__} does not follow the multi-exit protocol (models.MultiExitNetwork)")
    return bare


def prune(net: nn.Module) -> MultiExitNetwork:
    """The deployable network: a copy with SiLa heads dropped and DDP / compile wrappers removed.

    Returns a model of the same class, state-dict keys and parameter count as one built without SiLa."""
    net = _strip_wrappers(net)
    return net.bare_model() if isinstance(net, SiLa) else copy.deepcopy(unwrap(net))


def sila_loss_terms(
    output: SiLaOutput, labels: torch.Tensor, cfg: SiLaConfig, exit_weights: list[float]
) -> dict[str, torch.Tensor]:
    """The twin-label terms of the SiLa loss, summed over exits with weights w_k (the main CE is not here).

    Returns ``{"sila": lambda * twin CE, "consistency": mu * T^2 * KL}`` (the latter only when mu > 0)."""
    twin_terms, kl_terms = [], []
    for w, z, z_twin in zip(exit_weights, output.logits, output.twin_logits, strict=True):
        if cfg.softmax == "separate":
            twin_terms.append(w * F.cross_entropy(z_twin, labels))
        else:
            twin_terms.append(w * joint_siamese_cross_entropy(z, z_twin, labels))
        if cfg.consistency > 0:
            t = cfg.temperature
            kl = F.kl_div(
                F.log_softmax(z / t, dim=1), F.log_softmax(z_twin / t, dim=1), reduction="batchmean", log_target=True
            )  # KL(p_twin || p_main), as in DESIGN.md
            kl_terms.append(w * kl * t * t)
    terms = {"sila": cfg.weight * torch.stack(twin_terms).sum()}
    if kl_terms:
        terms["consistency"] = cfg.consistency * torch.stack(kl_terms).sum()
    return terms


def joint_siamese_cross_entropy(z: torch.Tensor, z_twin: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax([z, z_twin]) (N x 2C) against 1/2 [onehot(y), onehot(y)]."""
    log_p = F.log_softmax(torch.cat([z, z_twin], dim=1), dim=1)
    num_classes = z.shape[1]
    picked = log_p.gather(1, labels[:, None]) + log_p.gather(1, labels[:, None] + num_classes)
    return -(0.5 * picked).mean()
