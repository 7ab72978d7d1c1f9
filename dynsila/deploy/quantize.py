"""int8 graphs for a staged ONNX export: static quantisation calibrated on the run's validation images.

``quantize_export(folder, images)`` rewrites every graph of an export folder (``python -m dynsila.export``'s
layout) as an int8 graph with ONNX Runtime's static quantiser: weights int8 per output channel, activations uint8
with ranges measured on ``images`` (the inputs every graph sees when ``images`` go through the fp32 graphs, stage
by stage), in the QDQ format that ONNX Runtime's CPU kernels fuse into integer convolutions and matrix products.
Calibration must never see test images: ``python -m dynsila.export --int8`` passes the run's validation split, on
which the thresholds are then refitted from the int8 graphs' own logits (quantisation moves confidences, so the
fp32 thresholds would give another exit mix).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dynsila.deploy.onnx_runner import OnnxEarlyExitRunner, read_manifest
from dynsila.errors import DynsilaError

CALIBRATION_BATCH = 64
QUANTIZATION = (
    "static int8: onnxruntime.quantization.quantize_static, QDQ, weights int8 per channel, activations uint8, "
    "MinMax ranges"
)


def graph_inputs(
    folder: Path, images: np.ndarray, batch_size: int = CALIBRATION_BATCH
) -> dict[str, list[dict[str, np.ndarray]]]:
    """For every graph file of the export, the inputs it reads when ``images`` go through the fp32 graphs, one
    dict per batch of ``batch_size`` (what a calibration reader hands the quantiser)."""
    runner = OnnxEarlyExitRunner(folder, thread_pool="session")
    seen: dict[str, list[dict[str, np.ndarray]]] = {}

    def record(graph: Any, state: dict[str, np.ndarray], file: str) -> None:
        seen.setdefault(file, []).append({name: state[name] for name in graph.inputs})

    for start in range(0, len(images), batch_size):
        state = {runner.input_name: np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)}
        for stage, entry in zip(runner.stages, runner.manifest["stages"], strict=True):
            record(stage.graph, state, entry["file"])
            exit_state, state = stage.run(state)
            for k in stage.exits:
                record(runner.exits[k], exit_state, runner.manifest["exits"][k]["file"])
            if stage.rest is not None:
                record(stage.rest, state, entry["rest"]["file"])
            state = stage.complete(state)
    return seen


class _Batches:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_export(folder: Path, images: np.ndarray) -> dict[str, Any]:
    """Replace every graph in ``folder`` by its int8 form, calibrated on ``images`` (normalised, N x C x H x W;
    validation images, never test ones). Returns the manifest's ``quantization`` record."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    folder = Path(folder)
    if len(images) < 2:
        raise DynsilaError("int8 calibration needs validation images; the run's validation split is empty")
    read_manifest(folder)  # a clear error for a folder that is no export
    inputs = graph_inputs(folder, images)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        for file, batches in inputs.items():
            quantized = Path(scratch) / file
            quantize_static(
                folder / file,
                quantized,
                _Batches(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
            quantized.replace(folder / file)
    return {"method": QUANTIZATION, "calibration_images": int(len(images)), "calibration_split": "validation"}
