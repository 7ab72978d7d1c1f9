"""Risk-controlled early exit ("Fast yet Safe", Jazbec et al., NeurIPS 2024): one max-probability threshold shared
by every exit, chosen on a calibration split (the validation logits) so that the risk of exiting early stays
within ``epsilon``. Risks, per sample: ``disagreement`` (the exit's prediction differs from the last exit's) or
``accuracy_gap`` (the last exit is right and the exit taken is not). Bounds:

- ``crc``, conformal risk control (Angelopoulos et al. 2022): E[risk] <= epsilon over calibration and test draw.
  The per-sample losses are made non-increasing in the threshold (each replaced by its maximum over the higher
  thresholds, an upper bound), then the lowest threshold with (n R + 1) / (n + 1) <= epsilon.
- ``ltt``, Learn then Test (Angelopoulos et al. 2021) with Hoeffding-Bentkus p-values: P(risk > epsilon) <= delta.
  Thresholds are tested from the safest down (fixed-sequence testing, no monotonicity needed) and the last one
  rejected before the first failure is taken.

Thresholds come from a fixed grid (chosen before seeing data, as both proofs require); the grid's top, +inf,
sends every sample to the last exit, risk 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

from dynsila.policies.base import Spec, as_array
from dynsila.policies.rules import Array, first_passing, make_rule, trace

RISKS = ("disagreement", "accuracy_gap")
BOUNDS = ("crc", "ltt")
GRID = np.unique(np.concatenate([np.linspace(0.0, 1.0, 501), 1.0 - np.logspace(-1, -10, 200), [np.inf]]))
PValue = Callable[[float, int, float], float]


def sample_losses(scores: Array, predictions: Array, labels: Array, risk: str) -> Array:
    """Per-sample loss (``L x N``, in [0, 1]) of every grid threshold."""
    exits = first_passing(scores, np.repeat(GRID[:, None], scores.shape[1], axis=1))
    taken = predictions[np.arange(len(labels))[None], exits]
    last = predictions[:, -1][None]
    if risk == "disagreement":
        return (taken != last).astype(np.float64)
    return np.maximum(0.0, (last == labels).astype(np.float64) - (taken == labels))


def crc_threshold(losses: Array, epsilon: float) -> int:
    """Grid index chosen by conformal risk control (losses ``L x N``, grid ascending, loss bound 1)."""
    monotone = np.maximum.accumulate(losses[::-1], axis=0)[::-1]  # max over this and every higher threshold
    n = losses.shape[1]
    feasible = (monotone.sum(axis=1) + 1.0) / (n + 1) <= epsilon
    return int(np.argmax(feasible)) if feasible.any() else len(GRID) - 1


def hoeffding_bentkus(risk: float, n: int, epsilon: float) -> float:
    """p-value of the null 'true risk > epsilon' given the empirical risk of n losses in [0, 1]."""
    a = min(risk, epsilon)
    h = (a * math.log(a / epsilon) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - epsilon))
    return min(math.exp(-n * h), math.e * float(binom.cdf(math.ceil(n * risk), n, epsilon)))


def ltt_threshold(losses: Array, epsilon: float, delta: float, p_value: PValue = hoeffding_bentkus) -> int:
    """Grid index chosen by Learn then Test: fixed-sequence tests from the top of the grid down."""
    n = losses.shape[1]
    risks = losses.mean(axis=1)
    chosen = len(GRID) - 1  # +inf: everything at the last exit, risk 0
    for i in range(len(GRID) - 2, -1, -1):
        if p_value(float(risks[i]), n, epsilon) > delta:
            break
        chosen = i
    return chosen


@dataclass
class RiskControl:
    risk: str = "disagreement"
    bound: str = "ltt"
    delta: float = 0.1
    name = "risk"
    target = "epsilon"

    def __post_init__(self) -> None:
        if self.risk not in RISKS or self.bound not in BOUNDS:
            raise ValueError(f"risk must be one of {', '.join(RISKS)} and bound one of {', '.join(BOUNDS)}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), not {self.delta}")

    def choose(self, losses: Array, epsilon: float) -> int:
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon must lie in (0, 1), not {epsilon}")
        return crc_threshold(losses, epsilon) if self.bound == "crc" else ltt_threshold(losses, epsilon, self.delta)

    def fit(self, val_logits: Any, val_labels: Any, costs: Sequence[float], targets: Sequence[float]) -> list[Spec]:
        k = len(costs)
        base: Spec = {"policy": self.name, "rule": "confidence", "risk": self.risk, "bound": self.bound}
        scores, predictions = trace(make_rule({**base, "thresholds": [0.0] * k}), as_array(val_logits))
        losses = sample_losses(scores, predictions, as_array(val_labels, np.int64), self.risk)
        specs = []
        for epsilon in targets:
            i = self.choose(losses, float(epsilon))
            fit = {"epsilon": float(epsilon), "delta": self.delta, "calibration_risk": float(losses[i].mean()),
                   "calibration_images": losses.shape[1]}  # fmt: skip
            specs.append({**base, "thresholds": [float(GRID[i])] * k, "fit": fit})
        return specs
