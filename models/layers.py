"""Small layers shared by the architectures; no training logic."""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class ConvClassifier(nn.Module):
    """MSDNet's classifier: two stride-2 3x3 conv-BN-ReLU, global average pool, then the linear ``fc``."""

    def __init__(self, c_in: int, c_hidden: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(c_in, c_hidden, kernel=3, stride=2),
            ConvBNReLU(c_hidden, c_hidden, kernel=3, stride=2),
            nn.AdaptiveAvgPool2d(1),  # the paper's 2x2 average pool, for any input size
            nn.Flatten(1),
        )
        self.fc = nn.Linear(c_hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PoolClassifier(nn.Module):
    """Global average pool, then the linear ``fc``."""

    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def he_normal_init(m: nn.Module) -> None:
    """He-normal convolutions (fan-out), unit batch-norm, zero linear bias: the initialisation of the MSDNet and
    SkipNet papers' code. Use with ``model.apply``."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
