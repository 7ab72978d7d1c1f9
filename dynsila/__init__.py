"""dynsila: dynamic neural networks with SiLa (Siamese Labels auxiliary learning).

The public API; everything else is reachable through its module. Training is ``dynsila.train.train(cfg)``
(kept out of this namespace so that ``python -m dynsila.train`` runs the module cleanly).
"""

from dynsila.config import Config, load_config
from dynsila.errors import DynsilaError
from dynsila.rundir import build_model, load_deploy_model
from dynsila.sila import SiameseHead, SiLa, SiLaOutput, prune

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
