"""The exit policies by name: the one table the evaluator, ``python -m dynsila.infer`` / ``export`` and the
benchmarks read. ``make_policy(name, **params)`` builds one with its parameters, refusing an unknown name or a
parameter the policy does not take in one line."""

from __future__ import annotations

import dataclasses
from typing import Any

from dynsila.policies.base import Policy
from dynsila.policies.calibrated import Calibrated
from dynsila.policies.learned import LearnedAssigner
from dynsila.policies.patience import Patience
from dynsila.policies.product import ProductOfExperts
from dynsila.policies.quotas import Quotas
from dynsila.policies.risk import RiskControl

POLICIES: dict[str, type[Any]] = {
    "quotas": Quotas,  # MSDNet: per-exit thresholds for a geometric exit distribution (the default)
    "calibrated": Calibrated,  # one threshold on temperature-scaled max probability
    "patience": Patience,  # PABEE: the argmax stable for some exits, with a confidence floor
    "product": ProductOfExperts,  # anytime product of the exits so far, thresholded
    "learned": LearnedAssigner,  # EENet-style correctness models on the exits' predictions
    "risk": RiskControl,  # one threshold with risk <= epsilon (conformal risk control or Learn then Test)
}
DEFAULT = "quotas"


def parameters(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(POLICIES[name])]


def make_policy(name: str, **params: Any) -> Policy:
    """The policy ``name`` with the given parameters (None values ignored)."""
    if name not in POLICIES:
        raise ValueError(f"unknown exit policy {name!r}; choose one of {', '.join(POLICIES)}")
    given = {k: v for k, v in params.items() if v is not None}
    allowed = parameters(name)
    extra = sorted(set(given) - set(allowed))
    if extra:
        takes = ", ".join(f"--{p.replace('_', '-')}" for p in allowed) or "no parameters"
        raise ValueError(f"policy {name} takes {takes}, not --{extra[0].replace('_', '-')}")
    policy: Policy = POLICIES[name](**given)
    return policy
