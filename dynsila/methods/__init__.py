"""Training techniques: what a multi-exit network learns from besides each exit's cross-entropy.

SiLa (Siamese Labels heads, ``sila``), self-distillation (``self_distill``), deep mutual learning (``dml``) and
SkipNet's hybrid reinforcement learning (``hrl``), and ``losses``, which turns a batch's outputs into the named loss
terms a training step sums. May import the foundation (``dynsila.errors``, ``dynsila.config``, ``dynsila.data``) and
``dynsila.models``; nothing that trains, evaluates, stores or deploys.
"""
