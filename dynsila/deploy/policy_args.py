"""The exit-policy options of ``python -m dynsila.infer`` and ``export``: ``--policy NAME`` with its parameters, and
the one fit both commands make on a run's validation logits."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from dynsila.cli import positive
from dynsila.errors import DynsilaError
from dynsila.policies.rules import Spec
from dynsila.policies.sweep import quota_budgets
from dynsila.policies.table import DEFAULT, POLICIES, make_policy

PARAMETERS = ("patience", "floor", "risk", "bound", "delta", "held_out")


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """``--policy`` and every policy's parameters (each policy refuses the ones it does not take)."""
    group = parser.add_argument_group("exit policy (docs/early_exit.md)")
    group.add_argument("--policy", choices=list(POLICIES), default=DEFAULT, help="how samples decide to exit")
    group.add_argument("--patience", type=int, help="patience: exits in a row with the same argmax")
    group.add_argument("--floor", type=float, help="patience: the least calibrated max probability to exit")
    group.add_argument("--risk", choices=("disagreement", "accuracy_gap"), help="risk: what the bound controls")
    group.add_argument("--bound", choices=("crc", "ltt"), help="risk: in expectation (crc) or w.p. 1 - delta (ltt)")
    group.add_argument("--delta", type=float, help="risk, ltt: the bound may fail with this probability")
    group.add_argument("--held-out", type=float, help="learned: share of validation that chooses its L2 strength")


def add_epsilon_target(target: Any) -> None:
    target.add_argument("--epsilon", type=positive, help="risk policy: the risk to stay within (e.g. 0.05)")


def fit_policy(args: argparse.Namespace, val_logits: torch.Tensor, val_labels: torch.Tensor, costs: list[int]) -> Spec:
    """The spec of ``args.policy`` fitted on validation for ``--budget``, ``--q`` (the quota policy's validation
    cost at that q) or ``--epsilon``; one line for a target the policy cannot take."""
    params = {name: getattr(args, name, None) for name in PARAMETERS}
    try:
        policy = make_policy(args.policy, **params)
    except ValueError as e:
        raise DynsilaError(str(e)) from None
    epsilon = getattr(args, "epsilon", None)
    if policy.target == "epsilon":
        if epsilon is None:
            raise DynsilaError(f"policy {args.policy} is fitted for a risk level: pass --epsilon E (e.g. 0.05)")
        targets = [epsilon]
    elif epsilon is not None:
        raise DynsilaError(f"policy {args.policy} is fitted for a budget: pass --q or --budget, not --epsilon")
    else:
        targets = [args.budget] if args.budget is not None else quota_budgets(val_logits, val_labels, costs, [args.q])
    try:
        return policy.fit(val_logits, val_labels, costs, targets)[0]
    except ValueError as e:
        raise DynsilaError(f"policy {args.policy}: {e}") from None


def describe(spec: Spec) -> str:
    """One line: the policy, its parameters and how it was fitted."""
    shown = {k: v for k, v in spec.items() if k in ("patience", "floor", "risk", "bound", "l2", "criterion")}
    fit = spec.get("fit", {})
    parts = [f"{k} {v}" for k, v in shown.items()] + [f"{k} {v:.4g}" for k, v in fit.items() if isinstance(v, float)]
    return f"policy {spec['policy']}: " + ", ".join(parts)
