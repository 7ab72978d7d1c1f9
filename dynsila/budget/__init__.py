"""What an exit costs and when to take it: per-exit multiply-accumulates and parameters (``flops``, through
fvcore), the confidence criteria and threshold fitting of budgeted early exit (``thresholds``, torch alone) and
per-exit temperature scaling fitted on validation (``calibration``, torch alone).
May import the foundation, ``dynsila.models`` and ``dynsila.methods`` (a model is counted after its training-only
heads are pruned); not run directories, evaluation, training or deployment.
"""
