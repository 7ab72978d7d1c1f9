"""What a training process sets and saves about itself: its random generators, its autocast precision."""

from __future__ import annotations

import random
from typing import Any, cast

import numpy as np
import torch

from dynsila.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as tensors and numbers (``weights_only``-loadable)."""
    legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    _, keys, pos, has_gauss, cached = legacy
    version, py_state, gauss = random.getstate()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """None (full precision) or the autocast dtype. auto: bf16 on CUDA where supported, else fp16 (with a
    GradScaler); off on CPU, where bf16 autocast is only faster on CPUs with bf16 units: ask for it with bf16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs CUDA (its GradScaler); use train.amp=bf16 on a CPU, or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16
