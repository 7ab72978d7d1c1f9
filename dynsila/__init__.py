"""dynsila: dynamic neural networks with SiLa (Siamese Labels auxiliary learning).

The public API; everything else is reachable through its layer's subpackage (docs/design.md draws the layers):
``dynsila.methods`` (training techniques), ``dynsila.budget`` (exit costs, thresholds), ``dynsila.runs`` (run
directories, checkpoints), ``dynsila.evaluation``, ``dynsila.training`` and ``dynsila.deploy``. Training is
``dynsila.training.train.train(cfg)``; the command lines are the thin modules ``python -m dynsila.train``,
``.evaluate``, ``.infer``, ``.export`` and ``.flops``.

The names below are imported on first use (PEP 562), so that ``import dynsila.deploy.runner`` or
``import dynsila.budget.thresholds`` does not pay for the data, timm and fvcore imports the rest of the package needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynsila.config import Config, load_config
    from dynsila.errors import DynsilaError
    from dynsila.methods.sila import SiameseHead, SiLa, SiLaOutput, prune
    from dynsila.runs.rundir import build_model, load_deploy_model

# public name -> the module that defines it
_PUBLIC = {
    "Config": "dynsila.config",
    "load_config": "dynsila.config",
    "DynsilaError": "dynsila.errors",
    "build_model": "dynsila.runs.rundir",
    "load_deploy_model": "dynsila.runs.rundir",
    "SiLa": "dynsila.methods.sila",
    "SiLaOutput": "dynsila.methods.sila",
    "SiameseHead": "dynsila.methods.sila",
    "prune": "dynsila.methods.sila",
}

__all__ = [
    "Config",
    "DynsilaError",
    "SiLa",
    "SiLaOutput",
    "SiameseHead",
    "build_model",
    "load_config",
    "load_deploy_model",
    "prune",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dynsila' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
