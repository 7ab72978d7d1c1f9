"""SkipNet on ONNX: the gated export writes one graph per piece, and its runner decides as GatedRunner and the
evaluator do, with feed-forward and recurrent gates; the export command accepts a SkipNet run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynsila import models
from dynsila.budget.flops import gated_costs
from dynsila.config import load_config
from dynsila.data import ArrayDataset, make_loader
from dynsila.deploy.gated_export import export_gated
from dynsila.deploy.gated_runner import GatedRunner
from dynsila.deploy.onnx_gated_runner import OnnxGatedRunner
from dynsila.deploy.onnx_runner import OnnxEarlyExitRunner
from dynsila.deploy.run_export import main as export_main
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import gated_pass
from dynsila.training.train import train
from tests.conftest import deploy_installed, randomise_batchnorm

pytestmark = pytest.mark.skipif(
    not deploy_installed(), reason='onnx or onnxruntime not installed: pip install -e ".[deploy]"'
)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
REPO = Path(__file__).resolve().parents[1]


def mixed_threshold(model: torch.nn.Module, x: torch.Tensor) -> float:
    """A threshold at which some gates open and some stay shut, with no gate probability within 1e-4 of it (so
    float rounding between runtimes cannot flip a decision)."""
    body = model.gated_body()
    for t in np.linspace(0.05, 0.95, 361):
        body.threshold = float(t)
        with torch.no_grad():
            probs = torch.stack(model(x).gate_probs, 1)
        share = float((probs >= t).float().mean())
        if 0.15 < share < 0.85 and float((probs - t).abs().min()) > 1e-4:
            return float(t)
    raise AssertionError("no threshold mixes open and shut gates")


@pytest.mark.parametrize("gate", ["ffgate2", "rnn"])
def test_the_onnx_runner_decides_as_the_gated_runner_and_the_evaluator(tmp_path, gate):
    torch.manual_seed(0)
    model = randomise_batchnorm(models.build("skipnet", num_classes=10, depth=20, gate=gate)).eval()
    costs = gated_costs(model, (3, 16, 16))
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8)
    loader = make_loader(ArrayDataset(images, torch.randint(0, 10, (48,))), 16, False)
    batches = [(x.float() / 255 - 0.5) / 0.25 for x, _ in loader]
    threshold = mixed_threshold(model, torch.cat(batches))
    manifest = export_gated(model, tmp_path / "onnx", batches[0][:4], threshold, costs, exporter="torchscript")
    assert manifest["verified_max_abs_difference"] < 1e-3
    shortcuts = [b["shortcut"] for b in manifest["blocks"] if b["shortcut"] is not None]
    assert len(shortcuts) == 2 and len(manifest["gates"]) == len(manifest["blocks"]) - 1 == 8
    assert len(manifest["recurrent_state"]["names"]) == (2 if gate == "rnn" else 0)

    onnx_runner = OnnxGatedRunner(tmp_path / "onnx", threads=1)
    torch_runner = GatedRunner(model, threshold, costs)
    model.gated_body().threshold = threshold
    reference = gated_pass(model, loader, MEAN, STD, "cpu", costs)
    got = [onnx_runner(x.numpy()) for x in batches]
    expected = [torch_runner(x) for x in batches]
    executed = np.concatenate([r.executed for r in got])
    assert 0.15 < executed.mean() < 0.85  # some gates open, some shut: the gather and scatter run
    assert ((executed > 0).any(0) & (executed == 0).any(0)).any()  # and within one gate, across samples
    assert np.array_equal(executed, torch.cat([r.executed for r in expected]).numpy())
    assert np.array_equal(executed, reference.executed.numpy())
    predictions = np.concatenate([r.predictions for r in got])
    assert np.array_equal(predictions, torch.cat([r.predictions for r in expected]).numpy())
    assert np.array_equal(predictions, reference.logits.argmax(1).numpy())
    assert np.allclose(np.concatenate([r.macs for r in got]), torch.cat([r.macs for r in expected]).numpy())
    logits = np.concatenate([r.logits for r in got])
    assert np.abs(logits - torch.cat([r.logits for r in expected]).numpy()).max() < 1e-4

    one_by_one = np.concatenate([onnx_runner(x[None].numpy()).executed for x in batches[0]])
    assert np.array_equal(one_by_one, executed[: len(batches[0])])
    onnx_runner.set_threshold(-1.0)
    assert onnx_runner(batches[0].numpy()).executed.all()
    with pytest.raises(DynsilaError, match="must lie in"):
        onnx_runner.set_threshold(1.5)
    with pytest.raises(DynsilaError, match="use OnnxEarlyExitRunner"):
        OnnxGatedRunner(_early_exit_stub(tmp_path))
    with pytest.raises(DynsilaError, match="run it with OnnxGatedRunner"):
        OnnxEarlyExitRunner(tmp_path / "onnx")


def _early_exit_stub(tmp_path):
    folder = tmp_path / "early_exit"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "dynsila-onnx-1"}))
    return folder


def _runs_without_torch(export_dir, tmp_path):
    """The two runner files copied into a folder of their own run the export where torch cannot be imported, and
    decide as they do here."""
    folder = tmp_path / "copied"
    folder.mkdir()
    for name in ("onnx_runner.py", "onnx_gated_runner.py"):
        shutil.copy(REPO / "dynsila" / "deploy" / name, folder / name)
    x = np.random.default_rng(0).normal(size=(12, 3, 16, 16)).astype(np.float32)
    expected = OnnxGatedRunner(export_dir, threshold=0.5)(x)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys\nsys.modules['torch'] = None\n"  # any import of torch now fails
        f"sys.path.insert(0, {str(folder)!r})\n"
        "import numpy as np, onnx_gated_runner\n"
        f"runner = onnx_gated_runner.OnnxGatedRunner({str(export_dir)!r}, threshold=0.5)\n"
        f"r = runner(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.savez({str(tmp_path / 'got.npz')!r}, executed=r.executed, predictions=r.predictions)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    got = np.load(tmp_path / "got.npz")
    assert np.array_equal(got["executed"], expected.executed)
    assert np.array_equal(got["predictions"], expected.predictions)


def test_the_export_command_writes_a_skipnet_runs_graphs_and_manifest(tiny_config, tmp_path, capsys):
    section = {"name": "skipnet", "depth": 20, "gate": "rnn", "stem": "cifar"}
    run = train(load_config(tiny_config("skip_onnx", model=section, sila={"enabled": False}), ["data.image_size=16"]))
    capsys.readouterr()
    run_dir = run.run_dir
    assert export_main([str(run_dir), "--gate-threshold", "0.5", "--exporter", "torchscript"]) == 0
    out = capsys.readouterr().out
    assert "exported a gated network" in out and "gate threshold 0.5000" in out
    manifest = json.loads((run_dir / "onnx" / "manifest.json").read_text())
    assert manifest["format"] == "dynsila-onnx-gated-1" and manifest["gate_threshold"] == 0.5
    assert manifest["input"]["shape"] == [3, 16, 16] and manifest["input"]["mean"]
    names = sorted(p.name for p in (run_dir / "onnx").iterdir())
    expected = {"stem.onnx", "head.onnx", "manifest.json", "shortcut3.onnx", "shortcut6.onnx"}
    expected |= {f"block{k}.onnx" for k in range(9)} | {f"gate{j}.onnx" for j in range(8)}
    assert set(names) == expected
    assert OnnxGatedRunner(run_dir / "onnx")(np.zeros((2, 3, 16, 16), np.float32)).logits.shape == (2, 10)
    _runs_without_torch(run_dir / "onnx", tmp_path)

    assert export_main([str(run_dir), "--budget", "1e9", "--exporter", "torchscript", "--force"]) == 0
    assert "fitted on" in capsys.readouterr().out
    for flags, message in ((["--q", "1.0"], "--gate-threshold T or --budget"), (["--int8"], "--int8 is not")):
        assert export_main([str(run_dir), *flags, "--force"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
