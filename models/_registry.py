"""Name -> constructor table, so configs say ``model.name: msdnet`` and nothing imports model classes.

The constructor's signature *is* the schema of the config's ``model:`` section: its keyword parameters, their
annotations and defaults are what ``dynsila.config`` validates against.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# name -> module (relative to this package) that registers it when imported: families with a heavy dependency
# (timm) are imported on first use, so importing the architectures stays cheap for code that never builds them
_DEFERRED: dict[str, str] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested pretrained weights are not on this machine (here, not in timm_exits: catching it must not
    import timm)."""


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: make ``fn`` buildable as ``models.build(name, ...)``."""

    def add(fn: F) -> F:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return add


def register_deferred(name: str, module: str) -> None:
    """Make ``name`` buildable by importing ``module`` (e.g. ``".timm_exits"``) the first time it is asked for."""
    _DEFERRED[name] = module


def list_models() -> list[str]:
    return sorted({*_MODELS, *_DEFERRED})


def model_constructor(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS and name in _DEFERRED:
        importlib.import_module(_DEFERRED[name], __package__)  # registers it
    try:
        return _MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def model_parameters(name: str) -> dict[str, inspect.Parameter]:
    """The keyword parameters a model's constructor accepts (``num_classes`` included)."""
    return dict(inspect.signature(model_constructor(name)).parameters)


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. ``build("msdnet", num_classes=100, n_blocks=7, step=2)``."""
    return model_constructor(name)(**kwargs)
