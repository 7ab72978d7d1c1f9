"""Product of experts for anytime classification (Jazbec et al., NeurIPS 2023): the prediction at exit k is the
normalised product of exits 1..k's ReLU'd logits, exit j's raised to the weight j/K. A class one exit gives no
mass stays at zero, so the set of classes still possible only shrinks from exit to exit (conditional
monotonicity: a later exit cannot bring back a class the earlier ones ruled out). Exit when the product's
largest probability reaches one threshold shared by every exit, chosen per budget on validation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dynsila.policies.base import Spec, as_array, shared_threshold_specs
from dynsila.policies.rules import make_rule, trace


def linear_weights(num_exits: int) -> list[float]:
    return [(k + 1) / num_exits for k in range(num_exits)]


@dataclass
class ProductOfExperts:
    name = "product"
    target = "budget"

    def fit(self, val_logits: Any, val_labels: Any, costs: Sequence[float], targets: Sequence[float]) -> list[Spec]:
        k = len(costs)
        base: Spec = {"policy": self.name, "rule": "product", "weights": linear_weights(k)}
        scores, predictions = trace(make_rule({**base, "thresholds": [0.0] * k}), as_array(val_logits))
        return shared_threshold_specs(base, scores, predictions, val_labels, costs, targets)
