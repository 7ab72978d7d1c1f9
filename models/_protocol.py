"""The multi-exit protocol every dynsila architecture implements (see DESIGN.md).

A network is ``stem`` followed by ``stages``; exit ``k`` is a classifier reading the state after stage
``exit_after[k]`` and ends in an ``nn.Linear`` named ``fc``. A state may be a tensor or a list of tensors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class MultiExitNetwork(nn.Module):
    """Base class: subclasses set ``stem``, ``stages``, ``exits`` and ``exit_after`` and inherit ``forward``."""

    stem: nn.Module
    stages: nn.ModuleList
    exits: nn.ModuleList
    exit_after: list[int]

    @property
    def num_exits(self) -> int:
        return len(self.exits)

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
