"""Patience-based early exit (PABEE, Zhou et al., NeurIPS 2020): leave once the argmax stayed the same for
``patience`` consecutive exits after the first that predicted it (patience 0: exit 1), here with a confidence
floor: the exit's temperature-scaled max probability must also reach ``floor``. A fixed patience and floor is
a fixed rule; for a budget, the (patience, floor) pair with the best validation accuracy within it is chosen
from a grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynsila.policies.base import Spec, as_array, best_within, evaluate_candidates
from dynsila.policies.calibrated import temperatures_on
from dynsila.policies.rules import make_rule, trace

FLOORS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class Patience:
    """patience, floor: fixed values (None: chosen per budget on validation); calibrate: temperatures first."""

    patience: int | None = None
    floor: float | None = None
    calibrate: bool = True
    name = "patience"
    target = "budget"

    def fit(self, val_logits: Any, val_labels: Any, costs: Sequence[float], targets: Sequence[float]) -> list[Spec]:
        k = len(costs)
        x, labels = as_array(val_logits), as_array(val_labels, np.int64)
        temperatures = temperatures_on(val_logits, val_labels) if self.calibrate else [1.0] * k
        patiences = range(k) if self.patience is None else [self.patience]
        floors = FLOORS if self.floor is None else (self.floor,)
        grid: list[tuple[Spec, float, float]] = []
        for floor in floors:
            base = {"policy": self.name, "rule": "patience", "temperatures": temperatures, "floor": float(floor)}
            scores, predictions = trace(make_rule({**base, "thresholds": [0.0] * k}), x)
            tried = np.asarray([[float(p)] * k for p in patiences])
            accuracy, cost = evaluate_candidates(scores, predictions, labels, costs, tried)
            for p, a, c in zip(patiences, accuracy, cost, strict=True):
                grid.append(({**base, "patience": int(p), "thresholds": [float(p)] * k}, 100 * float(a), float(c)))
        chosen = best_within(np.asarray([g[1] for g in grid]), np.asarray([g[2] for g in grid]), targets)
        return [
            {**grid[i][0], "fit": {"budget": float(b), "val_top1": grid[i][1], "val_avg_macs": grid[i][2]}}
            for b, i in zip(targets, chosen, strict=True)
        ]
