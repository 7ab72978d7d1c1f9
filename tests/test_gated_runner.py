"""SkipNet deployed: the gated runner skips per sample and decides as the evaluator does; infer accepts a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dynsila import models
from dynsila.budget.flops import gated_costs
from dynsila.config import load_config
from dynsila.data import ArrayDataset, make_loader
from dynsila.deploy.gated_runner import GatedRunner, threshold_for_budget
from dynsila.evaluation.evaluate import gated_pass
from dynsila.infer import main as infer_main
from dynsila.predict import main as predict_main
from dynsila.training.train import train
from tests.conftest import randomise_batchnorm


def tiny_skipnet(gate: str = "ffgate2") -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(models.build("skipnet", num_classes=10, depth=38, gate=gate)).eval()


@pytest.mark.parametrize("gate", ["ffgate2", "rnn"])
def test_the_runner_decides_as_the_evaluator_and_skips_per_sample(gate):
    model = tiny_skipnet(gate)
    costs = gated_costs(model, (3, 16, 16))
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    loader = make_loader(ArrayDataset(images, torch.randint(0, 10, (48,))), 16, False)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    batches = [(x.float() / 255 - 0.5) / 0.25 for x, _ in loader]
    runner = GatedRunner(model, 0.5, costs)
    threshold = threshold_for_budget(runner, batches, 0.6 * costs.full + 0.4 * costs.always)
    body = model.gated_body()
    body.threshold = threshold
    reference = gated_pass(model, loader, mean, std, "cpu", costs)
    runner.set_threshold(threshold)
    results = [runner(x) for x in batches]
    executed = torch.cat([r.executed for r in results])
    assert 0.05 < float(executed.mean()) < 0.95  # some blocks run on part of a batch: the gathering is exercised
    assert torch.equal(executed, reference.executed)
    assert torch.equal(torch.cat([r.predictions for r in results]), reference.logits.argmax(1))
    assert torch.allclose(torch.cat([r.macs for r in results]), reference.macs)


def test_the_fitted_threshold_keeps_the_budget_and_runs_the_most_it_allows():
    model = tiny_skipnet()
    costs = gated_costs(model, (3, 16, 16))
    batches = [torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    runner = GatedRunner(model, 0.5, costs)
    budget = 0.7 * costs.full
    threshold = threshold_for_budget(runner, batches, budget)
    runner.set_threshold(threshold)
    spent = float(torch.cat([runner(x).macs for x in batches]).mean())
    assert spent <= budget
    if threshold > 0:
        runner.set_threshold(max(0.0, threshold - 1e-3))
        assert float(torch.cat([runner(x).macs for x in batches]).mean()) > budget or threshold < 1e-3
    with pytest.raises(ValueError, match="must lie in"):
        runner.set_threshold(1.5)
    with pytest.raises(ValueError, match="no gated body"):
        GatedRunner(models.build("msdnet", num_classes=10, n_blocks=2, n_channels=4, growth_rate=4), 0.5, costs)


def test_infer_and_predict_accept_a_skipnet_run(tiny_config, capsys, tmp_path):
    section = {"name": "skipnet", "depth": 20, "gate": "ffgate2", "stem": "cifar"}
    run = train(load_config(tiny_config("skip_infer", model=section, sila={"enabled": False}), ["data.image_size=16"]))
    capsys.readouterr()
    assert infer_main([str(run.run_dir), "--gate-threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "% of the gated blocks run" in out
    assert infer_main([str(run.run_dir), "--budget", "1e9"]) == 0
    assert "fitted on val" in capsys.readouterr().out
    assert infer_main([str(run.run_dir), "--q", "1.0"]) == 2
    assert "--gate-threshold" in capsys.readouterr().err

    # python -m dynsila.predict on image files: one exit, the gated runner's prediction and MACs
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "p.csv"
    assert predict_main([str(run.run_dir), str(folder), "--gate-threshold", "0.5", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 3 and all(r.split(",")[4] == "1" and 0 < float(r.split(",")[3]) <= 1 for r in rows)
    assert predict_main([str(run.run_dir), str(folder), "--q", "1.0", "--out", str(tmp_path / "q.csv")]) == 2
    assert "--gate-threshold" in capsys.readouterr().err and not (tmp_path / "q.csv").exists()


@pytest.mark.parametrize("depth", [38, 50])  # basic blocks (CIFAR), bottlenecks (ImageNet)
def test_batch_norm_folds_into_every_residual_block_with_the_same_outputs(depth):
    from dynsila.deploy.fuse import fold_batchnorm

    torch.manual_seed(0)
    stem = "cifar" if depth == 38 else "imagenet"
    model = randomise_batchnorm(models.build("skipnet", num_classes=10, depth=depth, gate="ffgate2", stem=stem))
    model = model.eval()
    folded = fold_batchnorm(model)
    left = [n for n, m in folded.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and ".blocks." in f".{n}"]
    assert left == [] and any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x).logits[-1], model(x).logits[-1], atol=1e-4, rtol=1e-4)


def test_a_block_written_over_its_input_equals_the_gathered_and_scattered_one():
    from dynsila.models.skipnet import execute_block

    torch.manual_seed(0)
    block = tiny_skipnet().gated_body().blocks[2]
    assert getattr(block, "shortcut", None) is None  # an identity-shortcut block: the in-place path applies
    x = torch.randn(8, block.conv1.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
    execute = torch.tensor([True, False, True, True, False, False, True, False])
    with torch.no_grad():
        expected = execute_block(block, x.clone(), execute)
        got = execute_block(block, x.clone(), execute, overwrite_input=True)
    assert torch.equal(got, expected) and torch.equal(expected[~execute], x[~execute])
    assert got.is_contiguous(memory_format=torch.channels_last)
