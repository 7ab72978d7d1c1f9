"""Architectures and their registry. Importing this package registers every model; ``timm_exits`` and
``vit_exits`` (which need timm) are imported the first time it is built or its parameters are asked for."""

from . import msdnet as _msdnet  # noqa: F401  (registers "msdnet")
from . import skipnet as _skipnet  # noqa: F401  (registers "skipnet")
from ._protocol import DeferredSplit, DynamicOutput, GatedBody, MultiExitNetwork, exit_logits, gated_body
from ._registry import (
    PretrainedWeightsUnavailable,
    build,
    list_models,
    model_constructor,
    model_parameters,
    register_deferred,
    register_model,
)

register_deferred("timm_exits", ".timm_exits")
register_deferred("vit_exits", ".vit_exits")

__all__ = [
    "DeferredSplit",
    "DynamicOutput",
    "GatedBody",
    "MultiExitNetwork",
    "PretrainedWeightsUnavailable",
    "exit_logits",
    "gated_body",
    "build",
    "list_models",
    "model_constructor",
    "model_parameters",
    "register_deferred",
    "register_model",
]
