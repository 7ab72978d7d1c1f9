"""Architectures and their registry. Importing this package registers every model."""

from models import msdnet as _msdnet  # noqa: F401  (registers "msdnet")
from models import timm_exits as _timm_exits  # noqa: F401  (registers "timm_exits")
from models._protocol import MultiExitNetwork
from models._registry import build, list_models, model_constructor, model_parameters, register_model

__all__ = ["MultiExitNetwork", "build", "list_models", "model_constructor", "model_parameters", "register_model"]
