"""Per-exit temperature scaling: the fit recovers a known temperature, reads validation only, keeps every argmax,
lowers the calibration error of over-confident exits, refuses bad input in one line; the evaluator's calibrated
curves and their JSON form."""

import json
import math

import pytest
import torch

from dynsila.budget.calibration import (
    T_MAX,
    T_MIN,
    apply_temperatures,
    calibrate_exits,
    expected_calibration_error,
    fit_temperatures,
)
from dynsila.budget.thresholds import budgeted_sweep
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import calibrated_curves
from dynsila.evaluation.report import AnytimeExit, EvalReport

TRUE_T = (0.5, 1.0, 3.0)  # per exit


def tempered_split(n: int, seed: int, temperatures=TRUE_T, classes: int = 10):
    """Logits ``n x K x C`` and labels drawn from softmax(z_k / T_k): exit k is calibrated at exactly T_k.
    One set of class probabilities per sample is shared by the exits, so one label fits them all."""
    g = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(n, classes, generator=g, dtype=torch.float64) * 2.5, dim=-1)
    labels = torch.multinomial(log_p.exp(), 1, generator=g).squeeze(1)
    t = torch.tensor(temperatures, dtype=torch.float64)
    return log_p[:, None, :] * t[None, :, None], labels  # z_k / T_k = log p


def test_the_fit_recovers_a_known_temperature():
    logits, labels = tempered_split(6000, seed=0)
    fitted = fit_temperatures(logits, labels)
    assert fitted.shape == (3,)
    assert fitted.tolist() == pytest.approx(TRUE_T, rel=0.08)
    assert torch.equal(fit_temperatures(logits, labels), fitted)  # deterministic


def test_the_fit_minimises_the_validation_nll():
    logits, labels = tempered_split(500, seed=1)
    fitted = fit_temperatures(logits, labels)

    def nll(t: torch.Tensor) -> torch.Tensor:
        scaled = apply_temperatures(logits, t)
        return torch.stack([torch.nn.functional.cross_entropy(scaled[:, k], labels) for k in range(3)])

    best = nll(fitted)
    for factor in (0.97, 1.03):
        assert (nll(fitted * factor) > best).all()


def test_separable_logits_take_the_bracket_end():
    labels = torch.arange(8) % 4
    logits = torch.nn.functional.one_hot(labels, 4).double()[:, None, :] * 5  # every sample right, confidently
    assert fit_temperatures(logits, labels).item() == pytest.approx(T_MIN)
    assert fit_temperatures(torch.zeros(8, 1, 4), labels).item() in (pytest.approx(T_MIN), pytest.approx(T_MAX))


def test_temperatures_come_from_validation_only():
    val, test = tempered_split(800, seed=2), tempered_split(600, seed=3)
    before = calibrate_exits(*val, *test)
    g = torch.Generator().manual_seed(4)
    perturbed = (test[0] * 7 + torch.randn(test[0].shape, generator=g, dtype=torch.float64), test[1].flip(0))
    after = calibrate_exits(*val, *perturbed)
    assert after.temperatures == before.temperatures  # bit for bit
    assert after.test_ece_before != before.test_ece_before  # the perturbed test split was read, for the ECE only
    moved = calibrate_exits(val[0] * 2, val[1], *test)
    assert moved.temperatures == pytest.approx([2 * t for t in before.temperatures])  # and val does move them


def test_scaling_keeps_every_exits_argmax():
    logits = torch.randn(300, 4, 7, generator=torch.Generator().manual_seed(5)).float()
    scaled = apply_temperatures(logits, torch.tensor([0.03, 0.7, 4.0, 90.0]))
    assert torch.equal(scaled.argmax(dim=-1), logits.argmax(dim=-1))


def test_ece_falls_on_over_confident_exits():
    # exits 1 and 3 are over-confident (their logits are 3x and 4x too sharp); exit 2 is calibrated
    logits, labels = tempered_split(4000, seed=6, temperatures=(3.0, 1.0, 4.0))
    sharp = logits * torch.tensor([3.0, 1.0, 4.0], dtype=torch.float64)[None, :, None]
    fit = calibrate_exits(sharp[:2000], labels[:2000], sharp[2000:], labels[2000:])
    assert fit.test_ece_before[0] > 5 and fit.test_ece_before[2] > 5
    for k in (0, 2):
        assert fit.test_ece_after[k] < fit.test_ece_before[k] / 3
    assert fit.test_ece_after[1] < 3  # calibrated stays calibrated


def test_ece_by_hand():
    # two samples at confidence ~0.9 (one right), two at ~0.6 (both right): bins apart, gaps 0.4 and 0.4
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    ece = expected_calibration_error(p.log()[:, None, :], labels)
    assert ece.item() == pytest.approx(100 * (0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)))


@pytest.mark.parametrize(
    ("val_logits", "val_labels", "message"),
    [
        (torch.full((4, 2, 3), math.nan), torch.zeros(4, dtype=torch.long), "validation logits of exit 1 are not"),
        (torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.long), "the validation split is empty"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), "validation logits must be N x K x C"),
        (torch.zeros(4, 3, 3), torch.zeros(4, dtype=torch.long), "validation has 3 exits x 3 classes, test 2 x 3"),
    ],
)
def test_bad_input_is_one_clear_line(val_logits, val_labels, message):
    test = (torch.zeros(4, 2, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=message) as error:
        calibrate_exits(val_logits, val_labels, *test)
    assert "\n" not in str(error.value)
    with pytest.raises(DynsilaError, match="temperature scaling: " + message):  # the evaluator's user error
        calibrated_curves((val_logits, val_labels), test, [1.0, 2.0], ["max_prob"])


def test_inf_in_the_test_split_is_named():
    val = (torch.zeros(4, 2, 3), torch.zeros(4, dtype=torch.long))
    bad = torch.zeros(4, 2, 3)
    bad[1, 1, 0] = math.inf
    with pytest.raises(ValueError, match="test logits of exit 2 are not finite"):
        calibrate_exits(*val, bad, val[1])


def test_calibrated_curves_change_exits_not_accuracy_per_exit_and_round_trip():
    # exit 1 over-confident and exit 2 under-confident: scaling moves samples between them
    logits, labels = tempered_split(1200, seed=7, temperatures=(1.0, 1.0))
    logits = logits * torch.tensor([3.0, 0.3], dtype=torch.float64)[None, :, None]
    val, test = (logits[:600], labels[:600]), (logits[600:], labels[600:])
    costs = [10.0, 30.0]
    scaled = calibrated_curves(val, test, costs, ["max_prob"])
    assert scaled.fit.temperatures == pytest.approx([3.0, 0.3], rel=0.15)
    plain = budgeted_sweep(*val, *test, costs)
    moved = [a.exit_fractions != b.exit_fractions for a, b in zip(plain, scaled.curves[0].points, strict=True)]
    assert any(moved)
    exits = [AnytimeExit(k + 1, 1, 1, 1, 1, 1, 1, 50.0, 50.0, None) for k in range(2)]
    report = EvalReport("r", "runs/r", "msdnet", "toy", False, 0, "MACs", {"val": 600, "test": 600}, exits, [])
    report.calibration = scaled
    data = json.loads(report.to_json())
    assert data["calibration"]["temperatures"] == scaled.fit.temperatures
    assert data["calibration"]["curves"][0]["criterion"] == "max_prob"
    assert EvalReport.from_dict(data) == report
    assert report.budgeted("max_prob", calibrated=True) is scaled.curves[0] and report.budgeted("max_prob") is None
    del data["calibration"]  # a file written before calibration existed
    assert EvalReport.from_dict(data).calibration is None
