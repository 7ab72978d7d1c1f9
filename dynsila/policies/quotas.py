"""MSDNet's policy: one confidence threshold per exit, fitted on validation so that exit k takes a given share
of the samples (share_k ~ q^k); for a budget, the largest validation cost within it over a fine grid of q. The
maths is ``dynsila.budget.thresholds``, unchanged: this module only wraps it as a policy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dynsila.budget.thresholds import (
    CONFIDENCE,
    confidence_of,
    exit_indices,
    fit_thresholds,
    geometric_fractions,
    thresholds_for_budget,
)
from dynsila.policies.rules import Spec


def quota_spec(thresholds: Sequence[float], criterion: str, fit: dict[str, Any] | None = None) -> Spec:
    spec: Spec = {"policy": "quotas", "rule": "quotas", "criterion": criterion, "thresholds": list(thresholds)}
    return spec if fit is None else {**spec, "fit": fit}


@dataclass
class Quotas:
    """criterion: max_prob, entropy or margin."""

    criterion: str = "max_prob"
    name = "quotas"
    target = "budget"

    def __post_init__(self) -> None:
        confidence_of(self.criterion)  # one line for an unknown criterion

    def fit(self, val_logits: Any, val_labels: Any, costs: Sequence[float], targets: Sequence[float]) -> list[Spec]:
        logits = torch.as_tensor(val_logits)
        specs = []
        for budget in targets:
            thresholds, spent = thresholds_for_budget(logits, list(costs), float(budget), self.criterion)
            specs.append(
                quota_spec(thresholds.tolist(), self.criterion, {"budget": float(budget), "val_avg_macs": spent})
            )
        return specs

    def fit_q(self, val_logits: Any, qs: Sequence[float]) -> list[Spec]:
        """One spec per exit distribution share_k ~ q^k (the evaluator's sweep)."""
        logits = torch.as_tensor(val_logits)
        fitted = fit_thresholds(CONFIDENCE[self.criterion](logits), geometric_fractions(qs, logits.shape[1]))
        return [quota_spec(t.tolist(), self.criterion, {"q": float(q)}) for q, t in zip(qs, fitted, strict=True)]


def apply_quotas(specs: Sequence[Mapping[str, Any]], logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Exits and predictions (``Q x N``) with the evaluator's torch criteria."""
    x = torch.as_tensor(logits)
    criteria = {spec["criterion"] for spec in specs}
    if len(criteria) != 1:
        raise ValueError("quota specs of one apply must share their criterion")
    thresholds = torch.tensor([[float(t) for t in spec["thresholds"]] for spec in specs], dtype=torch.float64)
    exits = exit_indices(CONFIDENCE[criteria.pop()](x), thresholds)
    predictions = x.argmax(dim=-1)[torch.arange(x.shape[0])[None], exits]
    return exits.numpy().astype(np.int64), predictions.numpy()
