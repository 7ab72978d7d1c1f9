"""Architectures and their registry. Importing this package registers every model."""

from . import msdnet as _msdnet  # noqa: F401  (registers "msdnet")
from . import skipnet as _skipnet  # noqa: F401  (registers "skipnet")
from . import timm_exits as _timm_exits  # noqa: F401  (registers "timm_exits")
from ._protocol import DynamicOutput, MultiExitNetwork, exit_logits
from ._registry import build, list_models, model_constructor, model_parameters, register_model
from .skipnet import gated_body

__all__ = [
    "DynamicOutput",
    "MultiExitNetwork",
    "exit_logits",
    "gated_body",
    "build",
    "list_models",
    "model_constructor",
    "model_parameters",
    "register_model",
]
