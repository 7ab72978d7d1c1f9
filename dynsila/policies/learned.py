"""A learned exit assigner after EENet (Ilhan et al., WACV 2024): per exit a small model on the exit's
predictions (``rules.exit_features``: confidence, margin, entropy, agreement with the previous exit) estimates
the chance that the exit is right, and a sample leaves once that estimate reaches one threshold shared by every
exit, chosen per budget on validation. The models are L2-regularised logistic regressions fitted on validation
alone; their one hyperparameter, the L2 strength, is chosen on a held-out part of validation (fit on the rest,
log-loss on it), then they are refitted on all of validation. Test data is never seen."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynsila.policies.base import Spec, as_array, shared_threshold_specs
from dynsila.policies.rules import Array, LearnedRule, exit_features, make_rule, trace

STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
NEWTON_STEPS = 30


def features_and_correct(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Every exit's features (``K x N x F``) and whether its argmax is right (``K x N``)."""
    state = LearnedRule({"thresholds": [0.0], "coefficients": [[0.0]]}).start(logits.shape[0])
    features, correct = [], []
    for k in range(logits.shape[1]):
        f, state = exit_features(k, logits[:, k], state)
        features.append(f)
        correct.append((state["previous"] == labels).astype(np.float64))
    return np.stack(features), np.stack(correct)


def fit_logistic(x: Array, y: Array, strength: float) -> Array:
    """L2-regularised logistic regression by Newton's method (the last feature, a constant, not penalised)."""
    n, f = x.shape
    penalty = np.full(f, strength)
    penalty[-1] = 1e-9
    w = np.zeros(f)
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (p - y) / n + penalty * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x / n + np.diag(penalty)
        w = w - np.linalg.solve(hessian, gradient)
    return w


def log_loss(x: Array, y: Array, w: Array) -> float:
    z = x @ w
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def choose_strength(features: Array, correct: Array, held_out: Array) -> float:
    """The L2 strength whose models, fitted without ``held_out`` samples, have the lowest log-loss on them."""
    fit_on = ~held_out
    losses = [
        sum(
            log_loss(f[held_out], c[held_out], fit_logistic(f[fit_on], c[fit_on], s))
            for f, c in zip(features, correct, strict=True)
        )
        for s in STRENGTHS
    ]
    return STRENGTHS[int(np.argmin(losses))]


@dataclass
class LearnedAssigner:
    """held_out: share of validation that chooses the L2 strength; seed: which samples."""

    held_out: float = 0.3
    seed: int = 0
    name = "learned"
    target = "budget"

    def fit(self, val_logits: Any, val_labels: Any, costs: Sequence[float], targets: Sequence[float]) -> list[Spec]:
        x, labels = as_array(val_logits), as_array(val_labels, np.int64)
        features, correct = features_and_correct(x, labels)
        mask = np.zeros(len(labels), dtype=bool)
        mask[np.random.default_rng(self.seed).permutation(len(labels))[: int(self.held_out * len(labels))]] = True
        strength = choose_strength(features, correct, mask)
        coefficients = [fit_logistic(f, c, strength).tolist() for f, c in zip(features, correct, strict=True)]
        base: Spec = {"policy": self.name, "rule": "learned", "coefficients": coefficients, "l2": strength}
        scores, predictions = trace(make_rule({**base, "thresholds": [0.0] * len(costs)}), x)
        return shared_threshold_specs(base, scores, predictions, labels, costs, targets)
