"""Multi-Scale Dense Networks (Huang, Chen, Li, Wu, van der Maaten, Weinberger; ICLR 2018).

The network keeps a feature map at several scales (finest first). Every layer adds ``growth_rate`` new
channels at each scale (times that scale's ``gr_factor``), computed densely from the same scale and, through a
strided conv, from the next finer one. Classifiers read the coarsest scale only. With ``prune: max`` the
finest scale is dropped at regular intervals, each drop followed by a 1x1 transition that shrinks the channels
by ``reduction``. The layers are grouped into ``n_blocks`` blocks; an exit follows every block.

Faithful to the paper's CIFAR and ImageNet configurations: parameter counts and multiply-adds per exit equal
those of the authors' public PyTorch implementation (see tests/test_msdnet.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal, Protocol

import torch
from torch import nn

from ._protocol import DeferredSplit, MultiExitNetwork
from ._registry import register_model
from .layers import ConvBNReLU, ConvClassifier, he_normal_init

Features = list[torch.Tensor]  # one map per kept scale, finest first
PartialFeatures = list[torch.Tensor | None]  # the same with some scales not computed (None)


def _scale(x: PartialFeatures | Features, i: int) -> torch.Tensor:
    t = x[i]
    if t is None:
        raise RuntimeError(f"scale {i} was not computed, but a later scale reads it")
    return t


class DenseConv(nn.Sequential):
    """Optional 1x1 bottleneck (at most ``bn_width * c_out`` wide), then a 3x3 conv, stride 1 or 2."""

    def __init__(self, c_in: int, c_out: int, stride: int, bottleneck: bool, bn_width: int) -> None:
        layers: list[nn.Module] = []
        c_inner = c_in
        if bottleneck:
            c_inner = min(c_in, bn_width * c_out)
            layers.append(ConvBNReLU(c_in, c_inner, kernel=1))
        layers.append(ConvBNReLU(c_inner, c_out, kernel=3, stride=stride))
        super().__init__(*layers)


# --- The first layer: build the multi-scale pyramid from the image -------------------------------------------


class MultiScaleStem(nn.Module):
    """CIFAR: one 3x3 conv at full resolution. ImageNet: 7x7 stride-2 conv + 3x3 stride-2 max-pool.
    Every coarser scale is a stride-2 3x3 conv of the previous one."""

    def __init__(self, widths: list[int], stem: Literal["cifar", "imagenet"], in_chans: int = 3) -> None:
        super().__init__()
        first: nn.Module
        if stem == "cifar":
            first = ConvBNReLU(in_chans, widths[0], kernel=3)
        else:
            first = nn.Sequential(
                nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        self.scales = nn.ModuleList([first])
        for c_in, c_out in itertools.pairwise(widths):
            self.scales.append(ConvBNReLU(c_in, c_out, kernel=3, stride=2))

    def forward(self, x: torch.Tensor) -> Features:
        features = []
        for conv in self.scales:
            x = conv(x)
            features.append(x)
        return features


# --- One multi-scale dense layer ------------------------------------------------------------------------------


class ScaleUpdate(nn.Module):
    """New features at one scale: a regular conv of that scale, plus (except at the finest kept scale) a strided
    conv of the next finer scale, each giving half the growth. Concatenated to the scale's existing maps."""

    def __init__(
        self, c_same: int, c_finer: int | None, growth: int, bottleneck: bool, bn_same: int, bn_finer: int
    ) -> None:
        super().__init__()
        if c_finer is None:
            self.down = None
            self.same = DenseConv(c_same, growth, 1, bottleneck, bn_same)
        else:
            self.down = DenseConv(c_finer, growth // 2, 2, bottleneck, bn_finer)
            self.same = DenseConv(c_same, growth // 2, 1, bottleneck, bn_same)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        if self.down is None or finer is None:
            return torch.cat([same, self.same(same)], dim=1)
        return torch.cat([same, self.down(finer), self.same(same)], dim=1)


class MultiScaleDenseLayer(nn.Module):
    """Maps ``in_scales`` feature maps to ``out_scales`` (one fewer when the finest scale is dropped)."""

    def __init__(
        self,
        width: int,
        growth_rate: int,
        gr_factor: list[int],
        bn_factor: list[int],
        bottleneck: bool,
        in_scales: int,
        out_scales: int,
    ) -> None:
        super().__init__()
        n_scales = len(gr_factor)
        self.drops_finest = in_scales > out_scales
        first = n_scales - out_scales  # index of the finest scale this layer outputs
        self.updates = nn.ModuleList()
        for s in range(first, n_scales):
            has_finer = s > first or self.drops_finest
            self.updates.append(
                ScaleUpdate(
                    c_same=width * gr_factor[s],
                    c_finer=width * gr_factor[s - 1] if has_finer else None,
                    growth=growth_rate * gr_factor[s],
                    bottleneck=bottleneck,
                    bn_same=bn_factor[s],
                    bn_finer=bn_factor[s - 1] if has_finer else 0,
                )
            )

    def forward(self, x: Features) -> Features:
        if self.drops_finest:
            return [update(x[i + 1], x[i]) for i, update in enumerate(self.updates)]
        return [update(x[i], x[i - 1] if i > 0 else None) for i, update in enumerate(self.updates)]

    # One output scale at a time, for lazy early exit (``DeferredScales``): ``forward`` equals
    # ``[output_scale(x, i) for i in range(num_outputs)]``.

    @property
    def num_outputs(self) -> int:
        return len(self.updates)

    def inputs_of(self, i: int) -> tuple[int, ...]:
        """The input scales output scale ``i`` reads: the same scale and the next finer one."""
        if self.drops_finest:
            return (i, i + 1)
        return (i - 1, i) if i > 0 else (i,)

    def scale_module(self, i: int) -> nn.Module:
        """The module that computes output scale ``i``."""
        return self.updates[i]

    def output_scale(self, x: PartialFeatures, i: int) -> torch.Tensor:
        """Output scale ``i`` alone, from the input scales it reads (the others may be None)."""
        if self.drops_finest:
            return self.updates[i](_scale(x, i + 1), _scale(x, i))
        return self.updates[i](_scale(x, i), _scale(x, i - 1) if i > 0 else None)


class Transition(nn.Module):
    """1x1 conv per kept scale, shrinking ``width`` to ``floor(reduction * width)`` (times the scale factor)."""

    def __init__(self, c_in: int, c_out: int, factors: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList([ConvBNReLU(c_in * f, c_out * f, kernel=1) for f in factors])

    def forward(self, x: Features) -> Features:
        return [conv(t) for conv, t in zip(self.convs, x, strict=True)]

    @property
    def num_outputs(self) -> int:
        return len(self.convs)

    def inputs_of(self, i: int) -> tuple[int, ...]:
        return (i,)

    def scale_module(self, i: int) -> nn.Module:
        return self.convs[i]

    def output_scale(self, x: PartialFeatures, i: int) -> torch.Tensor:
        return self.convs[i](_scale(x, i))


# --- Lazy early exit: what an exit needs now, what only later stages need ------------------------------------


class ScaleLayer(Protocol):
    """A layer of a stage computed one output scale at a time (``MultiScaleDenseLayer``, ``Transition``)."""

    @property
    def num_outputs(self) -> int: ...

    def inputs_of(self, i: int) -> tuple[int, ...]: ...

    def scale_module(self, i: int) -> nn.Module: ...

    def output_scale(self, x: PartialFeatures, i: int) -> torch.Tensor: ...

    def __call__(self, x: Features) -> Features: ...


class DeferredScales(DeferredSplit):
    """An MSDNet stage split for early exit. The exit after the stage reads only the coarsest scale of its last
    layer, which reads the two coarsest scales one layer earlier, three two layers earlier, and so on: the finer
    scales of the last few layers are computed only for later stages. ``for_exits`` computes the exit's
    dependency path (every layer whole up to the first that is not needed whole, then only the needed scales);
    ``complete`` computes the rest, for the samples that go on. ``pending`` holds only what ``complete`` reads:
    the inputs of the missing scales and the computed scales that are part of the stage's output."""

    def __init__(self, layers: Sequence[ScaleLayer]) -> None:
        needed: list[set[int]] = []  # per layer: the output scales the exit path needs
        wanted = {layers[-1].num_outputs - 1}
        for layer in reversed(layers):
            needed.insert(0, wanted)
            wanted = {s for i in wanted for s in layer.inputs_of(i)}
        start = next(j for j, layer in enumerate(layers) if len(needed[j]) < layer.num_outputs)
        self.whole, self.window, self.needed = list(layers[:start]), list(layers[start:]), needed[start:]
        # per window layer: the input scales its missing outputs read (what `complete` needs of its input)
        self.read = [
            {s for i in range(layer.num_outputs) if i not in n for s in layer.inputs_of(i)}
            for layer, n in zip(self.window, self.needed, strict=True)
        ]

    def for_exits(self, state: Features) -> tuple[PartialFeatures, tuple[PartialFeatures, list[PartialFeatures]]]:
        for layer in self.whole:
            state = layer(state)
        x: PartialFeatures = list(state)
        carried_input = [t if i in self.read[0] else None for i, t in enumerate(x)]
        carried: list[PartialFeatures] = []
        for j, (layer, needed) in enumerate(zip(self.window, self.needed, strict=True)):
            x = [layer.output_scale(x, i) if i in needed else None for i in range(layer.num_outputs)]
            keep = set(range(layer.num_outputs)) if j == len(self.window) - 1 else self.read[j + 1]
            carried.append([t if i in keep else None for i, t in enumerate(x)])
        return x, (carried_input, carried)

    def complete(self, pending: tuple[PartialFeatures, list[PartialFeatures]]) -> Features:
        x, carried = pending
        for layer, needed, computed in zip(self.window, self.needed, carried, strict=True):
            x = [
                t if t is not None or i in needed else layer.output_scale(x, i)  # computed, or not read later
                for i, t in enumerate(computed)
            ]
        return [_scale(x, i) for i in range(len(x))]

    def deferred_modules(self) -> list[nn.Module]:
        return [
            layer.scale_module(i)
            for layer, needed in zip(self.window, self.needed, strict=True)
            for i in range(layer.num_outputs)
            if i not in needed
        ]


# --- Classifier on the coarsest scale -------------------------------------------------------------------------


class CoarsestScaleClassifier(ConvClassifier):
    """Two stride-2 3x3 convs on the coarsest map, global average pool, then the linear ``fc``."""

    def forward(self, x: Features) -> torch.Tensor:  # type: ignore[override]  # reads the list of scales
        return super().forward(x[-1])


# --- The network ----------------------------------------------------------------------------------------------


def layers_per_block(n_blocks: int, step: int, base: int, stepmode: str) -> list[int]:
    """Block 1 has ``base`` layers; later blocks ``step`` each (even) or ``step * i + 1`` (lin_grow)."""
    return [base] + [step if stepmode == "even" else step * i + 1 for i in range(1, n_blocks)]


def scales_of_layer(layer: int, n_layers: int, n_scales: int, prune: str) -> tuple[int, int]:
    """(in_scales, out_scales) of the 1-based ``layer``. ``max``: drop the finest scale every
    ``ceil(n_layers / n_scales)`` layers. ``min``: keep only the scales later layers still need."""
    if prune == "max":
        interval = math.ceil(n_layers / n_scales)
        return (n_scales - max(0, layer - 2) // interval, n_scales - (layer - 1) // interval)
    return (min(n_scales, n_layers - layer + 2), min(n_scales, n_layers - layer + 1))


class MSDNet(MultiExitNetwork):
    def __init__(
        self,
        num_classes: int,
        n_blocks: int,
        step: int,
        stepmode: str,
        base: int,
        n_channels: int,
        growth_rate: int,
        gr_factor: list[int],
        bn_factor: list[int],
        prune: str,
        reduction: float,
        bottleneck: bool,
        stem: Literal["cifar", "imagenet"],
        head_channels: int | None,
        in_chans: int,
    ) -> None:
        super().__init__()
        if len(bn_factor) != len(gr_factor):
            raise ValueError(f"bn_factor {bn_factor} and gr_factor {gr_factor} need one entry per scale")
        n_scales = len(gr_factor)
        steps = layers_per_block(n_blocks, step, base, stepmode)
        n_layers = sum(steps)

        self.stem = MultiScaleStem([n_channels * f for f in gr_factor], stem, in_chans)
        self.stages = nn.ModuleList()
        self.exits = nn.ModuleList()
        width, layer = n_channels, 0
        for n_block_layers in steps:
            block: list[nn.Module] = []
            for _ in range(n_block_layers):
                layer += 1
                in_scales, out_scales = scales_of_layer(layer, n_layers, n_scales, prune)
                block.append(
                    MultiScaleDenseLayer(width, growth_rate, gr_factor, bn_factor, bottleneck, in_scales, out_scales)
                )
                width += growth_rate
                transition_here = (
                    in_scales > out_scales if prune == "max" else layer in (n_layers // 3, 2 * n_layers // 3)
                )
                if transition_here and reduction > 0:
                    reduced = math.floor(reduction * width)
                    block.append(Transition(width, reduced, gr_factor[n_scales - out_scales :]))
                    width = reduced
            self.stages.append(nn.Sequential(*block))
            c_coarsest = width * gr_factor[-1]
            c_hidden = head_channels or (128 if stem == "cifar" else c_coarsest)
            self.exits.append(CoarsestScaleClassifier(c_coarsest, c_hidden, num_classes))
        self.exit_after = list(range(n_blocks))
        self.apply(he_normal_init)

    def init_exit(self, module: nn.Module) -> None:
        module.apply(he_normal_init)

    def deferred_split(self, stage_index: int) -> DeferredScales | None:
        """The stage's finer scales that only later exits read (see ``DeferredScales``); None when its exit
        needs all of it (a stage whose last layer keeps a single scale)."""
        stage = self.stages[stage_index]
        assert isinstance(stage, nn.Sequential)
        layers = [m for m in stage if isinstance(m, MultiScaleDenseLayer | Transition)]
        assert len(layers) == len(stage)
        return DeferredScales(layers) if layers[-1].num_outputs > 1 else None


@register_model("msdnet")
def msdnet(
    num_classes: int,
    n_blocks: int = 5,
    step: int = 4,
    stepmode: Literal["even", "lin_grow"] = "even",
    base: int = 4,
    n_channels: int = 32,
    growth_rate: int = 16,
    gr_factor: Sequence[int] = (1, 2, 4, 4),
    bn_factor: Sequence[int] = (1, 2, 4, 4),
    prune: Literal["max", "min"] = "max",
    reduction: float = 0.5,
    bottleneck: bool = True,
    stem: Literal["cifar", "imagenet"] = "imagenet",
    head_channels: int | None = None,
    in_chans: int = 3,
) -> MSDNet:
    """MSDNet; the defaults are the paper's ImageNet step-4 network. ``head_channels``: width of each exit's
    convs (None: 128 on CIFAR, the coarsest scale's width on ImageNet, as in the paper)."""
    return MSDNet(
        num_classes,
        n_blocks,
        step,
        stepmode,
        base,
        n_channels,
        growth_rate,
        list(gr_factor),
        list(bn_factor),
        prune,
        reduction,
        bottleneck,
        stem,
        head_channels,
        in_chans,
    )
