"""Gradient equilibrium (GE): the trunk's gradient from each exit, rescaled so that no stage is dominated by the sum.

Li, Zhang, Qi, Yang and Huang, "Improved Techniques for Training Adaptive Deep Networks" (ICCV 2019, IMTA). With
K exits and the cumulative loss sum_k L_k, the stages before exit k receive the gradients of every exit from k on,
so early stages get the largest, most conflicting sum. GE rescales them in the backward pass only. As the authors'
MSDNet-GE does (``models/msdnet_ge.py`` of github.com/kalviny/IMTA: after block i of n, ``x[-1]`` is rescaled by
1/(n - i) before classifier i reads it, and by (n - i - 1) again before block i + 1 reads it), with h_k the state
exit k reads (0-based k):

    exit k and the next stage read  h_k'  = rescale(h_k, 1 / (K - k))
    the next stage reads           h_k'' = rescale(h_k', K - k - 1)

where rescale is the identity forward and multiplies the gradient backward. Along the trunk the factors telescope:
the gradient at h_k is (1 / (K - k)) sum_{j >= k} dL_j/dh_k, the *mean* of the gradients of the K - k exits that
depend on h_k (``tests/test_gradient_equilibrium.py`` checks this against per-exit gradients). The exits' own
classifiers get their loss's gradient unscaled. Where a state is a list of tensors (MSDNet's scales), only the
last one is rescaled, as in the authors' code: it is the coarsest scale, the one MSDNet's classifiers read; the
finer scales flow on to later blocks unscaled.

It is installed by forward hooks (``prepare``): a forward hook on the stage after which exit k reads, and a
forward pre-hook on the stage after it; MSDNet, timm CNN exits (``timm_exits``) and ViT exits (``vit_exits``) all
follow that stage/exit layout, so it applies to each. ``deploy`` hands back a copy without the hooks: the deploy
network is the plain one (same parameters and logits; GE costs nothing at inference). Forward values are never
changed, so evaluation during training sees the plain network's logits.

The paper reports GE gains on MSDNet for CIFAR-100 and ImageNet (its budgeted and anytime curves); the exact
figures were not verified here.

A network whose exits read the earlier exits (``exit_chain.ChainedExits``: IMTA's links, ZTW's cascades) runs each
exit's classifier inside the stage it follows, so the chained stage's output comes after the classifier has read
the state. GE therefore hooks the stages of the network inside the chain, whose outputs are the states h_k that
the classifiers and the next stage read: the same factors at the same places as on the plain network. The chained
logits (a link's input) are not rescaled: the authors' GE has no such path (their ISC trains on a frozen backbone).

``order`` 50: after the built-ins (10-40); GE adds no loss term, so its place in
the sum does not matter, but its ``prepare`` runs after SiLa's (which wraps the network; GE hooks the network
inside the wrapper, so SiLa's twin heads read the rescaled state like their exit).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynsila.config import Config
from dynsila.errors import ConfigError
from dynsila.methods.exit_chain import ChainedExits
from dynsila.methods.technique import Technique, register_technique, unwrap


@dataclass
class GradientEquilibriumConfig:
    enabled: bool = False  # rescale the gradients every exit sends into the shared stages (IMTA's GE)


class _GradientScale(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(state: Any, scale: float) -> Any:
    """``state`` (a tensor, or a list of tensors of which the last is rescaled) with its gradient times ``scale``."""
    if isinstance(state, torch.Tensor):
        return _GradientScale.apply(state, scale)
    if isinstance(state, (list, tuple)) and state and isinstance(state[-1], torch.Tensor):
        return [*state[:-1], _GradientScale.apply(state[-1], scale)]
    raise TypeError(f"gradient equilibrium cannot rescale a stage state of type {type(state).__name__}")


class _RescaleOutput:
    """A forward hook: the stage's output with its gradient times ``scale`` (a class, so deploy can find it)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        return scale_gradient(output, self.scale)


class _RescaleInput:
    """A forward pre-hook: the stage's input with its gradient times ``scale``."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        return (scale_gradient(inputs[0], self.scale), *inputs[1:])


def equilibrium_factors(num_exits: int) -> list[tuple[float, float]]:
    """Per exit k: (the factor on the state it reads, the extra factor on what the next stage reads) =
    (1 / (K - k), K - k - 1)."""
    return [(1.0 / (num_exits - k), float(num_exits - k - 1)) for k in range(num_exits)]


def install_gradient_equilibrium(model: nn.Module) -> None:
    """Hook GE onto a multi-exit network (in place). Needs one exit per stage at most (strictly increasing
    ``exit_after``), which every built-in family has."""
    net = unwrap(model)
    if isinstance(net, ChainedExits):  # the states the chained classifiers read: the inner network's stage outputs
        net = net.inner
    after = list(net.exit_after)
    if any(b <= a for a, b in zip(after, after[1:], strict=False)):
        raise ConfigError(f"ge.enabled needs at most one exit per stage; {type(net).__name__} has exits after {after}")
    for (to_exit, onward), stage in zip(equilibrium_factors(net.num_exits), after, strict=True):
        net.stages[stage].register_forward_hook(_RescaleOutput(to_exit))
        if stage + 1 < len(net.stages) and onward > 0:
            net.stages[stage + 1].register_forward_pre_hook(_RescaleInput(onward))


def remove_gradient_equilibrium(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (any wrapper around the network included) without GE's hooks."""
    bare = copy.deepcopy(net)
    for module in bare.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, (_RescaleOutput, _RescaleInput))]:
                del hooks[key]
    return bare


def has_gradient_equilibrium(net: nn.Module) -> bool:
    """Whether any module of ``net`` carries a GE hook."""
    hooks = [h for m in net.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return any(isinstance(h, (_RescaleOutput, _RescaleInput)) for h in hooks)


class GradientEquilibrium(Technique):
    """GE's rescaling hooks on each network (``prepare``), gone from the deploy copy (``deploy``); no loss term."""

    name = "ge"
    settings = GradientEquilibriumConfig
    order = 50

    def active(self, cfg: Config) -> bool:
        return bool(cfg.section(GradientEquilibriumConfig).enabled)

    def prepare(self, net: nn.Module, cfg: Config) -> nn.Module:
        if self.active(cfg):
            install_gradient_equilibrium(net)
        return net

    def deploy(self, net: nn.Module) -> nn.Module:
        return remove_gradient_equilibrium(net) if has_gradient_equilibrium(net) else net


GRADIENT_EQUILIBRIUM = register_technique(GradientEquilibrium())
