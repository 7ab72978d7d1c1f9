"""The training loop (``train``): every run, every technique through the technique table, under torchrun too
(``dynsila.distributed``). May import every lower layer (foundation, ``dynsila.models``, ``dynsila.methods``,
``dynsila.budget``, ``dynsila.runs``, ``dynsila.evaluation``); never ``dynsila.deploy``, its sibling.
"""
