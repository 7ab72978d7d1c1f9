"""The training loop (``train``) and its multi-process setup under torchrun (``distributed``). May import
every lower layer (foundation, ``dynsila.models``, ``dynsila.methods``, ``dynsila.budget``, ``dynsila.runs``,
``dynsila.evaluation``: the loop evaluates its best checkpoint); never ``dynsila.deploy``, its sibling.
"""
