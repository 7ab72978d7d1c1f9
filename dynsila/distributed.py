"""PyTorch DDP under ``torchrun``: the process group, which rank does I/O, and sums across ranks.

``torchrun --nproc_per_node N -m dynsila.train CONFIG`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the
run is a single process and none of this does anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dynsila.errors import ConfigError


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str) -> Context:
    """Join the torchrun process group if there is one: NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    launcher = launcher_environment(os.environ)
    if launcher is None:
        return Context(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = launcher["LOCAL_RANK"]
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), device)


LAUNCHER_HINT = "launch with torchrun --nproc_per_node N -m dynsila.train CONFIG, or unset the variables"


def launcher_environment(env: Mapping[str, str]) -> dict[str, int] | None:
    """torchrun's variables, checked before any process group is made (a wrong one hangs or fails deep inside
    torch.distributed): None without RANK and WORLD_SIZE; else their values, or one line naming the variable."""
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return None
    values = {name: _whole_number(env, name, low) for name, low in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0))}
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} for WORLD_SIZE={world}; {LAUNCHER_HINT}")
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # torchrun sets both, for one process too
        if not env.get(name, "").strip():
            raise ConfigError(f"WORLD_SIZE={world} but {name} is not set; {LAUNCHER_HINT}")
    port = _whole_number(env, "MASTER_PORT", 1)
    if port > 65535:
        raise ConfigError(f"MASTER_PORT={port} is not a port (1..65535); {LAUNCHER_HINT}")
    return values


def _whole_number(env: Mapping[str, str], name: str, low: int) -> int:
    text = env.get(name, "0" if name == "LOCAL_RANK" else None)
    if text is None:
        other = "WORLD_SIZE" if name == "RANK" else "RANK"
        raise ConfigError(f"{other} is set but {name} is not; {LAUNCHER_HINT}")
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number; {LAUNCHER_HINT}") from None
    if value < low:
        raise ConfigError(f"{name}={value} must be at least {low}; {LAUNCHER_HINT}")
    return value


def cleanup(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def sum_across_ranks(values: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Element-wise sum of a float tensor over all ranks (the tensor itself on a single process)."""
    if not ctx.enabled:
        return values
    reduced = values.detach().to(ctx.device, torch.float64).clone()
    dist.all_reduce(reduced)
    return reduced.cpu()


def broadcast_flag(flag: bool, ctx: Context) -> bool:
    """Rank 0's value of ``flag`` on every rank (for decisions only rank 0 can make, e.g. a failed save)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """``obj`` from every rank, in rank order (for per-rank RNG states in checkpoints)."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
