"""Training techniques: what a multi-exit network learns from besides each exit's cross-entropy.

``technique`` is the interface and the one table; each technique is one module that registers itself: SiLa
(Siamese Labels heads, ``sila``), self-distillation (``self_distill``), SkipNet's gate stages and terms (``hrl``),
deep mutual learning (``dml``), and two that change the deploy network through ``exit_chain``: IMTA's
inline subnetwork collaboration and one-for-all distillation (``imta``), Zero Time Waste's cascading connections
and ensembles (``ztw``); and learning to weight samples, meta-learned per-sample, per-exit weights (``l2w``).
``losses`` turns a batch's outputs into the named terms a training step sums.
Importing the package registers the built-in techniques (so do their entry points, ``dynsila.techniques``, when a
config is loaded). May import the foundation (``dynsila.errors``, ``dynsila.config``, ``dynsila.data``) and
``dynsila.models``; nothing that trains, evaluates, stores or deploys.
"""

from dynsila.methods import (  # noqa: F401  (each registers its technique)
    dml,
    gradient_equilibrium,
    hrl,
    imta,
    l2w,
    self_distill,
    sila,
    ztw,
)
