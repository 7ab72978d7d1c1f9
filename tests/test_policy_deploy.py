"""Every exit policy deploys: the PyTorch runner (lazy path included) and the ONNX runner decide as the evaluator
does, and ``python -m dynsila.infer`` / ``export`` take ``--policy``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from dynsila import models
from dynsila.budget.flops import exit_costs
from dynsila.deploy.export import ThresholdFit, export_onnx
from dynsila.deploy.infer import main as infer_main
from dynsila.deploy.run_export import main as export_main
from dynsila.deploy.runner import EarlyExitRunner
from dynsila.evaluation.evaluate import main as evaluate_main
from dynsila.evaluation.report import json_safe
from dynsila.policies.base import apply_one
from dynsila.policies.sweep import quota_budgets
from dynsila.policies.table import POLICIES, make_policy
from dynsila.train import main as train_main
from tests.conftest import deploy_installed, load_benchmark, randomise_batchnorm

needs_deploy = pytest.mark.skipif(not deploy_installed(), reason='needs pip install -e ".[deploy]"')
TARGETS = {"risk": 0.3}


def fitted_specs(val_logits: torch.Tensor, costs: list[float]) -> dict[str, dict]:
    """Every policy fitted on validation logits whose labels are the last exit's argmax (so exits disagree)."""
    labels = val_logits[:, -1].argmax(-1)
    budget = quota_budgets(val_logits, labels, costs, [1.0])
    return {
        name: make_policy(name).fit(val_logits, labels, costs, [TARGETS.get(name, budget[0])])[0] for name in POLICIES
    }


def tiny_msdnet(kwargs: dict) -> Any:
    torch.manual_seed(0)
    return randomise_batchnorm(models.build("msdnet", num_classes=5, **kwargs).double().eval())


def test_pytorch_runner_executes_every_policy_as_the_evaluator(tiny_model_kwargs):
    model = tiny_msdnet(tiny_model_kwargs)
    g = torch.Generator().manual_seed(1)
    val_x, test_x = torch.randn(200, 3, 8, 8, generator=g).double(), torch.randn(90, 3, 8, 8, generator=g).double()
    with torch.no_grad():
        val_logits, test_logits = torch.stack(model(val_x), 1), torch.stack(model(test_x), 1)
    costs = [float(c.macs_cumulative) for c in exit_costs(model.float(), (3, 8, 8))]
    model.double()
    assert model.deferred_split(0) is not None  # the lazy path, which stops computing a sample that left
    for name, spec in fitted_specs(val_logits, costs).items():
        expected_exits, expected_predictions = apply_one(spec, test_logits)
        if name in ("patience", "product"):
            assert len(set(expected_exits.tolist())) > 1, name  # the state-carrying rules are not trivial here
        runner = EarlyExitRunner(model, None, costs=costs, policy=json.loads(json.dumps(spec)))
        for batch in (90, 7, 1):
            results = [runner(test_x[i : i + batch]) for i in range(0, 90, batch)]
            assert np.array_equal(torch.cat([r.exit_index for r in results]).numpy(), expected_exits), name
            assert np.array_equal(torch.cat([r.predictions for r in results]).numpy(), expected_predictions), name
            streamed = runner.run_stream(test_x.split(batch), group_size=max(batch, 16))
            assert np.array_equal(streamed.exit_index.numpy(), expected_exits), name
            assert np.array_equal(streamed.predictions.numpy(), expected_predictions), name


@needs_deploy
def test_onnx_runner_executes_every_policy_as_the_evaluator(tiny_model_kwargs, tmp_path):
    from dynsila.deploy.onnx_runner import OnnxEarlyExitRunner

    model = tiny_msdnet(tiny_model_kwargs).float()
    g = torch.Generator().manual_seed(2)
    val_x, test_x = torch.randn(200, 3, 8, 8, generator=g), torch.randn(60, 3, 8, 8, generator=g)
    costs = [{"macs": 1, "macs_cumulative": c} for c in (1, 2, 3)]
    fit = ThresholdFit([0.0, 0.0, float("-inf")], "max_prob", 1.0, None, 200, [], 0.0)
    export_onnx(model, tmp_path / "onnx", val_x[:4], costs, fit, exporter="torchscript")
    manifest_path = tmp_path / "onnx" / "manifest.json"
    plain = OnnxEarlyExitRunner(tmp_path / "onnx")
    val_logits = torch.from_numpy(plain.all_exit_logits(val_x.numpy())).double()
    test_logits = plain.all_exit_logits(test_x.numpy())
    for name, spec in fitted_specs(val_logits, [1.0, 2.0, 3.0]).items():
        manifest = json.loads(manifest_path.read_text())
        manifest["policy"] = json_safe(spec)  # as the manifest writer stores it
        manifest_path.write_text(json.dumps(manifest))
        runner = OnnxEarlyExitRunner(tmp_path / "onnx")  # the manifest's policy
        expected_exits, expected_predictions = apply_one(spec, test_logits)
        for result in (runner(test_x.numpy()), runner.run_stream(np.split(test_x.numpy(), 6), group_size=16)):
            assert np.array_equal(result.exit_index, expected_exits), name
            assert np.array_equal(result.predictions, expected_predictions), name


def test_infer_takes_every_policy_on_a_digits_run(tiny_config, capsys):
    path = tiny_config()
    assert train_main([str(path)]) == 0
    run_dir = str(path.parent / "runs" / "tiny")
    capsys.readouterr()
    for name in POLICIES:
        target = ["--epsilon", "0.2"] if name == "risk" else ["--q", "1.0"]
        assert infer_main([run_dir, "--policy", name, *target, "--batch-size", "32"]) == 0, name
        out = capsys.readouterr().out
        assert "top-1" in out and (name == "quotas" or f"policy {name}:" in out), out
    assert infer_main([run_dir, "--policy", "patience", "--patience", "1", "--floor", "0.2", "--budget", "1"]) == 0
    assert "floor 0.2, patience 1" in capsys.readouterr().out
    assert infer_main([run_dir, "--policy", "product", "--floor", "0.5", "--q", "1"]) == 2
    assert infer_main([run_dir, "--policy", "risk", "--q", "1"]) == 2
    assert infer_main([run_dir, "--policy", "calibrated", "--epsilon", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "takes no parameters, not --floor" in err[0] and "pass --epsilon" in err[1] and "not --epsilon" in err[2]
    assert evaluate_main([run_dir, "--policy", "patience", "risk"]) == 0
    out = capsys.readouterr().out
    assert "policy patience: fitted on val" in out and "policy risk: fitted on val" in out
    assert set(json.loads((path.parent / "runs" / "tiny" / "eval_policies.json").read_text())["curves"]) == {
        "patience",
        "risk",
    }
    bench = load_benchmark("accuracy.exit_policies")
    assert bench.main(["--runs", run_dir, "--results-dir", str(path.parent / "results")]) == 0
    assert "| tiny | learned |" in capsys.readouterr().out
    if deploy_installed():
        assert export_main([run_dir, "--policy", "patience", "--q", "1.0", "--exporter", "torchscript"]) == 0
        manifest = json.loads((path.parent / "runs" / "tiny" / "onnx" / "manifest.json").read_text())
        assert manifest["policy"]["policy"] == "patience" and "policy patience" in capsys.readouterr().out
