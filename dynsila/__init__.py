"""dynsila: dynamic neural networks with SiLa (Siamese Labels auxiliary learning).

The public API; everything else is reachable through its module. Training is ``dynsila.train.train(cfg)``
(kept out of this namespace so that ``python -m dynsila.train`` runs the module cleanly).
"""

import os

# Early exit shrinks batches to every size between 1 and the batch size, and oneDNN compiles a convolution
# primitive per input shape. Its default cache (1,024 primitives) then thrashes: MSDNet's ~180 convolutions x
# a few dozen batch sizes. Read lazily at the first convolution, so set here, before any runs; a value the user
# set wins. Measured in benchmarks/results/early_exit_speed.md.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

from dynsila.config import Config, load_config  # noqa: E402 - after the oneDNN setting on purpose
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
