"""What a run directory holds and how a model is rebuilt from it: atomic writes and weights-only checkpoints
(``checkpoint``), the directory's file names, config, metrics and the model builder (``rundir``). May import the
foundation, ``dynsila.models``, ``dynsila.methods`` and ``dynsila.budget``; never evaluation, training or deployment,
which all read runs through this package.
"""
