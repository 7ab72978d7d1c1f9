"""Shared test helpers, small enough for CPU tests in seconds: a tiny MSDNet (``TINY_MSDNET``, ``tiny_msdnet``), a
tiny run config (``tiny_config``), a batch-norm statistics randomiser, and the benchmark-script loader.

Import the plain functions with ``from tests.conftest import ...``; the fixtures need no import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):  # the suite runs in one worker per core (pytest -n): one thread each,
    torch.set_num_threads(1)  # in the worker and in the processes it starts (a run compared with a subprocess's
    os.environ["OMP_NUM_THREADS"] = "1"  # must use as many threads, or the float sums differ)

TINY_MSDNET = {
    "name": "msdnet",
    "stem": "cifar",
    "n_blocks": 3,
    "step": 1,
    "stepmode": "even",
    "base": 1,
    "n_channels": 4,
    "growth_rate": 4,
    "gr_factor": [1, 2],
    "bn_factor": [1, 2],
    "prune": "max",
    "reduction": 0.5,
    "bottleneck": True,
    "head_channels": 8,
}


def tiny_msdnet_section(**changes: Any) -> dict[str, Any]:
    """The tiny MSDNet as a config ``model:`` section (a fresh dict), with ``changes`` applied."""
    return {**TINY_MSDNET, **changes}


def randomise_batchnorm(
    model: nn.Module, mean: tuple[float, float] = (-0.5, 0.5), var: tuple[float, float] = (0.5, 2.0)
) -> nn.Module:
    """Draw every BatchNorm2d's running mean and variance uniformly from ``mean`` and ``var`` (in place; the
    global torch RNG), so an untrained model's exits disagree and its confidences (or gate probabilities)
    spread instead of sitting at the values fresh statistics give. Returns ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(*mean)
                m.running_var.uniform_(*var)
    return model


def deploy_installed() -> bool:
    """Whether the deploy extra (onnx, onnxruntime, onnxscript) can be imported. A package hidden by
    ``sys.modules[name] = None`` or by an import hook counts as absent (``find_spec`` raises there)."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<folder>/<name>.py`` as the module ``benchmarks.<folder>.<name>`` (``name`` is
    ``"<folder>.<name>"``, e.g. ``"speed.skip_speed"``): definitions only, nothing measured. Call it
    inside a test (or a fixture), never at module level, so collecting the tests runs no benchmark code."""
    return importlib.import_module(f"benchmarks.{name}")


def anytime_run_record(
    method: str, seed: int, test_top1: list[float], *, tier: int = 1, clean: float = 99.0
) -> dict[str, Any]:
    """A run file of ``benchmarks/anytime.py`` (one peer) with chosen per-exit test top-1, exits at 1, 2, 3 M MACs
    and a budgeted curve through the first exit's accuracy; no training behind it."""
    macs = [1e6 * (k + 1) for k in range(len(test_top1))]
    budgeted = [{"q": q, "avg_macs": 1e6 + q * 1e6, "test_top1": test_top1[0] + q} for q in (0.0, 1.0, 2.0)]
    peer = {
        "exit_macs": macs,
        "params_cumulative": [10 * (k + 1) for k in range(len(test_top1))],
        "test_top1": test_top1,
        "val_top1": test_top1,
        "train_top1_clean": [clean] * len(test_top1),
        "budgeted": budgeted,
    }
    return {"method": method, "seed": seed, "tier": tier, "train_seconds": 60.0, "last_epoch": {}, "peers": [peer]}


@pytest.fixture
def tiny_model_kwargs() -> dict:
    return {k: v for k, v in TINY_MSDNET.items() if k != "name"}


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Write a tiny digits config (8x8 images, 1 epoch) and return its path; keyword sections override."""

    def write(name: str = "tiny", **sections: dict) -> Path:
        raw = {
            "name": name,
            "out_dir": str(tmp_path / "runs"),
            "model": dict(TINY_MSDNET),
            "data": {"name": "digits", "image_size": 8, "val_size": 0.2, "batch_size": 128},
            "train": {"epochs": 1, "lr": 0.05, "log_every": 5},
            "sila": {"enabled": True},
        }
        for section, values in sections.items():
            if isinstance(values, dict) and section != "model":  # a model section replaces the tiny MSDNet
                raw.setdefault(section, {}).update(values)
            else:
                raw[section] = values
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Benchmarks called in-process set torch's thread count; restore it so later tests (exact resume compares
    an in-process run with a subprocess run) see the default the subprocesses get."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
