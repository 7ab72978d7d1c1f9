import json
import math

import numpy as np
import pytest
import torch

from dynsila.budget.thresholds import (
    CONFIDENCE,
    budgeted_sweep,
    exit_indices,
    fit_thresholds,
    geometric_fractions,
    thresholds_for_budget,
)
from dynsila.evaluation.evaluate import main, read_report, topk_accuracy
from dynsila.train import main as train_main


def logits_with_confidence(confidence: np.ndarray, predictions: np.ndarray, num_classes: int = 4) -> torch.Tensor:
    """N x K x C logits whose max softmax probability is ``confidence`` and argmax is ``predictions``."""
    n, k = confidence.shape
    logits = torch.zeros(n, k, num_classes, dtype=torch.float64)
    # p_max = e^a / (e^a + (C-1))  =>  a = log(p (C-1) / (1-p))
    a = torch.log(torch.as_tensor(confidence) * (num_classes - 1) / (1 - torch.as_tensor(confidence)))
    logits.scatter_(2, torch.as_tensor(predictions)[..., None], a[..., None])
    return logits


def test_geometric_fractions():
    f = geometric_fractions([0.5, 1.0, 2.0], 3)
    assert torch.allclose(f.sum(1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(f[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(f[0], torch.tensor([4, 2, 1], dtype=torch.float64) / 7)


def test_thresholds_hit_the_target_fractions_exactly_on_distinct_confidences():
    conf = torch.tensor(
        [
            [0.9, 0.1],
            [0.8, 0.7],
            [0.7, 0.2],
            [0.6, 0.9],
            [0.5, 0.3],
            [0.4, 0.8],
            [0.3, 0.6],
            [0.2, 0.5],
            [0.1, 0.4],
            [0.05, 0.95],
        ]
    )  # N=10, K=2
    t = fit_thresholds(conf, torch.tensor([[0.3, 0.7]], dtype=torch.float64))
    assert t[0, 0].item() == pytest.approx(0.7)  # the 3rd most confident at exit 1
    assert t[0, 1].item() == -math.inf
    exits = exit_indices(conf, t)[0]
    assert exits.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]

    # three exits: quota 3 at exit 1, then the 3 most confident of the rest at exit 2
    conf3 = torch.cat([conf, conf[:, :1].flip(0)], dim=1)
    frac = torch.tensor([[0.3, 0.3, 0.4]], dtype=torch.float64)
    t3 = fit_thresholds(conf3, frac)
    realised = torch.bincount(exit_indices(conf3, t3)[0], minlength=3) / 10
    assert realised.tolist() == pytest.approx([0.3, 0.3, 0.4])
    # left for exit 2: samples 3..9, confidences 0.9 0.3 0.8 0.6 0.5 0.4 0.95 -> the 3rd highest is 0.8
    assert t3[0, 1].item() == pytest.approx(0.8)


def test_ties_at_the_threshold_all_exit():
    conf = torch.tensor([[0.9, 0.0], [0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [0.1, 0.0]])
    t = fit_thresholds(conf, torch.tensor([[0.4, 0.6]], dtype=torch.float64))  # quota 2, but 3 tie at 0.5
    exits = exit_indices(conf, t)[0]
    assert exits.tolist() == [0, 0, 0, 0, 1]


def test_zero_quota_and_overfull_quota():
    conf = torch.rand(20, 3, generator=torch.Generator().manual_seed(0))
    t = fit_thresholds(conf, torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64))
    assert t[0, 0].item() == math.inf
    exits = exit_indices(conf, t)[0]
    assert (exits == 0).sum() == 0 and (exits == 1).sum() == 10
    # ties at exit 1 leave fewer samples than exit 2's quota: all remaining exit at exit 2
    tied = torch.tensor([[0.5, 0.1, 0.0]] * 8 + [[0.1, 0.2, 0.0]] * 2)
    t = fit_thresholds(tied, torch.tensor([[0.5, 0.4, 0.1]], dtype=torch.float64))
    assert torch.bincount(exit_indices(tied, t)[0], minlength=3).tolist() == [8, 2, 0]


def reference_loop(val_conf, test_conf, test_correct, fractions, costs):
    """The MSDNet algorithm written as plain loops (for distinct confidences, where both agree)."""
    n, k = len(val_conf), len(val_conf[0])
    thresholds = [math.inf] * (k - 1) + [-math.inf]
    exited = [False] * n
    for e in range(k - 1):
        quota = math.floor(n * fractions[e] + 1e-9)
        order = sorted((i for i in range(n) if not exited[i]), key=lambda i: -val_conf[i][e])
        if quota > 0:
            thresholds[e] = val_conf[order[quota - 1]][e]
        for i in range(n):
            exited[i] = exited[i] or val_conf[i][e] >= thresholds[e]
    hits, spent = 0, 0.0
    for i in range(len(test_conf)):
        for e in range(k):
            if test_conf[i][e] >= thresholds[e] or e == k - 1:
                hits += test_correct[i][e]
                spent += costs[e]
                break
    return thresholds, 100 * hits / len(test_conf), spent / len(test_conf)


def test_vectorised_sweep_equals_the_loop_algorithm():
    g = torch.Generator().manual_seed(1)
    val_logits, test_logits = torch.randn(300, 4, 6, generator=g) * 3, torch.randn(200, 4, 6, generator=g) * 3
    val_labels, test_labels = torch.randint(0, 6, (300,), generator=g), torch.randint(0, 6, (200,), generator=g)
    costs = [10.0, 25.0, 45.0, 70.0]
    rows = budgeted_sweep(val_logits, val_labels, test_logits, test_labels, costs)
    assert len(rows) == 39 and rows[0].q == pytest.approx(0.05) and rows[-1].q == pytest.approx(1.95)
    val_conf, test_conf = CONFIDENCE["max_prob"](val_logits).tolist(), CONFIDENCE["max_prob"](test_logits).tolist()
    correct = (test_logits.argmax(-1) == test_labels[:, None]).int().tolist()
    for row in rows:
        thresholds, acc, spent = reference_loop(val_conf, test_conf, correct, row.target_fractions, costs)
        assert row.thresholds == pytest.approx(thresholds)
        assert row.test_top1 == pytest.approx(acc)
        assert row.avg_macs == pytest.approx(spent)
        # bookkeeping: the average cost is the fractions-weighted cost, and the fractions sum to 1
        assert row.avg_macs == pytest.approx(float(np.dot(row.exit_fractions, costs)))
        assert sum(row.val_exit_fractions) == pytest.approx(1.0)
        assert row.val_exit_fractions == pytest.approx(
            [math.floor(300 * f + 1e-9) / 300 for f in row.target_fractions[:-1]]
            + [1 - sum(math.floor(300 * f + 1e-9) / 300 for f in row.target_fractions[:-1])]
        )
    costs_seen = [r.avg_macs for r in rows]
    assert costs_seen == sorted(costs_seen)  # larger q sends more samples deeper


@pytest.mark.parametrize("criterion", sorted(CONFIDENCE))
def test_every_criterion_runs_and_numpy_inputs_work(criterion):
    rng = np.random.default_rng(0)
    vl, tl = rng.normal(size=(50, 3, 5)), rng.normal(size=(40, 3, 5))
    rows = budgeted_sweep(
        vl, rng.integers(0, 5, 50), tl, rng.integers(0, 5, 40), np.array([1, 2, 3]), criterion, qs=[0.5, 1.0]
    )
    assert len(rows) == 2 and all(abs(sum(r.exit_fractions) - 1) < 1e-9 for r in rows)


def test_confidence_criteria_order_samples_sensibly():
    sure = torch.tensor([[[10.0, 0.0, 0.0]]])
    unsure = torch.tensor([[[1.0, 0.9, 0.8]]])
    for name, fn in CONFIDENCE.items():
        assert fn(sure).item() > fn(unsure).item(), name


def test_single_exit_network():
    logits = torch.randn(30, 1, 4)
    labels = logits[:, 0].argmax(-1)
    rows = budgeted_sweep(logits, labels, logits, labels, [5.0], qs=[0.5, 1.5])
    assert all(r.test_top1 == 100.0 and r.avg_macs == 5.0 and r.exit_fractions == [1.0] for r in rows)


def test_budget_below_the_first_exit_and_budget_search():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 3, 5, generator=g) * 2
    costs = [10.0, 20.0, 40.0]
    t, spent = thresholds_for_budget(logits, costs, budget=5.0)
    assert spent == 10.0 and (exit_indices(CONFIDENCE["max_prob"](logits), t[None])[0] == 0).all()
    t, spent = thresholds_for_budget(logits, costs, budget=25.0)
    realised = torch.bincount(exit_indices(CONFIDENCE["max_prob"](logits), t[None])[0], minlength=3).double() / 200
    assert float(realised @ torch.tensor(costs, dtype=torch.float64)) == pytest.approx(spent)
    assert 20.0 < spent <= 25.0
    t, spent = thresholds_for_budget(logits, costs, budget=1000.0)
    assert spent <= 40.0


def test_topk_accuracy():
    logits = torch.tensor([[[0.1, 0.9], [0.8, 0.2]], [[0.7, 0.3], [0.6, 0.4]]])  # N=2, K=2, C=2
    assert topk_accuracy(logits, torch.tensor([1, 0])).tolist() == [100.0, 50.0]
    assert topk_accuracy(logits, torch.tensor([1, 0]), k=2).tolist() == [100.0, 100.0]


def test_evaluate_cli_writes_eval_json(tiny_config, capsys):
    path = tiny_config()
    assert train_main([str(path)]) == 0
    run_dir = path.parent / "runs" / "tiny"
    (run_dir / "eval.json").unlink()
    assert main([str(run_dir), "--criteria", "max_prob", "margin"]) == 0
    out = capsys.readouterr().out
    assert "anytime prediction" in out and "budgeted (margin)" in out and "MACs" in out
    report = json.loads((run_dir / "eval.json").read_text())
    assert [c["criterion"] for c in report["curves"]] == ["max_prob", "margin"]
    assert len(report["exits"]) == 3 and len(report["curves"][0]["points"]) == 39
    assert report["curves"][0]["points"][0]["thresholds"][-1] == "-inf"
    assert read_report(run_dir).to_dict() == report  # the typed report reads back to the same JSON
    assert "avg MACs as evaluated (the MSDNet paper's convention" in out  # the default, stated in every table
    assert main([str(run_dir), "--criteria", "max_prob", "--macs", "lazy"]) == 0
    assert "avg MACs lazy (what a sample pays" in capsys.readouterr().out
    lazy = read_report(run_dir)
    assert lazy.macs_convention == "lazy"
    exit_lazy = [e.macs_lazy for e in lazy.exits]
    assert exit_lazy[0] < lazy.exits[0].macs_cumulative  # the tiny MSDNet's exit 1 leaves its finest scale out
    for p in lazy.curves[0].points:
        assert p.avg_macs == pytest.approx(float(np.dot(p.exit_fractions, exit_lazy)))
    assert main([str(path.parent / "missing_run")]) == 2
    assert "not found" in capsys.readouterr().err


def test_report_round_trips_through_json():
    from dynsila.evaluation.report import AnytimeExit, BudgetedCurve, EvalReport

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(40, 2, 4, generator=g), torch.randint(0, 4, (40,), generator=g)
    rows = budgeted_sweep(logits, labels, logits, labels, [1.0, 3.0], qs=[0.0001, 1.0])
    assert rows[0].thresholds[-1] == -math.inf
    exits = [AnytimeExit(k + 1, 10 * k, 11 * k, 12 * k, 13 * k, 5, 6, 50.0, 51.0, None) for k in range(2)]
    report = EvalReport("r", "runs/r", "msdnet", "digits", True, 0, "MACs", {"val": 40, "test": 40}, exits, [])
    report.curves = [BudgetedCurve("max_prob", rows)]
    data = json.loads(report.to_json())  # strict JSON: the -inf threshold is a string
    assert data["curves"][0]["points"][0]["thresholds"][-1] == "-inf"
    assert data["curves"][0]["name"] == "budgeted (max_prob)" and data["curves"][0]["kind"] == "budgeted"
    assert EvalReport.from_dict(data) == report
    assert not report.gated and report.budgeted("max_prob") is report.curves[0] and report.budgeted("margin") is None


def test_gated_report_round_trips_and_reads_the_older_form():
    from dynsila.evaluation.report import EvalReport, GatedCurve, GatedExit, GatedPoint

    row = GatedExit(1, 2.5e6, 2.5e6, 100, 100, 80.0, 79.0, None, 4_000_000, 3_900_000, 0.5)
    points = [GatedPoint(0.5, 2.5e6, 79.0, 80.0, 2.4e6, 0.5, 0.64)]
    report = EvalReport("g", "runs/g", "skipnet", "digits", False, 0, "MACs", {"val": 1, "test": 1}, [row], [])
    report.curves = [GatedCurve(points)]
    data = report.to_dict()
    assert data["curves"][0]["kind"] == "gated" and data["curves"][0]["criterion"] == "gate_threshold"
    assert EvalReport.from_dict(json.loads(json.dumps(data))) == report and report.gated
    data["exits"][0].update(fvcore_total=None, fvcore_total_cumulative=None)  # how gated rows were written before
    assert EvalReport.from_dict(data).exits == [row]
