"""Exit policies: when a sample leaves a multi-exit network, decided on its exits' logits.

``rules`` executes a fitted policy exit by exit (numpy alone, so the ONNX runner can import it); the other modules
fit one policy each on validation logits (``quotas``, ``calibrated``, ``patience``, ``product``, ``learned``,
``risk``), ``table`` maps names to them, ``sweep`` computes every policy's budgeted curve. May import the
foundation and ``dynsila.budget``; never run directories, evaluation or deployment, which build on it. This
``__init__`` imports nothing, so importing ``dynsila.policies.rules`` pulls in no torch.
"""
