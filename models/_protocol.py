"""The multi-exit protocol every dynsila architecture implements (see docs/design.md).

A network is ``stem`` followed by ``stages``; exit ``k`` is a classifier reading the state after stage
``exit_after[k]`` and ends in an ``nn.Linear`` named ``fc``. A state may be a tensor or a list of tensors.

Optional parts of the protocol are methods a model overrides (the defaults say "not this kind"), so that the
evaluator, the cost counter, training and the runner never ask which family a model is:

- ``gated_body()``: the stage whose blocks gates run or skip per sample (SkipNet), a ``GatedBody``; else None.
- ``deferred_split(i)``: stage ``i`` split into what the exits after it read and what only later stages read
  (MSDNet's finer scales), a ``DeferredSplit``; else None. The early-exit runner computes the second part only
  for the samples that go on; ``forward`` runs every stage whole.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn


class DynamicOutput(NamedTuple):
    """What a gated network's ``forward`` returns: its exits' logits and its gates' decisions."""

    logits: list[torch.Tensor]  # N x C per exit
    gate_probs: list[torch.Tensor]  # per gated block: N, probability of executing
    gate_actions: list[torch.Tensor]  # per gated block: N, 1 = executed, 0 = skipped (float)
    action_log_prob: torch.Tensor | None  # N, sum over gates of log pi(action) when actions were sampled
    block_cost_share: torch.Tensor  # per gated block: its share of all gated blocks' MACs (sums to 1)


def exit_logits(output: list[torch.Tensor] | DynamicOutput) -> list[torch.Tensor]:
    """The per-exit logits of any network's output."""
    return output.logits if isinstance(output, DynamicOutput) else output


class GatedBody(nn.Module):
    """A stage of blocks that gates run or skip per sample.

    ``blocks[0]`` always runs; ``gates[i]`` reads the output of ``blocks[i]`` and decides ``blocks[i + 1]``, so
    there is one gate per gated block. ``threshold``: in eval mode a block runs when its gate's probability
    reaches it. ``gate_mode``: how training decides (straight-through hard gates, or sampled actions).
    ``block_cost_share``: each gated block's share of all gated blocks' MACs, which weighs the gate-cost loss
    term; every block weighs the same until the model's builder hands in counted MACs (``set_block_costs``:
    models never count their own costs, ``dynsila.flops`` does)."""

    block_cost_share: torch.Tensor

    def __init__(self, blocks: Sequence[nn.Module], gates: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(gates) != len(blocks) - 1:
            n = len(blocks) - 1
            raise ValueError(f"{len(blocks)} blocks need {n} gates (blocks[0] runs ungated), got {len(gates)}")
        self.blocks = nn.ModuleList(blocks)
        self.gates = nn.ModuleList(gates)
        self.threshold = 0.5
        self.gate_mode: Literal["straight_through", "sample"] = "straight_through"
        n = len(gates)
        self.register_buffer("block_cost_share", torch.full((n,), 1.0 / max(n, 1)), persistent=False)

    def skip_path(self, index: int) -> nn.Module | None:
        """What ``blocks[index]`` still computes for a sample that skips it (a projection shortcut), or None
        when a skipped block passes its input through unchanged."""
        raise NotImplementedError

    def computation_percent(self, executed: torch.Tensor) -> float:
        """The family's own usage figure for gate decisions ``executed`` (N x G, 1 = the block ran), as its paper
        reports it; the evaluator puts it beside the counted MACs without knowing the family."""
        raise NotImplementedError(f"{type(self).__name__} defines no computation percentage")

    def set_block_costs(self, macs: Sequence[float]) -> None:
        """Each gated block's MACs when executed (``blocks[1:]``, counted by ``dynsila.flops``); stored as shares."""
        costs = torch.as_tensor(list(macs), dtype=torch.float64)
        if costs.shape != self.block_cost_share.shape or not bool((costs > 0).all()):
            raise ValueError(f"need {len(self.gates)} positive block costs, got {list(macs)}")
        share = (costs / costs.sum()).to(self.block_cost_share)
        self.block_cost_share.copy_(share)


class DeferredSplit:
    """Stage ``i`` of a network in two parts, for early exit.

    ``for_exits(state)`` computes what the exits after the stage read and returns ``(exit_state, pending)``:
    the exits read ``exit_state`` as they would read the stage's output. ``complete(pending)`` computes the rest
    and returns the stage's full output, the next stage's input. The two parts together compute exactly what the
    stage computes, once each: ``complete(for_exits(s)[1])`` equals ``stage(s)``. ``pending`` is a tree of lists
    and tuples of batch-first tensors (and None), which the runner indexes down to the samples that go on."""

    def for_exits(self, state: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def complete(self, pending: Any) -> Any:
        raise NotImplementedError

    def deferred_modules(self) -> list[nn.Module]:
        """The modules only ``complete`` runs, each once per sample, as the stage's ``forward`` runs them: their
        cost is what a sample that goes on pays on top (``dynsila.flops`` counts it from them)."""
        raise NotImplementedError


class MultiExitNetwork(nn.Module):
    """Base class: subclasses set ``stem``, ``stages``, ``exits`` and ``exit_after`` and inherit ``forward``."""

    stem: nn.Module
    stages: nn.ModuleList
    exits: nn.ModuleList
    exit_after: list[int]

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def gated_body(self) -> GatedBody | None:
        """The stage whose blocks gates skip per sample, for gated networks (SkipNet); None for the others."""
        return None

    def deferred_split(self, stage_index: int) -> DeferredSplit | None:
        """Stage ``stage_index`` split into what its exits need and what only later stages need, where the
        network has such a split; None (the default): the stage runs whole."""
        return None

    def fresh_exit(self, k: int) -> nn.Module:
        """A new classifier with exit ``k``'s architecture and an initialisation of its own, drawn from the global
        RNG as the family initialises its exits (``init_exit``): what a siamese *classifier* twin starts from."""
        twin = copy.deepcopy(self.exits[k])
        for module in twin.modules():  # the copy carries any hooks on the exit (a SiLa wrapper's): drop them
            module._forward_hooks.clear()
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
        self.init_exit(twin)
        return twin

    def init_exit(self, module: nn.Module) -> None:
        """Initialise a freshly reset exit classifier as this family does; the default keeps PyTorch's."""

    def forward(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Logits of every exit (each ``N x C``), or of exits ``0..upto`` only, computing nothing beyond."""
        last = self.num_exits - 1 if upto is None else upto
        if not 0 <= last < self.num_exits:
            raise ValueError(f"upto={upto} is out of range for a network with {self.num_exits} exits")
        state: Any = self.stem(x)
        logits: list[torch.Tensor] = []
        for index, stage in enumerate(self.stages):
            state = stage(state)
            while len(logits) <= last and self.exit_after[len(logits)] == index:
                logits.append(self.exits[len(logits)](state))
            if len(logits) > last:
                break
        return logits


def gated_body(model: nn.Module) -> GatedBody | None:
    """The gated body of any module that follows the protocol (None for other modules and ungated networks)."""
    return model.gated_body() if isinstance(model, MultiExitNetwork) else None
