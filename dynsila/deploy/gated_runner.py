"""Deploying a gated network (SkipNet): every sample runs only the blocks its gates open.

A gated body in eval mode already computes what its gates decide: at each gated block the samples whose gate opens
are gathered, the block runs on them alone, and the result is scattered back beside the skipped samples' shortcut
(``models.skipnet.execute_block``). ``GatedRunner`` is that forward in its inference form (batch-norm folded into
the convolutions, channels-last, gradients off) at a chosen gate threshold, with each sample's gate decisions and
MACs; ``threshold_for_budget`` picks the threshold on validation images for an average-MACs budget. Its decisions
equal the evaluator's at the same threshold (``dynsila.evaluation.evaluate.gated_pass``; tested), up to a gate
probability within float rounding of the threshold (batch-norm folding moves features by about 1e-6).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from dynsila.budget.flops import GatedCosts
from dynsila.deploy.fuse import fold_batchnorm
from dynsila.deploy.runner import raise_primitive_cache
from dynsila.methods.technique import unwrap
from dynsila.models import GatedBody, gated_body


@dataclass
class GatedResult:
    predictions: torch.Tensor  # N, class index
    executed: torch.Tensor  # N x G, 1 where the gated block ran
    macs: torch.Tensor  # N, per-sample MACs (gates and shortcuts included)
    logits: torch.Tensor  # N x C


class GatedRunner:
    """Per-sample block skipping at gate threshold ``threshold`` (a gate opens when its probability >= it)."""

    def __init__(
        self, model: nn.Module, threshold: float, costs: GatedCosts, fold: bool = True, channels_last: bool = True
    ) -> None:
        raise_primitive_cache()
        bare = unwrap(model).eval()
        if gated_body(bare) is None:
            raise ValueError(f"{type(bare).__name__} has no gated body; use EarlyExitRunner for multi-exit networks")
        self.model = unwrap(fold_batchnorm(bare)) if fold else bare
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)
        self.costs = costs
        self.set_threshold(threshold)

    @property
    def body(self) -> GatedBody:
        body = gated_body(self.model)
        assert body is not None
        return body

    def set_threshold(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0 and threshold != -1.0:
            raise ValueError(f"gate threshold {threshold} must lie in [0, 1] (or -1: every block runs)")
        self.body.threshold = float(threshold)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> GatedResult:
        """``x``: N x 3 x H x W normalised images."""
        out = self.model(x.contiguous(memory_format=self.memory_format))
        executed = torch.stack(out.gate_actions, dim=1)
        logits = out.logits[-1]
        return GatedResult(logits.argmax(1), executed, self.costs.per_sample(executed), logits)


@torch.no_grad()
def threshold_for_budget(runner: GatedRunner, batches: Iterable[torch.Tensor], budget: float, steps: int = 20) -> float:
    """The lowest gate threshold (the most blocks run) whose average MACs on ``batches`` stay within ``budget``,
    bisected to 2**-steps; 1.0 when even skipping every block it may skip costs more (the cheapest the gates allow).
    Average cost falls as the threshold rises, since more gates stay closed."""
    images = list(batches)

    def average(t: float) -> float:
        runner.set_threshold(t)
        return float(torch.cat([runner(x).macs for x in images]).mean())

    low, high = 0.0, 1.0
    if average(low) <= budget:
        return low
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (low, middle) if average(middle) <= budget else (middle, high)
    return high
