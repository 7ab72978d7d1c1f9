"""Accuracy against cost: accuracy versus MACs of trained runs (``flops_vs_acc``) and SkipNet's alpha knob after
HRL (``skipnet_hrl``)."""
