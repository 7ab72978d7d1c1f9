"""Everything a run writes to disk: atomic files, checkpoints (``weights_only`` loads), deploy weights.

A write goes to a temporary file in the same folder, is flushed and fsynced, then renamed over the target, so a
kill or a full disk during a save leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from dynsila.errors import CheckpointError
from dynsila.runtime import set_rng_state

CHECKPOINT_FORMAT = "dynsila-checkpoint-1"


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        previous = "the previous file is intact" if path.exists() else "nothing was written"
        raise CheckpointError(
            f"could not write {path} ({e.strerror or e}); {previous}; free disk space or choose another out_dir"
        ) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Atomically save a plain dict of tensors, numbers, strings and lists (``weights_only`` loadable)."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **checkpoint}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a dynsila checkpoint with ``torch.load(weights_only=True)``; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the run directory or train first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"{path} needs pickle to load (it stores Python objects, not only tensors); "
                "dynsila loads with weights_only=True only: re-save it as a dict of tensors"
            ) from None
        raise CheckpointError(
            f"{path} is corrupt ({type(e).__name__}); use another checkpoint (best.pt or last.pt) or retrain"
        ) from None
    except Exception as e:  # a damaged zip fails in many ways (OSError, IndexError, RuntimeError, ...): all one
        detail = (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise CheckpointError(
            f"{path} is corrupt or truncated ({detail}); use another checkpoint (best.pt or last.pt) or retrain"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a dynsila checkpoint (no format tag {CHECKPOINT_FORMAT!r}); "
            "pass a last.pt or best.pt written by dynsila.train"
        )
    return checkpoint


def load_weights(
    model: nn.Module, state: dict[str, torch.Tensor], source: str | Path, may_lack: Sequence[str] = ()
) -> None:
    """``model.load_state_dict`` that names the mismatch (a checkpoint of another architecture) in one line.
    Keys under a module named in ``may_lack`` may be absent from ``state``; they keep their values."""
    own = model.state_dict()
    prefixes = tuple(f"{name}." for name in may_lack)
    missing = [k for k in own if k not in state and not (prefixes and k.startswith(prefixes))]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", reshaped)):
            if keys:
                parts.append(f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(
            f"{source} holds weights of another architecture: {'; '.join(parts)}; rebuild the "
            "model from the config saved with it (config.yaml in its run directory)"
        )
    model.load_state_dict(state, strict=not prefixes)


def save_deploy(path: Path, model: nn.Module, config_yaml: str) -> None:
    """Write the pruned model's weights as safetensors, with the config that rebuilds it in the metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = safetensors_save(state, metadata={"format": CHECKPOINT_FORMAT, "config": config_yaml})
    atomic_write(path, lambda f: f.write(data))


def read_deploy(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, config YAML) of a deploy file written by ``save_deploy``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"deploy weights {path} not found; train a run first (it writes deploy.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path} is not a readable safetensors file ({detail}); re-export it") from None
    if metadata.get("format") != CHECKPOINT_FORMAT or not isinstance(metadata.get("config"), str):
        raise CheckpointError(
            f"{path} carries no dynsila config in its metadata (format {CHECKPOINT_FORMAT!r}); write it with "
            "dynsila.train (deploy.safetensors in the run directory)"
        )
    return state, metadata["config"]


def training_checkpoint(
    module: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, progress: dict[str, Any]
) -> dict[str, Any]:
    """What ``last.pt`` and ``best.pt`` hold: weights, optimizer, scaler (when on), and ``progress`` (epoch, step,
    best score and epoch, every rank's random-generator state, world size, config text)."""
    scaler_state = scaler.state_dict() if scaler.is_enabled() else {}
    return {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler_state, **progress}


def restore_training(
    path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rank: int,
    world_size: int,
) -> tuple[int, float, int]:
    """Load ``last.pt`` into the training module, optimizer, scaler and this rank's random generators; returns
    (finished epochs, best score, best epoch). A checkpoint missing any of it is refused in one line."""
    checkpoint = load_checkpoint(path)
    try:
        load_weights(module, checkpoint["model"], path)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint["rng"]
        set_rng_state(states[rank] if len(states) == world_size else states[0])
        return int(checkpoint["epoch"]), float(checkpoint["best_score"]), int(checkpoint["best_epoch"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        detail = f"no entry {e}" if isinstance(e, KeyError) else (str(e).splitlines() or [type(e).__name__])[0][:80]
        raise CheckpointError(
            f"{path} is not a whole training checkpoint ({detail}); resume from a last.pt written by dynsila.train "
            "or start again without resume=true"
        ) from None

