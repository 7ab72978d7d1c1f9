"""Staged ONNX export and the ONNX Runtime early-exit runner (dynsila.export, dynsila.onnx_runner)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dynsila import models
from dynsila.budget.flops import exit_costs
from dynsila.budget.thresholds import CONFIDENCE, fit_thresholds, geometric_fractions
from dynsila.config import load_config
from dynsila.data import build_splits, make_loader, normalize
from dynsila.deploy.export import ThresholdFit, export_onnx
from dynsila.deploy.onnx_runner import NUMPY_CONFIDENCE, OnnxEarlyExitRunner
from dynsila.deploy.run_export import main as export_main
from dynsila.deploy.runner import EarlyExitRunner
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import collect_logits
from dynsila.models import MultiExitNetwork
from dynsila.runs.rundir import load_deploy_model
from dynsila.train import main as train_main
from tests.conftest import deploy_installed

REPO = Path(__file__).resolve().parents[1]
DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
HAVE_DEPLOY = deploy_installed()
needs_deploy = pytest.mark.skipif(
    not HAVE_DEPLOY, reason='onnx, onnxruntime or onnxscript not installed: pip install -e ".[deploy]"'
)
RUN_SLOW = os.environ.get("DYNSILA_SLOW") == "1"


def compare_runners(model: MultiExitNetwork, onnx_dir: Path, x: torch.Tensor, batch_size: int, singles: int) -> None:
    """The ONNX runner's decisions equal the PyTorch runner's (manifest thresholds and criterion), in batches of
    ``batch_size``, streamed, and one by one for the first ``singles`` samples; its logits at the exit taken agree
    with PyTorch's within 1e-4."""
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    thresholds = [float(e["threshold"]) for e in manifest["exits"]]
    onnx_runner = OnnxEarlyExitRunner(onnx_dir, threads=1)
    key = "macs_lazy" if onnx_runner.cost_convention == "lazy" else "macs_cumulative"
    torch_runner = EarlyExitRunner(model, thresholds, manifest["criterion"], costs=[e[key] for e in manifest["exits"]])
    with torch.no_grad():
        reference = torch.stack(torch_runner.model(x.contiguous(memory_format=torch.channels_last)), 1).numpy()
    for batch, part in ((batch_size, x), (1, x[:singles])):
        expected = [torch_runner(b) for b in part.split(batch)]
        got = [onnx_runner(b.numpy()) for b in part.split(batch)]
        exits = np.concatenate([r.exit_index for r in got])
        assert np.array_equal(exits, torch.cat([r.exit_index for r in expected]).numpy())
        assert np.array_equal(
            np.concatenate([r.predictions for r in got]), torch.cat([r.predictions for r in expected])
        )
        assert np.array_equal(np.concatenate([r.macs for r in got]), torch.cat([r.macs for r in expected]).numpy())
        logits = np.concatenate([r.logits for r in got])
        assert np.abs(logits - reference[np.arange(len(part)), exits]).max() < 1e-4
        streamed = onnx_runner.run_stream([b.numpy() for b in part.split(batch)])
        assert np.array_equal(streamed.exit_index, exits)
        if batch > 1:
            assert len(set(exits.tolist())) > 1  # the case is not trivial: samples leave at different exits
    assert np.abs(onnx_runner.all_exit_logits(x.numpy()) - reference).max() < 1e-4


def assert_graphs_are_deployable(onnx_dir: Path) -> None:
    """No batch-norm left (folded), a dynamic batch axis on every input and output."""
    import onnx

    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    rests = [s["rest"] for s in manifest["stages"] if "rest" in s]
    for entry in manifest["stages"] + rests + manifest["exits"]:
        graph = onnx.load(str(onnx_dir / entry["file"])).graph
        assert not [n for n in graph.node if n.op_type == "BatchNormalization"], entry["file"]
        for value in list(graph.input) + list(graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param, f"{entry['file']}: {value.name} has a fixed batch"


# --- a trained digits run, through the command line ------------------------------------------------------------


@needs_deploy
def test_digits_run_exports_and_the_onnx_runner_decides_as_pytorch(tiny_config, capsys):
    path = tiny_config()
    assert train_main([str(path)]) == 0
    run_dir = path.parent / "runs" / "tiny"
    capsys.readouterr()
    assert export_main([str(run_dir), "--q", "1.0", "--criterion", "entropy"]) == 0
    out = capsys.readouterr().out
    assert "exporter: dynamo" in out and "exit  after stage" in out
    onnx_dir = run_dir / "onnx"
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert [e["exit"] for e in manifest["exits"]] == [1, 2, 3] and manifest["criterion"] == "entropy"
    assert manifest["stages"][0]["inputs"] == ["image"] and len(manifest["stages"][1]["inputs"]) == 2  # two scales

    # thresholds fitted on the validation split exactly as python -m dynsila.infer fits them
    model, cfg = load_deploy_model(run_dir)
    splits = build_splits(cfg.data)
    val_logits, _ = collect_logits(model, make_loader(splits.val, 256, False), splits.mean, splits.std)
    fitted = fit_thresholds(CONFIDENCE["entropy"](val_logits), geometric_fractions([1.0], 3))[0]
    assert [float(e["threshold"]) for e in manifest["exits"]] == fitted.tolist()
    counted = exit_costs(model, (3, 8, 8))
    assert [e["macs_cumulative"] for e in manifest["exits"]] == [c.macs_cumulative for c in counted]
    assert [e["macs_lazy"] for e in manifest["exits"]] == [c.macs_lazy for c in counted]
    assert_graphs_are_deployable(onnx_dir)
    assert not any("rest" in s for s in manifest["stages"])  # whole stages unless --lazy
    assert OnnxEarlyExitRunner(onnx_dir).cost_convention == "paper"

    images, _ = next(iter(make_loader(splits.test, len(splits.test), shuffle=False)))
    compare_runners(model, onnx_dir, normalize(images, splits.mean, splits.std), batch_size=64, singles=24)


# --- MSDNet CIFAR-100 b7 with random weights -----------------------------------------------------------------


def random_b7() -> MultiExitNetwork:
    torch.manual_seed(0)
    kwargs = load_config(REPO / "configs" / "cifar100" / "msdnet_baseline.yaml").model_kwargs()
    model = models.build("msdnet", num_classes=100, **kwargs).eval()
    for m in model.modules():  # random batch-norm statistics, so exits disagree and confidences spread
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@needs_deploy
@pytest.mark.parametrize(
    "exporter",
    [
        "torchscript",
        pytest.param(
            "dynamo",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not RUN_SLOW, reason="~50 s CPU: dynamo export of 14 graphs; DYNSILA_SLOW=1"),
            ],
        ),
    ],
)
def test_msdnet_cifar100_b7_onnx_runner_decides_as_pytorch(tmp_path, exporter):
    model = random_b7()
    g = torch.Generator().manual_seed(1)
    calibration, x = torch.randn(64, 3, 32, 32, generator=g), torch.randn(64, 3, 32, 32, generator=g)
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(calibration), 1))
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 7))[0].tolist()
    fit = ThresholdFit(thresholds, "max_prob", 1.0, None, 64, [], 0.0)
    # not counted here (fvcore takes ~15 s); lazy costs below the paper's so that a mix-up shows
    costs = [{"macs": 1, "macs_cumulative": 10 * k, "macs_lazy": 10 * k - 1} for k in range(1, 8)]
    manifest = export_onnx(model, tmp_path / "b7", calibration[:4], costs, fit, exporter=exporter, lazy=True)
    rests = [s["rest"] for s in manifest["stages"] if "rest" in s]
    assert {g["exporter"] for g in manifest["stages"] + rests + manifest["exits"]} == {exporter}
    scales = [len(s["outputs"]) for s in manifest["stages"]]  # MSDNet's list of scales, finest dropped over time
    assert scales[0] == 3 and scales[-1] == 1 and scales == sorted(scales, reverse=True)
    # lazy evaluation: the stages whose exit does not read every scale are written as exit path + deferred rest
    split = [model.deferred_split(i) is not None for i in range(len(model.stages))]
    assert ["rest" in s for s in manifest["stages"]] == split and any(split) and not all(split)
    for s, entry in zip(manifest["stages"], split, strict=True):
        if entry:  # the exit reads the coarsest scale only; the finer ones wait for the rest graph
            assert len(s["exit_outputs"]) < len(s["outputs"]) and s["rest"]["outputs"] == s["outputs"]
    assert OnnxEarlyExitRunner(tmp_path / "b7").cost_convention == "lazy"
    compare_runners(model, tmp_path / "b7", x, batch_size=32, singles=6)


# --- the protocol in general, files, errors ------------------------------------------------------------------


class TensorStateNet(MultiExitNetwork):
    """A tensor state, no exit after the first stage and two after the second (exit_after [1, 1, 2])."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(3)])
        self.exits = nn.ModuleList()
        for _ in range(3):
            head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            head.fc = nn.Linear(4, 3)
            self.exits.append(head)
        self.exit_after = [1, 1, 2]


def export_tensor_state_net(out: Path, **kwargs) -> tuple[MultiExitNetwork, torch.Tensor]:
    torch.manual_seed(0)
    model = TensorStateNet().eval()
    fit_x, x = torch.randn(60, 3, 6, 6), torch.randn(60, 3, 6, 6)
    with torch.no_grad():
        conf = CONFIDENCE["margin"](torch.stack(model(fit_x), 1))
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 3))[0].tolist()
    fit = ThresholdFit(thresholds, "margin", 1.0, None, 60, [], 0.0)
    costs = [{"macs": 1, "macs_cumulative": c} for c in (1, 2, 3)]
    export_onnx(model, out, fit_x[:4], costs, fit, exporter="torchscript", **kwargs)
    return model, x


@needs_deploy
def test_any_protocol_model_exports_with_exits_sharing_a_stage(tmp_path):
    model, x = export_tensor_state_net(tmp_path / "net")
    manifest = json.loads((tmp_path / "net" / "manifest.json").read_text())
    assert [e["after_stage"] for e in manifest["exits"]] == [1, 1, 2]
    assert manifest["exits"][0]["inputs"] == ["state1_0"]
    assert_graphs_are_deployable(tmp_path / "net")
    compare_runners(model, tmp_path / "net", x, batch_size=7, singles=10)


@needs_deploy
def test_export_is_atomic_and_never_overwrites_without_force(tmp_path, monkeypatch):
    export_tensor_state_net(tmp_path / "net")
    first = (tmp_path / "net" / "manifest.json").read_text()
    with pytest.raises(DynsilaError, match="exists; pass --force"):
        export_tensor_state_net(tmp_path / "net")

    def broken(*args, **kwargs):
        raise DynsilaError("the exported graphs disagree with PyTorch")

    monkeypatch.setattr("dynsila.deploy.export._verify", broken)  # a failure after the graphs were written
    with pytest.raises(DynsilaError, match="disagree"):
        export_tensor_state_net(tmp_path / "net", force=True)
    assert (tmp_path / "net" / "manifest.json").read_text() == first  # the previous export is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]  # no staging folder left behind
    monkeypatch.undo()
    export_tensor_state_net(tmp_path / "net", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]
    assert oct((tmp_path / "net").stat().st_mode & 0o777) != oct(0o700)  # not left private by mkdtemp


def test_gated_networks_are_refused_in_one_line(tmp_path):
    model = models.build("skipnet", num_classes=10, depth=38, gate="ffgate1").eval()
    fit = ThresholdFit([0.0], "max_prob", 1.0, None, 0, [], 0.0)
    with pytest.raises(DynsilaError, match=r"a gated network \(SkipNet\) is exported per block") as e:
        export_onnx(model, tmp_path / "out", torch.zeros(2, 3, 32, 32), [], fit)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_deploy_packages_give_one_clear_line(tmp_path, monkeypatch):
    """The same messages whether or not the deploy extra is installed: all three packages are hidden here."""
    for name in DEPLOY_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)  # import <name> now raises ImportError
    with pytest.raises(DynsilaError, match=r'needs onnxruntime: pip install -e "\.\[deploy\]"'):
        OnnxEarlyExitRunner(tmp_path)
    fit = ThresholdFit([0.0, 0.0, 0.0], "max_prob", 1.0, None, 0, [], 0.0)
    with pytest.raises(DynsilaError, match=r"needs onnx, onnxruntime, onnxscript \(the deploy extra\)"):
        export_onnx(TensorStateNet().eval(), tmp_path / "out", torch.zeros(2, 3, 6, 6), [], fit)
    with pytest.raises(DynsilaError, match=r"needs onnx, onnxruntime \(the deploy extra\)"):
        export_onnx(TensorStateNet().eval(), tmp_path / "out", torch.zeros(2, 3, 6, 6), [], fit, exporter="torchscript")


def test_export_cli_errors_in_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "deploy.safetensors" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("criterion", sorted(CONFIDENCE))
def test_numpy_criteria_equal_the_torch_criteria(criterion):
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(50, 7, generator=g), 40 * torch.randn(50, 7, generator=g)]).float()
    expected = CONFIDENCE[criterion](logits[:, None, :])[:, 0].numpy()
    got = NUMPY_CONFIDENCE[criterion](logits.numpy())
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    one_class = logits[:, :1]
    np.testing.assert_allclose(
        NUMPY_CONFIDENCE[criterion](one_class.numpy()), CONFIDENCE[criterion](one_class[:, None])[:, 0].numpy()
    )


RUNNER_FILE = REPO / "dynsila" / "deploy" / "onnx_runner.py"


def test_the_runner_module_needs_no_torch():
    """dynsila/deploy/onnx_runner.py alone (numpy, onnxruntime) runs where torch is absent."""
    code = (
        "import sys, importlib.util\n"
        "sys.modules['torch'] = None\n"  # any import of torch now fails
        f"spec = importlib.util.spec_from_file_location('onnx_runner', {str(RUNNER_FILE)!r})\n"
        "module = sys.modules['onnx_runner'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "import numpy as np\n"
        "print(float(module.max_prob(np.array([[0.0, 0.0]]))[0]))\n"
        "try:\n    module.read_manifest('/nonexistent')\nexcept Exception as e:\n    print(str(e).split()[-1])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0.5", "RUN_DIR"]  # the clear error, without torch


@needs_deploy
def test_onnx_speed_benchmark_smoke(tmp_path, capsys):
    bench = importlib.import_module("benchmarks.speed.onnx_speed")
    argv = ["--smoke", "--exporter", "torchscript", "--results-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "onnx_speed.json").read_text())
    assert result["command"] == "python benchmarks/speed/onnx_speed.py " + " ".join(argv)
    assert [(r["batch_size"], r["target_fraction"]) for r in result["rows"]] == [
        (b, f) for b in (8, 1) for f in (0.25, 0.5, 0.75)
    ]
    assert all(r["decisions_differing"] == 0 and r["onnx_seconds"] > 0 for r in result["rows"])
    assert "| batch | target MACs share |" in (tmp_path / "onnx_speed.md").read_text()


def test_the_dev_install_without_the_deploy_extra_passes_these_tests():
    """``pip install -e ".[dev]"`` has no onnx, onnxruntime or onnxscript: run this file's tests that do not need
    them in a Python that cannot import them (tests/without_deploy/sitecustomize.py), every process included;
    the deploy tests must skip, the rest pass."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "without_deploy"), str(REPO)])}
    keep = "missing_deploy or export_cli_errors or gated_networks or digits_run_exports"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", __file__, "-k", keep],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "SKIPPED [1]" in done.stdout and "not installed" in done.stdout, done.stdout[-3000:]
