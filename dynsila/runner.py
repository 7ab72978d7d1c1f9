"""Real early-exit inference: samples that exit stop being computed.

``EarlyExitRunner(model, thresholds)`` runs the stem, then stage by stage. After each exit, the samples whose
confidence reaches that exit's threshold are finalised and dropped from the batch (the stage state, a tensor or
a list of tensors, is indexed), and the rest go on. Any model following the protocol of DESIGN.md works; there
is no per-model code. On the same thresholds its decisions equal the evaluator's simulated ones
(``dynsila.evaluate.exit_indices``), so the evaluator's MACs are what this runner spends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from dynsila.evaluate import CONFIDENCE
from dynsila.flops import exit_costs
from dynsila.fuse import fold_batchnorm as fold_batchnorm_into_convs
from dynsila.sila import unwrap


@dataclass
class EarlyExitResult:
    predictions: torch.Tensor  # N, class index
    exit_index: torch.Tensor  # N, 0-based exit each sample left at
    macs: torch.Tensor  # N, multiply-accumulates spent on each sample (as evaluated: earlier exits included)
    confidence: torch.Tensor  # N, the criterion's value at the exit taken


class EarlyExitRunner:
    """Stage-by-stage inference with batch compaction.

    thresholds: one per exit on the criterion's scale (the last is ignored: every remaining sample exits there).
    costs: MACs of reaching each exit as evaluated; counted with fvcore when not given (needs ``input_shape``).
    fold_batchnorm: run a copy with batch-norm folded into the convolutions (faster; logits change by float
    rounding only, so a sample within rounding of a threshold could in principle decide differently).
    channels_last: run in NHWC memory layout, which oneDNN and cuDNN convolutions prefer.
    """

    def __init__(
        self,
        model: nn.Module,
        thresholds: Sequence[float] | torch.Tensor,
        criterion: str = "max_prob",
        costs: Sequence[float] | None = None,
        input_shape: tuple[int, int, int] | None = None,
        fold_batchnorm: bool = True,
        channels_last: bool = True,
    ) -> None:
        if criterion not in CONFIDENCE:
            raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CONFIDENCE)}")
        bare = unwrap(model).eval()
        self.model = unwrap(fold_batchnorm_into_convs(bare)) if fold_batchnorm else bare
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
        if len(self.thresholds) != self.model.num_exits:
            raise ValueError(f"{len(self.thresholds)} thresholds for a model with {self.model.num_exits} exits")
        self.confidence = CONFIDENCE[criterion]
        if costs is None:
            if input_shape is None:
                raise ValueError("pass the exits' costs or the input shape to count them")
            costs = [c.macs_cumulative for c in exit_costs(bare, input_shape)]
        self.costs = torch.as_tensor(costs, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> EarlyExitResult:
        """One batch: after each exit the samples that leave are dropped and the rest go on (batch compaction).
        Lowest latency; later stages run on ever smaller batches."""
        finished = _Finished()
        x = x.contiguous(memory_format=self.memory_format)
        group: _Group | None = _Group(self.model.stem(x), torch.arange(x.shape[0], device=x.device))
        for stage_index in range(len(self.model.stages)):
            if group is None:
                break
            group = self._advance(stage_index, group, finished)
        return finished.result(x.shape[0], self.costs)

    @torch.no_grad()
    def run_stream(self, batches: Iterable[torch.Tensor], group_size: int | None = None) -> EarlyExitResult:
        """Many batches, as in budgeted batch classification: the samples that go on past an exit wait until
        ``group_size`` of them (default: the first batch's size) are ready for the next stage, so every stage
        runs on full-size groups. Same decisions as ``__call__``; results in input order."""
        pending: list[list[_Group]] = [[] for _ in self.model.stages]  # groups waiting to enter each stage
        finished = _Finished()
        seen = 0
        for x in batches:
            group_size = group_size or x.shape[0]
            positions = torch.arange(seen, seen + x.shape[0], device=x.device)
            seen += x.shape[0]
            pending[0].append(_Group(self.model.stem(x.contiguous(memory_format=self.memory_format)), positions))
            self._drain(pending, finished, group_size)
        self._drain(pending, finished, 1)
        return finished.result(seen, self.costs)

    def _drain(self, pending: list[list[_Group]], finished: _Finished, group_size: int) -> None:
        for stage_index, waiting in enumerate(pending):
            if sum(len(g) for g in waiting) < group_size or not waiting:
                continue
            group = _Group.concatenate(waiting)
            waiting.clear()
            survivors = self._advance(stage_index, group, finished)
            if survivors is not None:
                pending[stage_index + 1].append(survivors)

    def _advance(self, stage_index: int, group: _Group, finished: _Finished) -> _Group | None:
        """Run one stage and the exits after it on ``group``; record who leaves; return the rest (or None)."""
        model = self.model
        state = model.stages[stage_index](group.state)
        positions = group.positions
        for k in (k for k, after in enumerate(model.exit_after) if after == stage_index):
            logits = model.exits[k](state)
            conf = self.confidence(logits[:, None, :])[:, 0]
            last = k == model.num_exits - 1
            leaving = torch.ones_like(conf, dtype=torch.bool) if last else conf >= self.thresholds[k].item()
            finished.add(positions[leaving], logits[leaving].argmax(dim=-1), k, conf[leaving])
            if bool(leaving.all()):
                return None
            if bool(leaving.any()):
                staying = ~leaving
                positions = positions[staying]
                state = tree_map(lambda t, keep=staying: t[keep], state)
        return _Group(state, positions)


@dataclass
class _Group:
    """Samples travelling together: their stage state (a tensor or a list of tensors) and input positions."""

    state: Any
    positions: torch.Tensor

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @staticmethod
    def concatenate(groups: list[_Group]) -> _Group:
        if len(groups) == 1:
            return groups[0]
        state = tree_map(lambda *parts: torch.cat(parts), *[g.state for g in groups])
        return _Group(state, torch.cat([g.positions for g in groups]))


class _Finished:
    """Decisions collected as samples leave, assembled in input order at the end."""

    def __init__(self) -> None:
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]] = []

    def add(self, positions: torch.Tensor, predictions: torch.Tensor, exit_k: int, confidence: torch.Tensor) -> None:
        if positions.numel():
            self.chunks.append((positions, predictions, exit_k, confidence))

    def result(self, n: int, costs: torch.Tensor) -> EarlyExitResult:
        device = self.chunks[0][0].device if self.chunks else torch.device("cpu")
        predictions = torch.empty(n, dtype=torch.long, device=device)
        exit_index = torch.empty(n, dtype=torch.long, device=device)
        confidence = torch.empty(n, dtype=torch.float64, device=device)
        for positions, preds, k, conf in self.chunks:
            predictions[positions] = preds
            exit_index[positions] = k
            confidence[positions] = conf.double()
        return EarlyExitResult(predictions, exit_index, costs.to(device)[exit_index], confidence)
