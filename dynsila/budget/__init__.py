"""What an exit costs and when to take it: per-exit multiply-accumulates and parameters (``flops``, through
fvcore) and the confidence criteria and threshold fitting of budgeted early exit (``thresholds``, torch alone).
May import the foundation, ``dynsila.models`` and ``dynsila.methods`` (a model is counted after its training-only
heads are pruned); not run directories, evaluation, training or deployment.
"""
