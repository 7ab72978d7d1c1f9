"""What every exit policy shares: the interface, the spec of a fit, and choosing a threshold on validation.

A policy is fitted on validation logits ``N x K x C`` and labels with the exits' costs and a list of targets
(average MACs budgets, or risk levels for ``risk``), one spec per target (``dynsila.policies.rules``), and
applied to any logits with ``apply``. Numpy in float64; torch tensors are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dynsila.policies.quotas import apply_quotas
from dynsila.policies.rules import Array, Spec, decide, first_passing, make_rule, trace

CANDIDATES = 400  # thresholds tried per fit: score quantiles on validation


def as_array(values: Any, dtype: Any = np.float64) -> Array:
    """A numpy array of a tensor (any device) or array-like."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy() if dtype == np.float64 else values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


class Policy(Protocol):
    name: str
    target: str  # what the targets are: "budget" (average MACs) or "epsilon" (a risk level)

    def fit(self, val_logits: Any, val_labels: Any, costs: Sequence[float], targets: Sequence[float]) -> list[Spec]:
        """One fitted spec per target, from validation alone."""
        ...


@dataclass
class Outcome:
    """A policy applied to a split: per target, the exits and predictions (``Q x N``)."""

    exits: Array
    predictions: Array

    def summary(self, labels: Any, costs: Sequence[float]) -> tuple[Array, Array, Array]:
        """Top-1 in % (Q), average cost (Q) and exit fractions (Q x K)."""
        k = len(costs)
        fractions = np.stack([np.bincount(e, minlength=k) for e in self.exits]) / max(self.exits.shape[1], 1)
        hits = self.predictions == as_array(labels, np.int64)[None]
        return hits.mean(axis=1) * 100, fractions @ np.asarray(costs, dtype=np.float64), fractions


def _score_key(spec: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in ("thresholds", "fit")}, sort_keys=True)


def apply(specs: Sequence[Mapping[str, Any]], logits: Any) -> Outcome:
    """Exits and predictions of every spec (``Q x N``); specs sharing everything but their thresholds are traced
    once. Quota specs go through the evaluator's torch criteria, as they always did."""
    if specs and specs[0].get("rule") == "quotas":
        return Outcome(*apply_quotas(specs, logits))
    x = as_array(logits)
    traces: dict[str, tuple[Array, Array]] = {}
    exits, predictions = [], []
    for spec in specs:
        key = _score_key(spec)
        if key not in traces:
            traces[key] = trace(make_rule(spec), x)
        scores, preds = traces[key]
        e = first_passing(scores, np.asarray([float(t) for t in spec["thresholds"]])[None])[0]
        exits.append(e)
        predictions.append(preds[np.arange(len(e)), e])
    return Outcome(np.stack(exits), np.stack(predictions))


def apply_one(spec: Mapping[str, Any], logits: Any) -> tuple[Array, Array]:
    """One spec: exits and predictions (``N``), sample by sample as the runners see them."""
    if spec.get("rule") == "quotas":
        out = apply([spec], logits)
        return out.exits[0], out.predictions[0]
    return decide(spec, as_array(logits))


def candidate_thresholds(scores: Array) -> Array:
    """Shared thresholds to try: quantiles of the validation scores of every exit but the last, and +inf."""
    pool = np.unique(scores[:, :-1])
    if len(pool) > CANDIDATES:
        pool = np.unique(np.quantile(pool, np.linspace(0, 1, CANDIDATES), method="nearest"))
    return np.concatenate([pool, [np.inf]])


def evaluate_candidates(
    scores: Array, predictions: Array, labels: Array, costs: Sequence[float], thresholds: Array
) -> tuple[Array, Array]:
    """Validation top-1 (fraction) and average cost of each row of ``thresholds`` (``M x K``)."""
    exits = first_passing(scores, thresholds)
    correct = predictions == labels[:, None]
    accuracy = correct[np.arange(len(labels))[None], exits].mean(axis=1)
    return accuracy, np.asarray(costs, dtype=np.float64)[exits].mean(axis=1)


def best_within(accuracy: Array, cost: Array, budgets: Sequence[float]) -> list[int]:
    """Per budget, the candidate with the highest validation accuracy whose average cost fits (ties: the
    cheaper); the cheapest candidate where none fits."""
    order = np.lexsort((cost, -accuracy))  # best accuracy first, then cheaper
    chosen = []
    for budget in budgets:
        fits = order[cost[order] <= budget]
        chosen.append(int(fits[0]) if len(fits) else int(np.argmin(cost)))
    return chosen


def shared_threshold_specs(
    base: Spec, scores: Array, predictions: Array, labels: Any, costs: Sequence[float], budgets: Sequence[float]
) -> list[Spec]:
    """One threshold shared by every exit per budget, chosen on validation (``best_within``)."""
    tried = candidate_thresholds(scores)
    grid = np.repeat(tried[:, None], scores.shape[1], axis=1)
    accuracy, cost = evaluate_candidates(scores, predictions, as_array(labels, np.int64), costs, grid)
    specs = []
    for budget, i in zip(budgets, best_within(accuracy, cost, budgets), strict=True):
        fit = {"budget": float(budget), "val_top1": 100 * float(accuracy[i]), "val_avg_macs": float(cost[i])}
        specs.append({**base, "thresholds": [float(tried[i])] * scores.shape[1], "fit": fit})
    return specs
