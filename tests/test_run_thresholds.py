"""thresholds_for_target: the one rule by which python -m dynsila.infer and the ONNX export fit a run's thresholds."""

import pytest
import torch

from dynsila.budget.thresholds import (
    CONFIDENCE,
    fit_thresholds,
    geometric_fractions,
    thresholds_for_budget,
    thresholds_for_target,
)


def _logits() -> torch.Tensor:
    return torch.randn(200, 3, 5, generator=torch.Generator().manual_seed(0))  # N x K x C


@pytest.mark.parametrize("criterion", ["max_prob", "entropy"])
def test_a_q_target_is_the_geometric_exit_distribution(criterion):
    logits = _logits()
    thresholds, expected = thresholds_for_target(logits, [1.0, 2.0, 3.0], criterion, q=0.5, budget=None)
    assert expected is None
    want = fit_thresholds(CONFIDENCE[criterion](logits), geometric_fractions([0.5], 3))[0]
    assert torch.equal(thresholds, want)


def test_a_budget_target_is_the_largest_cost_within_it():
    logits, costs = _logits(), [1.0, 2.0, 3.0]
    thresholds, expected = thresholds_for_target(logits, costs, "max_prob", q=None, budget=2.0)
    want, want_expected = thresholds_for_budget(logits, costs, 2.0, "max_prob")
    assert torch.equal(thresholds, want) and expected == want_expected and expected is not None and expected <= 2.0


@pytest.mark.parametrize(("q", "budget"), [(None, None), (0.5, 2.0)])
def test_exactly_one_target(q, budget):
    with pytest.raises(ValueError, match="exactly one"):
        thresholds_for_target(_logits(), [1.0, 2.0, 3.0], "max_prob", q=q, budget=budget)
