"""Shared fixtures: a tiny MSDNet and a tiny run config, small enough for CPU tests in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

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
