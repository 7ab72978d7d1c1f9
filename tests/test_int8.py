"""int8 exports (python -m dynsila.export --int8, dynsila.quantize): calibrated on validation images only, the
thresholds refitted on the int8 graphs' own validation logits, and exit decisions that mostly agree with fp32's."""

from __future__ import annotations

import json

import numpy as np
import torch

import dynsila.deploy.quantize
from dynsila.budget.thresholds import CONFIDENCE, fit_thresholds, geometric_fractions
from dynsila.data import build_splits, make_loader, normalize
from dynsila.deploy.onnx_runner import OnnxEarlyExitRunner
from dynsila.deploy.run_export import main as export_main
from dynsila.runs.rundir import load_deploy_model
from dynsila.train import main as train_main
from tests.conftest import load_benchmark
from tests.test_export import needs_deploy

# Measured on this digits run (2 epochs, seed 0; barely trained, 13-18 % top-1, so confidences sit close together
# and near the thresholds, the hard case): 0.936 of the 359 test images take the same exit with the same
# prediction in the int8 export (its own refitted thresholds) as in the fp32 one; the bound leaves room for
# other CPUs' rounding.
MIN_AGREEMENT = 0.90


@needs_deploy
def test_int8_export_is_calibrated_on_validation_and_decides_like_fp32(tiny_config, capsys, monkeypatch):
    path = tiny_config(train={"epochs": 2})
    assert train_main([str(path)]) == 0
    run_dir = path.parent / "runs" / "tiny"
    calibrated: list[np.ndarray] = []
    quantize_export = dynsila.deploy.quantize.quantize_export

    def spy(folder, images):
        calibrated.append(images)
        return quantize_export(folder, images)

    monkeypatch.setattr(dynsila.deploy.quantize, "quantize_export", spy)
    assert export_main([str(run_dir), "--out", str(run_dir / "fp32"), "--exporter", "torchscript"]) == 0
    assert export_main([str(run_dir), "--out", str(run_dir / "int8"), "--exporter", "torchscript", "--int8"]) == 0
    capsys.readouterr()

    model, cfg = load_deploy_model(run_dir)
    splits = build_splits(cfg.data)
    val = torch.cat([normalize(x, splits.mean, splits.std) for x, _ in make_loader(splits.val, 256, False)])
    (images,) = calibrated
    assert np.array_equal(images, val.numpy())  # the validation split, all of it, and nothing else

    import onnx

    manifest = json.loads((run_dir / "int8" / "manifest.json").read_text())
    assert manifest["quantization"]["calibration_split"] == "validation"
    assert manifest["quantization"]["calibration_images"] == len(val)
    for entry in manifest["stages"] + manifest["exits"]:
        ops = {n.op_type for n in onnx.load(str(run_dir / "int8" / entry["file"])).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, entry["file"]

    int8 = OnnxEarlyExitRunner(run_dir / "int8", threads=1)
    fp32 = OnnxEarlyExitRunner(run_dir / "fp32", threads=1)
    val_logits = torch.from_numpy(int8.all_exit_logits(val.numpy()))  # thresholds refitted on these
    refitted = fit_thresholds(CONFIDENCE["max_prob"](val_logits), geometric_fractions([1.0], 3))[0]
    assert [float(e["threshold"]) for e in manifest["exits"]] == refitted.tolist()
    assert not np.allclose(int8.thresholds, fp32.thresholds)  # quantisation moved the confidences

    test_images, _ = next(iter(make_loader(splits.test, len(splits.test), shuffle=False)))
    x = normalize(test_images, splits.mean, splits.std).numpy()
    a, b = int8(x), fp32(x)
    agreement = float(((a.exit_index == b.exit_index) & (a.predictions == b.predictions)).mean())
    print(f"int8 / fp32 agreement on {len(x)} test images: {agreement:.3f}")
    assert agreement >= MIN_AGREEMENT
    assert len(set(a.exit_index.tolist())) > 1  # not trivial: samples leave at different exits
    streamed = int8.run_stream([x[i : i + 16] for i in range(0, len(x), 16)])
    assert np.array_equal(streamed.exit_index, a.exit_index)

    # the benchmark on this run, end to end (its numbers mean nothing here)
    argv = [
        str(run_dir),
        "--repeats",
        "1",
        "--exporter",
        "torchscript",
        "--no-b7",
        "--results-dir",
        str(run_dir / "bench"),
    ]
    assert load_benchmark("speed.int8_exits").main(argv) == 0
    result = json.loads((run_dir / "bench" / "int8_exits.json").read_text())
    assert [r["exit"] for r in result["per_exit"]] == [1, 2, 3] and len(result["speed"]) == 4
    assert result["quantization"]["calibration_split"] == "validation" and result["test_images"] == len(x)
