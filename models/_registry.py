"""Name -> constructor table, so configs say ``model.name: msdnet`` and nothing imports model classes.

The constructor's signature *is* the schema of the config's ``model:`` section: its keyword parameters, their
annotations and defaults are what ``dynsila.config`` validates against.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: make ``fn`` buildable as ``models.build(name, ...)``."""

    def add(fn: F) -> F:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return add


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_constructor(name: str) -> Callable[..., nn.Module]:
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
