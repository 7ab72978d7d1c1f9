"""Exits that read the earlier exits: a multi-exit network rebuilt so that exit k also receives exit k-1's logits.

Techniques that change the deploy network (IMTA's inline subnetwork collaboration, ZTW's cascading connections and
ensembles) share this one form, ``ChainedExits``. It is itself a ``MultiExitNetwork``, so the cost counter, the
evaluator and the early-exit runner follow it through the protocol alone:

    state          (inner state, raw)    raw: tuple of the exit logits computed so far, each N x C
    stem           x -> (inner stem(x), ())
    stage i        inner stage i, then every classifier that reads it:
                   raw_k = inner exit_k(state) + link_k(raw_{k-1})      link_k: the technique's connection
    exit k         a readout: raw_k, or a combination of raw_0..raw_k (ZTW's ensemble), N x C

A classifier therefore runs inside the stage it follows, and the exit module only reads out. That is what exit k
costs: it cannot be computed without exits 0..k-1, so its "exit only" MACs include every earlier classifier and
link; only earlier readouts are left out. The runner indexes the whole state (raw included) when samples leave.
Where the inner network splits a stage for lazy early exit (MSDNet's finer scales), ``ChainedSplit`` keeps the
split: the classifiers run on the exit path, and the deferred part stays deferred.

``readout.fc`` is the inner exit's ``fc`` (not registered a second time), so SiLa's heads attach as on the plain
network and see the inner classifier's features and logits (before the link).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dynsila.errors import ConfigError
from dynsila.models import DeferredSplit, MultiExitNetwork

State = tuple[Any, tuple[torch.Tensor, ...]]  # (the inner network's state, the exit logits computed so far)


class ChainedStem(nn.Module):
    """The inner stem; the chain of exit logits starts empty."""

    def __init__(self, stem: nn.Module) -> None:
        super().__init__()
        self.stem = stem

    def forward(self, x: torch.Tensor) -> State:
        return self.stem(x), ()


class ChainedStage(nn.Module):
    """Inner stage ``i``, then the classifiers of the exits that read it, each adding its link's output.

    ``links[n]`` (or None) maps the previous exit's logits (N x C) to an N x C addend of this exit's logits; the
    previous logits are detached first when ``detach``."""

    def __init__(self, stage: nn.Module, heads: Sequence[nn.Module], links: Sequence[nn.Module | None], detach: bool):
        super().__init__()
        self.stage = stage
        self.heads = nn.ModuleList(heads)
        self.links = nn.ModuleList([link if link is not None else nn.Identity() for link in links])
        self.linked = [link is not None for link in links]
        self.detach = detach

    def classify(self, exit_state: Any, raw: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """``raw`` extended by the logits of this stage's exits, read from the state ``exit_state``."""
        for head, link, linked in zip(self.heads, self.links, self.linked, strict=True):
            z = head(exit_state)
            if linked:
                previous = raw[-1].detach() if self.detach else raw[-1]
                z = z + link(previous)
            raw = (*raw, z)
        return raw

    def forward(self, state: State) -> State:
        inner, raw = state
        inner = self.stage(inner)
        return inner, self.classify(inner, raw)


class ChainedSplit(DeferredSplit):
    """The inner network's split of a stage, with the stage's classifiers run on its exit path."""

    def __init__(self, inner: DeferredSplit, stage: ChainedStage) -> None:
        self.inner, self.stage = inner, stage

    def for_exits(self, state: State) -> tuple[State, tuple[Any, tuple[torch.Tensor, ...]]]:
        exit_state, pending = self.inner.for_exits(state[0])
        raw = self.stage.classify(exit_state, state[1])
        return (exit_state, raw), (pending, raw)

    def complete(self, pending: tuple[Any, tuple[torch.Tensor, ...]]) -> State:
        return self.inner.complete(pending[0]), pending[1]

    def deferred_modules(self) -> list[nn.Module]:
        return self.inner.deferred_modules()


class Readout(nn.Module):
    """Exit ``k`` of a chained network: raw_k, or ``combine(raw_0..raw_k)`` (each N x C) -> N x C."""

    def __init__(self, k: int, fc: nn.Linear, combine: nn.Module | None = None) -> None:
        super().__init__()
        self.k = k
        self.combine = combine
        self.__dict__["_fc"] = fc  # the inner exit's fc, for SiLa's hooks; not registered twice

    @property
    def fc(self) -> nn.Linear:
        return self.__dict__["_fc"]

    def forward(self, state: State) -> torch.Tensor:
        raw = state[1][: self.k + 1]
        return raw[-1] if self.combine is None else self.combine(raw)


class ReadInner(nn.Module):
    """An inner exit's classifier reading a chained state (a SiLa ``classifier`` twin of a chained exit)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, state: State) -> torch.Tensor:
        return self.head(state[0])


class ChainedExits(MultiExitNetwork):
    """``model`` with exit k reading exit k-1's logits through ``links[k]`` (None: no link; ``links[0]`` is None)
    and read out through ``combiners[k]`` (None: its own logits). ``technique`` names the technique for errors."""

    def __init__(
        self,
        model: MultiExitNetwork,
        links: Sequence[nn.Module | None],
        combiners: Sequence[nn.Module | None],
        detach: bool,
        technique: str,
    ) -> None:
        super().__init__()
        if len(links) != model.num_exits or len(combiners) != model.num_exits or links[0] is not None:
            raise ValueError(f"{model.num_exits} exits need as many links (the first None) and combiners")
        self.technique = technique
        self.trains_only_readouts = False
        self.trains_only_classifiers = False  # IMTA's second stage: the last layers and the links on a frozen trunk
        self.__dict__["_inner"] = model  # for its split and exit initialisation; its modules are registered below
        self.stem = ChainedStem(model.stem)
        self.stages = nn.ModuleList()
        for i, stage in enumerate(model.stages):
            after = [k for k, a in enumerate(model.exit_after) if a == i]
            heads = [model.exits[k] for k in after]
            self.stages.append(ChainedStage(stage, heads, [links[k] for k in after], detach))
        self.exits = nn.ModuleList(
            [Readout(k, model.exits[k].fc, combine) for k, combine in enumerate(combiners)]  # type: ignore[arg-type]
        )
        self.exit_after = list(model.exit_after)

    def train(self, mode: bool = True) -> ChainedExits:
        """With ``trains_only_readouts`` (a later training stage that fits only the readouts), the stem and stages
        stay in eval mode: their batch-norm statistics do not move. With ``trains_only_classifiers`` so do the stem,
        the inner stages and the exit heads; the links train."""
        super().train(mode)
        if self.trains_only_readouts:
            self.stem.eval()
            self.stages.eval()
        if self.trains_only_classifiers:  # the links (their batch norms) train; the trunk and exit heads do not
            self.stem.eval()
            for stage in self.stages:
                assert isinstance(stage, ChainedStage)
                stage.stage.eval()
                stage.heads.eval()
        return self

    @property
    def inner(self) -> MultiExitNetwork:
        return self.__dict__["_inner"]

    def deferred_split(self, stage_index: int) -> DeferredSplit | None:
        split = self.inner.deferred_split(stage_index)
        stage = self.stages[stage_index]
        assert isinstance(stage, ChainedStage)
        return None if split is None else ChainedSplit(split, stage)

    def fresh_exit(self, k: int) -> nn.Module:
        return ReadInner(self.inner.fresh_exit(k))

    def init_exit(self, module: nn.Module) -> None:
        self.inner.init_exit(module)


def chain_exits(
    model: nn.Module,
    technique: str,
    link: Callable[[int, nn.Linear, nn.Linear], nn.Module | None],
    combiner: Callable[[int, int], nn.Module | None] = lambda k, n: None,
    detach: bool = True,
) -> ChainedExits:
    """``model`` as a ``ChainedExits``: ``link(k, fc of exit k-1, fc of exit k)`` builds exit k's link (k >= 1),
    ``combiner(k, num_exits)`` its readout. Refuses, in one line, a network whose exits cannot be chained."""
    if isinstance(model, ChainedExits):
        raise ConfigError(
            f"{technique} and {model.technique} each connect the exits; switch one of them off "
            f"({model.technique}.enabled=false)"
        )
    if not isinstance(model, MultiExitNetwork) or model.num_exits < 2 or model.gated_body() is not None:
        name = type(model).__name__
        raise ConfigError(
            f"{technique} connects consecutive exits, and {name} has no such exits (it needs a multi-exit network with "
            f"at least two ungated exits, e.g. msdnet or timm_exits); set {technique}.enabled=false"
        )
    fcs = [e.fc for e in model.exits]
    if not all(isinstance(fc, nn.Linear) for fc in fcs):
        raise ConfigError(f"{technique} needs every exit of {type(model).__name__} to end in an nn.Linear named fc")
    linear = [fc for fc in fcs if isinstance(fc, nn.Linear)]
    links: list[nn.Module | None] = [None]
    links += [link(k, linear[k - 1], linear[k]) for k in range(1, len(linear))]
    combiners = [combiner(k, len(fcs)) for k in range(len(fcs))]
    return ChainedExits(model, links, combiners, detach, technique)
