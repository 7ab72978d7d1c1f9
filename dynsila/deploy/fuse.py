"""Inference-time rewrites that keep a model's function: batch-norm folded into the preceding convolution."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) where every ``Conv2d`` directly followed by a ``BatchNorm2d`` absorbs
    it, the batch-norm becoming ``Identity``: inside an ``nn.Sequential``, and in a module that names such pairs
    in ``conv_bn_pairs`` (a block whose forward applies ``bn1`` to ``conv1``'s output alone, as a ResNet block
    does). Outputs equal the original's up to float rounding; fewer passes over memory make inference faster. Not
    for training (the statistics are frozen)."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            pairs = list(zip(names, names[1:], strict=False))
        else:
            pairs = list(getattr(module, "conv_bn_pairs", ()))
        for conv_name, bn_name in pairs:
            conv, bn = module._modules[conv_name], module._modules[bn_name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = nn.Identity()
    return folded
