"""Measuring a trained network: accuracy per exit and under budgeted early exit (``evaluate``) and the typed
schema of ``eval.json`` (``report``). May import everything below it (foundation, ``dynsila.models``,
``dynsila.methods``, ``dynsila.budget``, ``dynsila.runs``); never training or deployment, which build on it.
"""
