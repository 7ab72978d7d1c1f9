"""Costs of the deploy model, per exit: parameters (and, with the evaluator, multiply-adds)."""

from __future__ import annotations

from torch import nn

from models import MultiExitNetwork


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def exit_params(model: MultiExitNetwork) -> list[int]:
    """Parameters needed to reach exit k: stem + stages up to k + that exit's classifier (exit only)."""
    stem = count_params(model.stem)
    stage_cum, total = [], stem
    for stage in model.stages:
        total += count_params(stage)
        stage_cum.append(total)
    return [stage_cum[model.exit_after[k]] + count_params(e) for k, e in enumerate(model.exits)]


def exit_params_cumulative(model: MultiExitNetwork) -> list[int]:
    """Parameters of everything up to exit k, classifiers 1..k included (what an early-exit run holds)."""
    only = exit_params(model)
    heads = [count_params(e) for e in model.exits]
    return [only[k] + sum(heads[:k]) for k in range(len(only))]
