"""Exits on any timm CNN: the backbone's feature stages become the protocol's stages.

timm describes where each feature level of a network is produced (``feature_info``: module names such as
``layer2`` or ``blocks.4``). The backbone's modules are flattened in forward order and cut after each feature
module, so stage i ends at feature level i; exit k reads feature level ``exit_stages[k]``. Stages after the last
exit are not built, and ``forward(x, upto=k)`` runs nothing past exit k's stage. Works for families whose
feature modules are reached by a plain sequence of children (resnet, efficientnet, mobilenetv3, convnext,
regnet, ...); others fail at construction with a clear error.

Pretrained weights come only from a local file (``pretrained_file``) or the local timm / Hugging Face cache:
nothing is downloaded.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import timm
from torch import nn

from ._protocol import MultiExitNetwork
from ._registry import PretrainedWeightsUnavailable, register_model
from .layers import ConvClassifier, PoolClassifier


def modules_in_forward_order(model: nn.Module, feature_modules: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    """Top-level children of ``model`` in order, expanding the Sequentials that contain a feature module."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if any(f.startswith(full + ".") for f in feature_modules):
                if not isinstance(child, nn.Sequential):
                    raise ValueError(
                        f"cannot cut {type(model).__name__} at its feature modules: {full} is a "
                        f"{type(child).__name__}, not a sequence of stages"
                    )
                yield from walk(child, full + ".")
            else:
                yield full, child

    yield from walk(model, "")


class TimmExits(MultiExitNetwork):
    def __init__(
        self, backbone: nn.Module, exit_stages: Sequence[int], exit_head: str, head_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        info = list(cast(Iterable[dict[str, Any]], backbone.feature_info))  # {"module", "num_chs", ...} per level
        levels = list(exit_stages)
        if not levels or sorted(set(levels)) != levels or levels[0] < 0 or levels[-1] >= len(info):
            raise ValueError(
                f"exit_stages {list(exit_stages)} must be increasing feature levels in "
                f"0..{len(info) - 1} of {type(backbone).__name__}"
            )
        names = [f["module"] for f in info[: exit_stages[-1] + 1]]
        self.stem = nn.Identity()
        self.stages = nn.ModuleList()
        segment: list[tuple[str, nn.Module]] = []
        for name, module in modules_in_forward_order(backbone, names):
            segment.append((name.replace(".", "_"), module))
            if name == names[len(self.stages)]:
                self.stages.append(nn.Sequential(OrderedDict(segment)))
                segment = []
                if len(self.stages) == len(names):
                    break
        if len(self.stages) != len(names):
            raise ValueError(
                f"feature module {names[len(self.stages)]} of {type(backbone).__name__} was not found "
                "among its children in forward order"
            )
        self.exits = nn.ModuleList()
        for level in exit_stages:
            channels = info[level]["num_chs"]
            head = (
                PoolClassifier(channels, num_classes)
                if exit_head == "linear"
                else ConvClassifier(channels, head_channels, num_classes)
            )
            self.exits.append(head)
        self.exit_after = list(exit_stages)


def _pretrained_file(backbone: str) -> str:
    """The locally cached weights for ``backbone`` (Hugging Face hub cache or torch hub cache), never fetched."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    from torch.hub import get_dir

    cfg = get_pretrained_cfg(backbone)
    if cfg is not None and cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(str(cfg.hf_hub_id), filename)
            if isinstance(path, str):
                return path
    if cfg is not None and cfg.url:
        path = Path(get_dir()) / "checkpoints" / Path(str(cfg.url)).name
        if path.is_file():
            return str(path)
    raise PretrainedWeightsUnavailable(
        f"pretrained weights for {backbone} are not in the local timm / Hugging Face cache and dynsila never "
        "downloads; copy the weights file here and set model.pretrained_file=PATH, or set model.pretrained=false"
    )


def create_backbone(backbone: str, pretrained: bool, pretrained_file: str | None, **kwargs: Any) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``), with pretrained weights from ``pretrained_file``
    or the local cache only when asked; ``kwargs`` go to ``timm.create_model``. Shared by the timm families."""
    if backbone not in timm.list_models():
        near = difflib.get_close_matches(backbone, timm.list_models(), n=3)
        raise ValueError(f"unknown timm backbone {backbone!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))
    kwargs |= {"pretrained": pretrained or pretrained_file is not None, "num_classes": 0}
    if kwargs["pretrained"]:
        file = pretrained_file or _pretrained_file(backbone)
        if not Path(file).is_file():
            raise PretrainedWeightsUnavailable(
                f"model.pretrained_file {file} does not exist; give the path of a "
                f"{backbone} weights file (.safetensors, .pth or .bin)"
            )
        kwargs["pretrained_cfg_overlay"] = {"file": file}
    try:
        model = timm.create_model(backbone, **kwargs)
    except RuntimeError as e:
        if kwargs["pretrained"]:
            raise PretrainedWeightsUnavailable(
                f"could not load pretrained weights for {backbone} "
                f"({str(e).splitlines()[0][:120]}); check model.pretrained_file"
            ) from None
        raise
    return model


@register_model("timm_exits")
def timm_exits(
    num_classes: int,
    backbone: str = "resnet18",
    exit_stages: Sequence[int] = (1, 2, 3, 4),
    exit_head: Literal["linear", "conv"] = "linear",
    head_channels: int = 128,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    in_chans: int = 3,
) -> TimmExits:
    """Exits after feature levels ``exit_stages`` (timm's ``out_indices`` numbering) of a timm CNN.

    ``exit_head``: ``linear`` (global pool -> fc) or ``conv`` (MSDNet's two stride-2 convs ``head_channels``
    wide -> pool -> fc). ``pretrained``: load weights from ``pretrained_file`` or the local cache only."""
    model = create_backbone(backbone, pretrained, pretrained_file, in_chans=in_chans)
    return TimmExits(model, list(exit_stages), exit_head, head_channels, num_classes)
