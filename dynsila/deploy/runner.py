"""Real early-exit inference: samples that exit stop being computed.

``EarlyExitRunner(model, thresholds)`` runs the stem, then stage by stage. After each exit, the samples whose
confidence reaches that exit's threshold are finalised and dropped from the batch (the stage state, a tensor or
a list of tensors, is indexed), and the rest go on. Evaluation is lazy where the model declares a stage's
deferrable part (``MultiExitNetwork.deferred_split``; MSDNet: the finer scales computed just before an exit,
which only later exits read): the exits read the stage's exit path, and the deferred part is computed after the
exit decision, for the samples that go on only. Any model following the protocol of docs/design.md works; there
is no per-model code. On the same thresholds its decisions equal the evaluator's simulated ones
(``dynsila.thresholds.exit_indices``); a sample leaving at exit k spends ``ExitCost.macs_lazy[k]``, at most the
paper's count ``ExitCost.macs_cumulative[k]`` that the evaluator reports by default.

Imports torch and the threshold maths only; the cost counter (fvcore) is imported only when the runner has to
count the exits' costs itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from dynsila.budget.thresholds import confidence_of
from dynsila.deploy.fuse import fold_batchnorm as fold_batchnorm_into_convs
from dynsila.methods.sila import unwrap
from dynsila.policies import rules

# Early exit shrinks batches to every size between 1 and the batch size, and oneDNN compiles a convolution
# primitive per input shape; its default cache (1,024 primitives) then thrashes: MSDNet's ~180 convolutions x a
# few dozen batch sizes. oneDNN reads the variable once, when the process creates its first primitive (checked
# with ONEDNN_VERBOSE=profile_create: set after torch is imported but before any convolution, the cache keeps
# the primitives; set after a convolution, it has no effect; tests/test_runner.py), so it is set by the entry
# points before anything convolves, not at import.
PRIMITIVE_CACHE_CAPACITY = "8192"


def raise_primitive_cache() -> None:
    """Raise oneDNN's primitive cache for early exit's many batch sizes; a value the user set wins. Call it before
    the process's first convolution (``python -m dynsila.infer`` does; the runner's constructor does too, which
    is in time when the runner is the first thing to convolve)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", PRIMITIVE_CACHE_CAPACITY)


@dataclass
class EarlyExitResult:
    predictions: torch.Tensor  # N, class index
    exit_index: torch.Tensor  # N, 0-based exit each sample left at
    macs: torch.Tensor  # N, the runner's ``costs`` of the exit each sample took
    confidence: torch.Tensor  # N, the criterion's value at the exit taken


class EarlyExitRunner:
    """Stage-by-stage inference with batch compaction.

    thresholds: one per exit on the criterion's scale (the last is ignored: every remaining sample exits there).
    costs: what a sample that leaves at each exit is charged, in the caller's convention; counted with fvcore
    when not given (needs ``input_shape``): as evaluated (the paper's convention, ``ExitCost.macs_cumulative``),
    or what it really pays with ``deferred`` (``ExitCost.macs_lazy``) when ``lazy_costs`` is true.
    deferred: where a stage declares a split (``MultiExitNetwork.deferred_split``: MSDNet's finer scales), run
    only what its exits read before the exit decision and the rest only for the samples that go on. Decisions
    and logits are the same either way.
    fold_batchnorm: run a copy with batch-norm folded into the convolutions (faster; logits change by float
    rounding only, so a sample within rounding of a threshold could in principle decide differently).
    channels_last: run in NHWC memory layout, which oneDNN and cuDNN convolutions prefer.
    policy: a fitted exit policy's spec (``dynsila.policies``) instead of ``thresholds`` and ``criterion``: a quota
    spec runs as thresholds; any other is executed exit by exit by its rule (``dynsila.policies.rules``, numpy on
    the exit's logits), carrying each sample's state (patience's streak, the product of experts) from exit to
    exit and compacting it with the batch.
    compile: run every piece the runner calls (stem, stage or its two deferred halves, exit head) through
    ``torch.compile`` (inductor, batch size dynamic, weights frozen as constants). The first call of each piece
    compiles it (seconds to minutes; batch sizes 1 and 2 compile apart). Logits equal the eager ones up to float
    rounding. On a CPU the early, finest-scale stages gain most (docs/early_exit.md).
    """

    def __init__(
        self,
        model: nn.Module,
        thresholds: Sequence[float] | torch.Tensor | None,
        criterion: str = "max_prob",
        costs: Sequence[float] | None = None,
        input_shape: tuple[int, int, int] | None = None,
        fold_batchnorm: bool = True,
        channels_last: bool = True,
        deferred: bool = True,
        lazy_costs: bool = False,
        compile: bool = False,
        policy: Mapping[str, Any] | None = None,
    ) -> None:
        raise_primitive_cache()
        self.rule: rules.Rule | None = None
        if policy is not None:
            if policy.get("rule") == "quotas":
                criterion = policy["criterion"]
            else:
                self.rule = rules.make_rule(policy)
            thresholds = [float(t) for t in policy["thresholds"]]
        if thresholds is None:
            raise ValueError("pass thresholds or a fitted policy")
        self.confidence = confidence_of(criterion)
        bare = unwrap(model).eval()
        self.model = unwrap(fold_batchnorm_into_convs(bare)) if fold_batchnorm else bare
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.set_thresholds(thresholds)
        if costs is None:
            if input_shape is None:
                raise ValueError("pass the exits' costs or the input shape to count them")
            from dynsila.budget.flops import exit_costs  # fvcore: only when the caller has no costs

            counted = exit_costs(bare, input_shape)
            costs = [c.macs_lazy if lazy_costs else c.macs_cumulative for c in counted]
        self.costs = torch.as_tensor(costs, dtype=torch.float64)
        if len(self.costs) != self.model.num_exits:
            raise ValueError(f"{len(self.costs)} costs for a model with {self.model.num_exits} exits")
        stages = range(len(self.model.stages))
        self.splits = [self.model.deferred_split(i) if deferred else None for i in stages]
        self.exits_after = [[k for k, after in enumerate(self.model.exit_after) if after == i] for i in stages]
        self.pieces = _Pieces(self.model, self.splits, compile)

    def set_thresholds(self, thresholds: Sequence[float] | torch.Tensor) -> None:
        """New thresholds (one per exit), keeping everything else, compiled pieces included."""
        values = torch.as_tensor(thresholds, dtype=torch.float64).cpu()
        if len(values) != self.model.num_exits:
            raise ValueError(f"{len(values)} thresholds for a model with {self.model.num_exits} exits")
        self.thresholds = values

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> EarlyExitResult:
        """One batch: after each exit the samples that leave are dropped and the rest go on (batch compaction).
        Lowest latency; later stages run on ever smaller batches."""
        finished = _Finished()
        x = x.contiguous(memory_format=self.memory_format)
        group: _Group | None = _Group(self.pieces.stem(x), torch.arange(x.shape[0], device=x.device), self._start(x))
        for stage_index in range(len(self.model.stages)):
            if group is None:
                break
            group = self._advance(stage_index, group, finished)
        return finished.result(x.shape[0], self.costs)

    @torch.no_grad()
    def run_stream(self, batches: Iterable[torch.Tensor], group_size: int | None = None) -> EarlyExitResult:
        """Many batches, as in budgeted batch classification: the samples that go on past an exit wait until
        ``group_size`` of them (default: the first batch's size) are ready for the next stage, so every stage
        runs on full-size groups. Same decisions as ``__call__``; results in input order.

        Each batch's survivors are compacted and their deferred part computed at once, while their state is
        still in cache, and only then regrouped: gathering them straight into the next stage's group instead
        (one copy fewer, the deferred part on full groups) measured 2.5 % (75 % MACs mix) and 6.6 % (50 % mix)
        slower on MSDNet CIFAR-100 b7, batch 64 (15 paired runs)."""
        pending: list[list[_Group]] = [[] for _ in self.model.stages]  # groups waiting to enter each stage
        finished = _Finished()
        seen = 0
        for x in batches:
            group_size = group_size or x.shape[0]
            positions = torch.arange(seen, seen + x.shape[0], device=x.device)
            seen += x.shape[0]
            stem = self.pieces.stem(x.contiguous(memory_format=self.memory_format))
            pending[0].append(_Group(stem, positions, self._start(x)))
            self._drain(pending, finished, group_size)
        self._drain(pending, finished, 1)
        return finished.result(seen, self.costs)

    def _start(self, x: torch.Tensor) -> rules.State:
        return {} if self.rule is None else self.rule.start(x.shape[0])

    def _decide(
        self, k: int, logits: torch.Tensor, memo: rules.State
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, rules.State]:
        """Confidence, prediction and who leaves at exit ``k`` (``N`` each), and the policy's new state."""
        if self.rule is None:
            conf = self.confidence(logits[:, None, :])[:, 0]
            if k == self.model.num_exits - 1:
                return conf, logits.argmax(dim=-1), torch.ones_like(conf, dtype=torch.bool), memo
            return conf, logits.argmax(dim=-1), conf >= self.thresholds[k], memo
        step = self.rule.score(k, logits.detach().cpu().numpy(), memo)
        device = logits.device
        leaving = torch.from_numpy(self.rule.leave(k, step.score)).to(device)
        return (
            torch.from_numpy(step.score).to(device),
            torch.from_numpy(step.prediction).to(device),
            leaving,
            step.state,
        )

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
        """Run one stage and the exits after it on ``group``; record who leaves; return the rest (or None).

        With a deferred split the exits read the stage's exit path, and only the samples that stay compute the
        deferred part. Leavers are dropped by one index tensor per exit, applied to the pending state only (the
        tensors the rest of the stage and the next stage read)."""
        model, split, pieces = self.model, self.splits[stage_index], self.pieces
        if split is None:
            exit_state = pending = pieces.stages[stage_index](group.state)
        else:
            exit_state, pending = pieces.for_exits[stage_index](group.state)
        positions, exits, memo = group.positions, self.exits_after[stage_index], group.memo
        for n, k in enumerate(exits):
            logits = pieces.exits[k](exit_state)
            conf, predictions, leaving, memo = self._decide(k, logits, memo)
            if k == model.num_exits - 1:  # everyone left leaves here
                finished.add(positions, predictions, k, conf)
                return None
            left = leaving.nonzero().squeeze(1)
            if left.numel():
                finished.add(positions[left], predictions[left], k, conf[left])
            if left.numel() == positions.shape[0]:
                return None
            if left.numel():
                keep = (~leaving).nonzero().squeeze(1)
                positions, pending = positions[keep], _select(pending, keep)
                memo = rules.select(memo, keep.cpu().numpy())
                if split is None:
                    exit_state = pending
                elif n < len(exits) - 1:  # another exit after this stage reads the exit path
                    exit_state = _select(exit_state, keep)
        return _Group(pending if split is None else pieces.complete[stage_index](pending), positions, memo)


class _Pieces:
    """What the runner calls, as the model's own callables or each one compiled on its own (graphs of one piece:
    the runner's decisions between them stay in Python)."""

    def __init__(self, model: Any, splits: Sequence[Any], compile: bool) -> None:  # the protocol of docs/design.md
        wrap = _compiled if compile else _as_is
        self.stem: Callable[..., Any] = wrap(model.stem)
        self.stages: list[Callable[..., Any]] = [wrap(stage) for stage in model.stages]
        self.for_exits: list[Callable[..., Any]] = [wrap(s.for_exits) if s is not None else _absent for s in splits]
        self.complete: list[Callable[..., Any]] = [wrap(s.complete) if s is not None else _absent for s in splits]
        self.exits: list[Callable[..., Any]] = [wrap(head) for head in model.exits]


def _as_is(fn: Any) -> Any:
    return fn


def _absent(*args: Any) -> Any:
    raise AssertionError("a stage without a deferred split has no deferred halves")


def _compiled(fn: Any) -> Any:
    """``fn`` through inductor with a dynamic batch size and the weights frozen as constants (which lets inductor
    prepack convolution weights and fuse the passes eager mode runs one by one)."""
    return torch.compile(fn, dynamic=True, options={"freezing": True})


def _select(tree: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of every tensor in a tree of lists and tuples (None entries stay None)."""
    if isinstance(tree, torch.Tensor):
        return _rows(tree, index)
    if isinstance(tree, list | tuple):
        return type(tree)(_select(t, index) for t in tree)
    return tree


def _as_rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed as ``N x rest`` (no copy) where each sample is one block of memory: contiguous tensors and
    channels-last (NHWC) ones alike; None for other layouts."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1) if t.dim() > 0 and t.is_contiguous() else None


def _like_rows(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The ``N x rest`` tensor ``flat`` shaped as ``like`` (any N), in ``like``'s layout (inverse of ``_as_rows``)."""
    if like.dim() == 4 and not like.is_contiguous():
        n_, c, h, w = like.shape
        return flat.view(-1, h, w, c).permute(0, 3, 1, 2)
    return flat.view(-1, *like.shape[1:])


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along the batch dimension, in ``t``'s memory layout: whole rows of the ``N x rest`` view copied
    with ``index_select``, about half the time of advanced indexing on a channels-last MSDNet state (measured:
    benchmarks/results/early_exit_speed.md)."""
    flat = _as_rows(t)
    return t[index] if flat is None else _like_rows(flat.index_select(0, index), t)


@dataclass
class _Group:
    """Samples travelling together: their stage state (a tensor or a list of tensors) and input positions."""

    state: Any
    positions: torch.Tensor
    memo: rules.State  # the exit policy's per-sample state (empty for thresholds)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @staticmethod
    def concatenate(groups: list[_Group]) -> _Group:
        """One group (``torch.cat`` keeps the channels-last layout)."""
        if len(groups) == 1:
            return groups[0]
        state = tree_map(lambda *parts: torch.cat(parts), *[g.state for g in groups])
        return _Group(state, torch.cat([g.positions for g in groups]), rules.concatenate([g.memo for g in groups]))


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
