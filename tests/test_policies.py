"""Exit policies (dynsila.policies): each one's defining property, and the risk guarantee as a test that fails on a
loosened bound."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dynsila.budget.thresholds import budgeted_sweep
from dynsila.policies import risk
from dynsila.policies.base import apply, apply_one
from dynsila.policies.learned import LearnedAssigner
from dynsila.policies.quotas import Quotas
from dynsila.policies.rules import ProductRule, make_rule, trace
from dynsila.policies.sweep import all_curves, quota_budgets
from dynsila.policies.table import POLICIES, make_policy

COSTS = [1.0, 2.0, 3.0, 4.0]


def synthetic(n: int, seed: int, k: int = 4, c: int = 10, scale: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits N x K x C whose later exits see the label more clearly, and the labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, k, c, generator=g)
    z[torch.arange(n), :, y] += 0.8 * torch.arange(1, k + 1)
    return z * scale, y


VAL, TEST = synthetic(1500, 0), synthetic(1500, 1)


def test_every_policy_fits_applies_and_serialises():
    budgets = quota_budgets(*VAL, COSTS, [0.5, 1.0, 1.5])
    assert len(POLICIES) >= 6
    for name, cls in POLICIES.items():
        targets = [0.05, 0.1] if cls.target == "epsilon" else budgets
        specs = make_policy(name).fit(*VAL, COSTS, targets)
        assert len(specs) == len(targets)
        for spec in specs:
            again = json.loads(json.dumps(spec))  # JSON-safe, and what a manifest hands back runs the same
            exits, preds = apply_one(again, TEST[0])
            outcome = apply([spec], TEST[0])
            assert np.array_equal(exits, outcome.exits[0]) and np.array_equal(preds, outcome.predictions[0])


def test_quota_policy_reproduces_the_evaluators_sweep():
    rows = budgeted_sweep(*VAL, *TEST, COSTS, criterion="entropy", qs=[0.3, 1.0, 2.0])
    specs = Quotas("entropy").fit_q(VAL[0], [0.3, 1.0, 2.0])
    top1, cost, fractions = apply(specs, TEST[0]).summary(TEST[1], COSTS)
    assert [r.thresholds for r in rows] == [s["thresholds"] for s in specs]
    assert [r.test_top1 for r in rows] == pytest.approx(top1.tolist(), abs=1e-12)
    assert [r.avg_macs for r in rows] == pytest.approx(cost.tolist(), abs=1e-12)


def test_calibrated_threshold_is_shared_and_blind_to_an_exits_scale():
    budget = quota_budgets(*VAL, COSTS, [1.0])
    spec = make_policy("calibrated").fit(*VAL, COSTS, budget)[0]
    assert len(set(spec["thresholds"])) == 1
    overconfident = [x.clone() for x in (VAL[0], TEST[0])]
    for x in overconfident:
        x[:, 1] *= 4.0  # exit 2 four times as confident: its temperature absorbs it
    scaled = make_policy("calibrated").fit(overconfident[0], VAL[1], COSTS, budget)[0]
    assert scaled["temperatures"][1] == pytest.approx(4 * spec["temperatures"][1], rel=1e-3)
    same = apply_one(spec, TEST[0])[0] == apply_one(scaled, overconfident[1])[0]
    assert same.mean() > 0.99
    plain = make_policy("calibrated", calibrate=False).fit(overconfident[0], VAL[1], COSTS, budget)[0]
    assert (apply_one(plain, overconfident[1])[0] == 1).mean() > (apply_one(scaled, overconfident[1])[0] == 1).mean()


def logits_with_argmax(sequence: list[int], c: int = 4, value: float = 5.0) -> np.ndarray:
    z = np.zeros((1, len(sequence), c))
    z[0, np.arange(len(sequence)), sequence] = value
    return z


def test_patience_exits_once_the_argmax_held_for_that_many_exits():
    z = logits_with_argmax([0, 1, 1, 1, 2])

    def exit_at(patience: int, floor: float = 0.0, value: float = 5.0) -> int:
        spec = {"rule": "patience", "floor": floor, "thresholds": [patience] * 5}
        return int(apply_one(spec, z if value == 5.0 else logits_with_argmax([0, 1, 1, 1, 2], value=value))[0][0])

    assert [exit_at(p) for p in range(4)] == [0, 2, 3, 4]  # patience 0: exit 1; 1: the second 1 in a row; ...
    assert exit_at(1, floor=0.99) == 4  # exp(5) / (exp(5) + 3) = 0.98 < floor: never confident enough
    assert exit_at(1, floor=0.5) == 2
    assert int(apply_one({"rule": "patience", "floor": 0.0, "thresholds": [1] * 5}, z)[1][0]) == 1


def test_product_of_experts_never_brings_back_a_class_an_exit_ruled_out():
    rule = ProductRule({"thresholds": [0.0] * 4, "weights": [0.25, 0.5, 0.75, 1.0]})
    state = rule.start(len(TEST[1]))
    support_before = np.ones((len(TEST[1]), 10), dtype=bool)
    for k in range(4):
        step = rule.score(k, TEST[0][:, k].double().numpy(), state)
        support = np.isfinite(step.state["log_product"])
        assert not (support & ~support_before).any()  # the support only shrinks
        assert support[np.arange(len(support)), step.prediction].all()  # the prediction is a class still possible
        support_before, state = support, step.state
    assert support_before.sum(axis=1).mean() < 5  # and it does shrink on these logits
    scores, _ = trace(make_rule({"rule": "product", "weights": [1.0] * 4, "thresholds": [0.0] * 4}), np.ones((1, 4, 3)))
    assert scores[0].tolist() == pytest.approx([1 / 3] * 4)  # equal logits: a uniform product


def test_learned_assigner_learns_what_confidence_gets_wrong():
    """Exit 1 is confidently wrong on a third of the samples (and exit 2 disagrees with it there): the learned
    models see it on the validation split alone and beat a plain confidence threshold on test at the same budget."""

    def tricky(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, y = synthetic(2000, seed)
        g = torch.Generator().manual_seed(seed + 10)
        fooled = torch.rand(len(y), generator=g) < 0.35
        wrong = (y + 1) % 10
        z[fooled, 0] = 0.0
        z[fooled, 0, wrong[fooled]] = 12.0  # very confident and wrong at exit 1; exit 2 disagrees
        return z, y

    val, test = tricky(3), tricky(4)
    budget = quota_budgets(*val, COSTS, [1.0])
    learned = LearnedAssigner().fit(*val, COSTS, budget)[0]
    plain = make_policy("calibrated", calibrate=False).fit(*val, COSTS, budget)[0]
    assert learned["l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    accuracy = {}
    for name, spec in (("learned", learned), ("plain", plain)):
        top1, cost, _ = apply([spec], test[0]).summary(test[1], COSTS)
        assert cost[0] <= budget[0] * 1.05
        accuracy[name] = top1[0]
    assert accuracy["learned"] > accuracy["plain"] + 5


def test_bad_policy_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown exit policy 'nope'; choose one of quotas"):
        make_policy("nope")
    with pytest.raises(ValueError, match="policy product takes no parameters, not --floor"):
        make_policy("product", floor=0.5)
    with pytest.raises(ValueError, match="epsilon must lie in"):
        make_policy("risk").fit(*VAL, COSTS, [1.5])
    with pytest.raises(ValueError, match="exit rule 'x' is not one of"):
        make_rule({"rule": "x", "thresholds": [0.0]})


def test_sweep_gives_every_policy_a_curve_on_the_same_budgets():
    curves = all_curves(VAL, TEST, COSTS, qs=[0.5, 1.0, 1.5], epsilons=[0.05])
    assert set(curves) == set(POLICIES)
    budgets = [p.target for p in curves["calibrated"]]
    assert budgets == [p.val_avg_macs for p in curves["quotas"]]
    for name in ("calibrated", "product", "learned", "patience"):
        assert all(p.val_avg_macs <= p.target + 1e-9 for p in curves[name])


# --- the risk guarantee ----------------------------------------------------------------------------------------

SPLITS, CALIBRATION, EPSILON, DELTA = 300, 500, 0.10, 0.10


def exceedances(losses: np.ndarray, choose) -> tuple[int, float]:
    """Over SPLITS random calibration/test splits of a fixed pool: how often the test risk of the threshold chosen
    on the calibration part exceeds EPSILON, and the mean test risk."""
    rng = np.random.default_rng(0)
    over, total = 0, 0.0
    for _ in range(SPLITS):
        order = rng.permutation(losses.shape[1])
        calibration, test = order[:CALIBRATION], order[CALIBRATION:]
        i = choose(losses[:, calibration])
        test_risk = losses[i, test].mean()
        over += test_risk > EPSILON
        total += test_risk
    return over, total / SPLITS


def allowed(share: float) -> float:
    """A share's count over SPLITS plus three binomial standard deviations."""
    return SPLITS * share + 3 * math.sqrt(SPLITS * share * (1 - share))


@pytest.fixture(scope="module")
def pool_losses() -> np.ndarray:
    logits, labels = synthetic(4000, 7, scale=1.0)
    scores, predictions = trace(make_rule({"rule": "confidence", "thresholds": [0.0] * 4}), logits.double().numpy())
    return risk.sample_losses(scores, predictions, labels.numpy(), "disagreement")


def test_learn_then_test_bounds_the_risk_with_probability_one_minus_delta(pool_losses):
    over, _ = exceedances(pool_losses, lambda cal: risk.ltt_threshold(cal, EPSILON, DELTA))
    assert over <= allowed(DELTA)


def test_a_loosened_bound_fails_the_same_check(pool_losses):
    def empirical_only(r: float, n: int, epsilon: float) -> float:  # no concentration term
        return 0.0 if r <= epsilon else 1.0

    over, _ = exceedances(pool_losses, lambda cal: risk.ltt_threshold(cal, EPSILON, DELTA, empirical_only))
    assert over > allowed(DELTA)


def test_conformal_risk_control_bounds_the_expected_risk(pool_losses):
    _, mean = exceedances(pool_losses, lambda cal: risk.crc_threshold(cal, EPSILON))
    assert mean <= EPSILON
    loosened = lambda cal: int(np.argmax(np.maximum.accumulate(cal[::-1], 0)[::-1].mean(1) <= EPSILON + 0.03))  # noqa: E731
    assert exceedances(pool_losses, loosened)[1] > EPSILON


def test_risk_policy_spends_less_for_a_larger_epsilon():
    specs = make_policy("risk", bound="crc").fit(*VAL, COSTS, [0.01, 0.05, 0.2])
    _, cost, _ = apply(specs, TEST[0]).summary(TEST[1], COSTS)
    assert cost[0] >= cost[1] >= cost[2] and cost[0] > cost[2]
    assert all(s["fit"]["calibration_risk"] <= s["fit"]["epsilon"] for s in specs)
