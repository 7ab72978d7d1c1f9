"""PyTorch DDP under ``torchrun``: the process group, which rank does I/O, and sums across ranks.

``torchrun --nproc_per_node N -m dynsila.train CONFIG`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the
run is a single process and none of this does anything.
"""

from __future__ import annotations

import os
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
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Context(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return Context(dist.get_rank(), dist.get_world_size(), device)


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
