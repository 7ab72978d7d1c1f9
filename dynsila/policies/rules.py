"""Fitted exit policies executed exit by exit on numpy arrays: what both runners and the evaluator call.

A fitted policy is a JSON-safe *spec* (a dict: ``rule``, ``thresholds``, the rule's parameters); ``make_rule(spec)``
turns it into a rule. At exit ``k`` a rule reads the logits of the samples still running (``N x C``) and the
per-sample state it carried from the earlier exits (a dict of arrays with one row per sample), and returns each
sample's score, prediction and new state; a sample leaves when its score reaches ``thresholds[k]`` (``>=``), and
everyone leaves at the last exit. Scores never depend on earlier decisions, and every operation is row-wise, so
running a rule on all samples at once (``trace``, the evaluator) and on the shrinking batches of a runner gives
the same decisions. Computed in float64. Imports numpy alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray
State = dict[str, Array]
Spec = dict[str, Any]  # a fitted policy, JSON-safe


def log_softmax(z: Array) -> Array:
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class Step:
    score: Array  # N float64, compared with the exit's threshold
    prediction: Array  # N int64
    state: State


class Rule:
    """Base: thresholds (one per exit, the last ignored) and the decision; subclasses score."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.thresholds = np.asarray([float(t) for t in spec["thresholds"]], dtype=np.float64)
        self.num_exits = len(self.thresholds)

    def start(self, n: int) -> State:
        return {}

    def score(self, k: int, logits: Array, state: State) -> Step:
        raise NotImplementedError

    def leave(self, k: int, score: Array) -> Array:
        if k == self.num_exits - 1:
            return np.ones(score.shape[0], dtype=bool)
        return score >= self.thresholds[k]


class ConfidenceRule(Rule):
    """Max softmax probability of the exit's logits divided by the exit's temperature."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.temperatures = np.asarray(spec.get("temperatures", [1.0] * self.num_exits), dtype=np.float64)

    def score(self, k: int, logits: Array, state: State) -> Step:
        log_p = log_softmax(np.asarray(logits, dtype=np.float64) / self.temperatures[k])
        return Step(np.exp(log_p.max(axis=-1)), log_p.argmax(axis=-1), state)


class PatienceRule(ConfidenceRule):
    """PABEE: the score is how many exits before this one in a row predicted its argmax (-1, never enough, where
    the exit's calibrated confidence is below ``floor``); the thresholds are the patience."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.floor = float(spec.get("floor", 0.0))

    def start(self, n: int) -> State:
        return {"previous": np.full(n, -1, dtype=np.int64), "streak": np.zeros(n, dtype=np.int64)}

    def score(self, k: int, logits: Array, state: State) -> Step:
        confident = super().score(k, logits, state)
        same = confident.prediction == state["previous"]
        streak = np.where(same, state["streak"] + 1, 0)
        score = np.where(confident.score >= self.floor, streak, -1).astype(np.float64)
        return Step(score, confident.prediction, {"previous": confident.prediction, "streak": streak})


class ProductRule(Rule):
    """Product of experts (anytime): the normalised product of the exits so far, each exit's ReLU'd logits raised
    to its weight; a class one exit gives no mass keeps none. An exit with no positive logit is skipped, so the
    support never grows. Score: the product's largest probability."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.weights = np.asarray(spec["weights"], dtype=np.float64)

    def start(self, n: int) -> State:
        return {"log_product": np.zeros((n, 0))}  # widened to N x C at the first exit

    def score(self, k: int, logits: Array, state: State) -> Step:
        z = np.asarray(logits, dtype=np.float64)
        previous = state["log_product"] if state["log_product"].shape[1] else np.zeros_like(z)
        with np.errstate(divide="ignore"):
            combined = previous + self.weights[k] * np.log(np.maximum(z, 0.0))
        empty = ~np.isfinite(combined).any(axis=-1, keepdims=True)
        combined = np.where(empty, previous, combined)
        finite_max = combined.max(axis=-1, keepdims=True)
        p = np.exp(combined - finite_max)
        p /= p.sum(axis=-1, keepdims=True)
        return Step(p.max(axis=-1), p.argmax(axis=-1), {"log_product": combined})


def exit_features(k: int, logits: Array, state: State) -> tuple[Array, State]:
    """The learned assigner's features at exit ``k`` (``N x F``): max probability, margin, normalised negative
    entropy, agreement with the previous exit's argmax, the previous exit's max probability, a constant."""
    log_p = log_softmax(logits)
    p = np.exp(log_p)
    top2 = np.sort(p, axis=-1)[:, -2:] if p.shape[1] > 1 else np.concatenate([np.zeros_like(p), p], axis=1)
    entropy = (p * log_p).sum(axis=-1) / max(math.log(p.shape[1]), 1e-12)
    prediction = log_p.argmax(axis=-1)
    agree = (prediction == state["previous"]).astype(np.float64)
    features = np.stack([top2[:, 1], top2[:, 1] - top2[:, 0], entropy, agree, state["previous_conf"],
                         np.ones(len(p))], axis=1)  # fmt: skip
    return features, {"previous": prediction, "previous_conf": top2[:, 1]}


class LearnedRule(Rule):
    """EENet-style assigner: per exit a logistic model on ``exit_features`` estimates the chance the exit is right;
    the score is that estimate."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        super().__init__(spec)
        self.coefficients = np.asarray(spec["coefficients"], dtype=np.float64)  # K x F

    def start(self, n: int) -> State:
        return {"previous": np.full(n, -1, dtype=np.int64), "previous_conf": np.zeros(n)}

    def score(self, k: int, logits: Array, state: State) -> Step:
        features, new_state = exit_features(k, logits, state)
        score = 1.0 / (1.0 + np.exp(-(features @ self.coefficients[k])))
        return Step(score, new_state["previous"], new_state)


RULES: dict[str, type[Rule]] = {
    "confidence": ConfidenceRule,
    "patience": PatienceRule,
    "product": ProductRule,
    "learned": LearnedRule,
}


class PolicyError(ValueError):
    """A spec no rule can run."""


def make_rule(spec: Mapping[str, Any]) -> Rule:
    """The rule a fitted spec describes; one line naming the choices for an unknown one."""
    name = spec.get("rule") if isinstance(spec, Mapping) else None
    if name not in RULES:
        raise PolicyError(f"exit rule {name!r} is not one of {sorted(RULES)}; fit the policy again")
    try:
        return RULES[name](spec)
    except (KeyError, TypeError, ValueError) as e:
        raise PolicyError(
            f"exit rule {name!r}: its spec is incomplete ({type(e).__name__}: {e}); fit it again"
        ) from None


def select(state: State, index: Array) -> State:
    """The rows ``index`` of every state array (batch compaction)."""
    return {name: a[index] for name, a in state.items()}


def concatenate(states: list[State]) -> State:
    if len(states) == 1:
        return states[0]
    return {name: np.concatenate([s[name] for s in states]) for name in states[0]}


def trace(rule: Rule, logits: Array) -> tuple[Array, Array]:
    """Every exit's score and prediction (``N x K`` each) for logits ``N x K x C``, no sample leaving."""
    logits = np.asarray(logits)
    state = rule.start(logits.shape[0])
    scores, predictions = [], []
    for k in range(logits.shape[1]):
        step = rule.score(k, logits[:, k], state)
        scores.append(step.score)
        predictions.append(step.prediction)
        state = step.state
    return np.stack(scores, axis=1), np.stack(predictions, axis=1)


def first_passing(scores: Array, thresholds: Array) -> Array:
    """``Q x N`` first exit whose threshold (``Q x K``) each sample's score (``N x K``) reaches; last exit always."""
    passes = scores[None] >= np.asarray(thresholds, dtype=np.float64)[:, None, :]
    passes[..., -1] = True
    return passes.argmax(axis=-1)


def decide(spec: Mapping[str, Any], logits: Array) -> tuple[Array, Array]:
    """Each sample's exit index and prediction (``N`` each) under a fitted spec, all samples at once."""
    rule = make_rule(spec)
    scores, predictions = trace(rule, logits)
    exits = first_passing(scores, rule.thresholds[None])[0]
    return exits, predictions[np.arange(len(exits)), exits]
