"""One confidence threshold shared by every exit, on temperature-scaled logits (one temperature per exit,
fitted on validation by NLL, Guo et al. 2017): once the exits' confidences mean the same thing, one number can
decide at all of them. Per budget the threshold with the best validation accuracy within it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynsila.budget.calibration import fit_temperatures
from dynsila.policies.base import Spec, as_array, shared_threshold_specs
from dynsila.policies.rules import make_rule, trace


def temperatures_on(val_logits: Any, val_labels: Any) -> list[float]:
    return fit_temperatures(torch.as_tensor(val_logits), torch.as_tensor(val_labels)).tolist()


@dataclass
class Calibrated:
    """calibrate: fit the temperatures (False: all 1, a plain shared max-probability threshold)."""

    calibrate: bool = True
    name = "calibrated"
    target = "budget"

    def fit(self, val_logits: Any, val_labels: Any, costs: Sequence[float], targets: Sequence[float]) -> list[Spec]:
        k = len(costs)
        temperatures = temperatures_on(val_logits, val_labels) if self.calibrate else [1.0] * k
        base: Spec = {"policy": self.name, "rule": "confidence", "temperatures": temperatures}
        scores, predictions = trace(make_rule({**base, "thresholds": [0.0] * k}), as_array(val_logits))
        return shared_threshold_specs(base, scores, predictions, val_labels, costs, targets)
