"""What a training technique is: named loss terms added to the exit cross-entropy, computed from one batch.

A technique is one module holding one ``Technique`` object; ``dynsila.methods.losses.TECHNIQUES`` is the table of the
built-in ones (SiLa, self-distillation, the gate terms of SkipNet's SP and HRL stages, DML), in the order their terms
are added, which is the order the loss sums them. A new technique subclasses ``Technique`` in its own module,
overrides the hooks it needs and calls ``losses.register_technique`` on it; nothing else changes (see
tests/test_techniques.py, which adds one).

What a technique sees of a step is ``ModelBatch``: the labels, one network's training output (its per-exit logits,
the gate decisions of a gated network, SiLa's twin logits), the per-exit loss weights and the run's ``Config``, from
which it reads its own settings (``config_section`` names where they live).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from dynsila.config import Config
from dynsila.models import DynamicOutput


class ModelBatch(NamedTuple):
    """One network's training output on one batch, with what every technique needs beside it (a NamedTuple:
    ``torch.compile`` traces the training step through it without a graph break)."""

    output: object  # what the network returned: list of logits, DynamicOutput (gated) or SiLaOutput
    logits: list[torch.Tensor]  # per exit, N x C
    gates: DynamicOutput | None  # the gate decisions of a gated network (inside SiLa's output or not), else None
    labels: torch.Tensor  # N
    exit_weights: list[float]  # w_k, one per exit
    cfg: Config


class Technique:
    """A training technique: each hook adds nothing unless the technique overrides it."""

    name: str = ""
    config_section: str = ""  # where its settings live, e.g. "sila" or "loss.self_distill"

    def replaces_exit_ce(self, batch: ModelBatch) -> bool:
        """True when this technique's terms stand in for the exit cross-entropy (which is then left out)."""
        return False

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        """Terms of one network's loss (each DML peer gets its own; equal names are summed over peers)."""
        return {}

    def ensemble_terms(self, batches: Sequence[ModelBatch]) -> dict[str, torch.Tensor]:
        """Terms that couple the networks trained together (one ``ModelBatch`` per peer)."""
        return {}

    def monitor_terms(self, batches: Sequence[ModelBatch]) -> dict[str, torch.Tensor]:
        """Detached diagnostics logged beside the loss, never minimised."""
        return {}
