"""Every policy's budgeted curve from stored per-exit logits: fitted on validation, applied to test.

Budget policies are fitted for the average validation costs the quota policy reaches at MSDNet's 39 exit
distributions (so every curve is asked for the same budgets); the risk policy for a grid of risk levels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dynsila.budget.thresholds import DEFAULT_QS
from dynsila.policies.base import Spec, apply
from dynsila.policies.quotas import Quotas
from dynsila.policies.table import POLICIES, make_policy

EPSILONS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


@dataclass
class PolicyPoint:
    target: float  # the budget (MACs) or the risk level asked for
    val_top1: float
    val_avg_macs: float
    test_top1: float
    avg_macs: float
    exit_fractions: list[float]  # on test
    spec: Spec


def quota_budgets(val_logits: Any, val_labels: Any, costs: Sequence[float], qs: Sequence[float]) -> list[float]:
    """The average validation cost of the quota policy at each q."""
    specs = Quotas().fit_q(val_logits, qs)
    _, cost, _ = apply(specs, val_logits).summary(val_labels, costs)
    return cost.tolist()


def policy_curve(
    name: str,
    val: tuple[Any, Any],
    test: tuple[Any, Any],
    costs: Sequence[float],
    targets: Sequence[float],
    **params: Any,
) -> list[PolicyPoint]:
    """One policy fitted on ``val`` (logits, labels) for each target and applied to ``test``."""
    return _points(make_policy(name, **params).fit(*val, costs, targets), val, test, costs, targets)


def _points(
    specs: list[Spec], val: tuple[Any, Any], test: tuple[Any, Any], costs: Sequence[float], targets: Sequence[float]
) -> list[PolicyPoint]:
    val_top1, val_cost, _ = apply(specs, val[0]).summary(val[1], costs)
    test_top1, test_cost, fractions = apply(specs, test[0]).summary(test[1], costs)
    return [
        PolicyPoint(
            float(t),
            float(val_top1[i]),
            float(val_cost[i]),
            float(test_top1[i]),
            float(test_cost[i]),
            fractions[i].tolist(),
            specs[i],
        )  # fmt: skip
        for i, t in enumerate(targets)
    ]


def all_curves(
    val: tuple[Any, Any],
    test: tuple[Any, Any],
    costs: Sequence[float],
    names: Sequence[str] = tuple(POLICIES),
    qs: Sequence[float] = DEFAULT_QS,
    epsilons: Sequence[float] = EPSILONS,
) -> dict[str, list[PolicyPoint]]:
    """Every named policy's curve (default parameters) on the same budgets."""
    budgets = quota_budgets(*val, costs, qs)
    curves = {}
    for name in names:
        if name == "quotas":  # the evaluator's own curve: thresholds fitted for each q
            specs = Quotas().fit_q(val[0], qs)
            curves[name] = _points(specs, val, test, costs, budgets)
            continue
        targets = epsilons if POLICIES[name].target == "epsilon" else budgets
        curves[name] = policy_curve(name, val, test, costs, targets)
    return curves
