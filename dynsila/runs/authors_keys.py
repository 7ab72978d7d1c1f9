"""Where every dynsila weight lives in the MSDNet and SkipNet authors' public PyTorch code.

Written from reading their model definitions (MSDNet-PyTorch ``models/msdnet.py``; SkipNet ``cifar/models.py`` and
``imagenet/models.py``), not from their code. A table is built from the dynsila model itself: each of its
state-dict keys is translated to the authors' name, so the table covers exactly the network the config builds.

Layout differences the table records:

- SkipNet registers each projection shortcut twice (``groupG_layerI.downsample`` and ``groupG_dsI``): the second
  name is an *alias*, the same tensor under another key.
- SkipNet builds a gate after the last block that nothing reads (``unused``); dynsila leaves it out.
- SkipNet's ImageNet recurrent gate projects the LSTM output with a 1x1 convolution (``control.proj``, weight
  ``1 x H x 1 x 1``) where the CIFAR code and dynsila use a linear layer (``1 x H``): the same map on a 1 x 1 input;
  the table marks those keys ``reshaped``.
- Checkpoints saved before PyTorch 0.4.1 have no batch-norm ``num_batches_tracked`` counters (``optional``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from dynsila.models.layers import ConvBNReLU
from dynsila.models.msdnet import MSDNet
from dynsila.models.skipnet import FeedforwardGateI, FeedforwardGateII, RecurrentGate, SkipNet

BN_COUNTER = "num_batches_tracked"


@dataclass
class KeyTable:
    """dynsila key -> authors' key, and the authors' keys that are not a dynsila weight of their own."""

    to_authors: dict[str, str]
    reshaped: set[str] = field(default_factory=set)  # dynsila keys whose authors tensor is a 1x1 conv weight
    aliases: dict[str, str] = field(default_factory=dict)  # authors key -> the authors key it duplicates
    # authors key nothing reads -> the dynsila key of a tensor of the same shape (to write it back)
    unused: dict[str, str] = field(default_factory=dict)

    @property
    def from_authors(self) -> dict[str, str]:
        return {a: o for o, a in self.to_authors.items()}


# --- MSDNet ----------------------------------------------------------------------------------------------------

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _msdnet_rules(stem: str) -> list[Rule]:
    """Regex rules, dynsila key -> authors key. The authors' first block holds the stem at index 0, so the layers
    of dynsila's stage 0 sit one index later; their ConvBN keeps conv, BN, ReLU in one flat ``net`` (bottleneck
    conv at 0/1, 3x3 conv at 3/4), where dynsila nests one ConvBNReLU per conv (``a.b`` -> ``3a + b``)."""

    def layer(m: re.Match[str]) -> str:
        stage, index = int(m["stage"]), int(m["layer"])
        return f"blocks.{stage}.{index + (stage == 0)}"

    first = "blocks.0.0.layers.0." + ("net." if stem == "cifar" else "")
    conv = {"down": "conv_down", "same": "conv_normal"}
    return [
        (re.compile(r"stem\.scales\.0\.(?P<rest>.+)"), lambda m: first + m["rest"]),
        (
            re.compile(r"stem\.scales\.(?P<j>\d+)\.(?P<rest>.+)"),
            lambda m: f"blocks.0.0.layers.{m['j']}.net.{m['rest']}",
        ),
        (
            re.compile(
                r"stages\.(?P<stage>\d+)\.(?P<layer>\d+)\.updates\.(?P<k>\d+)\.(?P<kind>down|same)"
                r"\.(?P<a>\d+)\.(?P<b>\d+)\.(?P<rest>.+)"
            ),
            lambda m: f"{layer(m)}.layers.{m['k']}.{conv[m['kind']]}.net.{3 * int(m['a']) + int(m['b'])}.{m['rest']}",
        ),
        (
            re.compile(r"stages\.(?P<stage>\d+)\.(?P<layer>\d+)\.convs\.(?P<k>\d+)\.(?P<rest>.+)"),
            lambda m: f"{layer(m)}.m.{m['k']}.net.{m['rest']}",
        ),
        (
            re.compile(r"exits\.(?P<i>\d+)\.features\.(?P<a>\d+)\.(?P<rest>.+)"),
            lambda m: f"classifier.{m['i']}.m.{m['a']}.net.{m['rest']}",
        ),
        (re.compile(r"exits\.(?P<i>\d+)\.fc\.(?P<rest>.+)"), lambda m: f"classifier.{m['i']}.linear.{m['rest']}"),
    ]


def _translate(key: str, rules: list[Rule]) -> str:
    for pattern, name in rules:
        m = pattern.fullmatch(key)
        if m:
            return name(m)
    raise ValueError(f"dynsila key {key} has no place in the authors' layout (a training-only head?)")


def msdnet_table(model: MSDNet) -> KeyTable:
    scales = model.stem.scales
    assert isinstance(scales, nn.ModuleList)
    stem = "cifar" if isinstance(scales[0], ConvBNReLU) else "imagenet"
    rules = _msdnet_rules(stem)
    return KeyTable({k: _translate(k, rules) for k in model.state_dict()})


# --- SkipNet ---------------------------------------------------------------------------------------------------

# per gate kind: dynsila's sub-module prefix -> the authors' (their gate modules keep flat attribute names)
GATE_NAMES = {
    "rnn": {"embedding.embed.": "1."},  # nn.Sequential(AvgPool2d, Conv2d 1x1 to the embedding)
    "ffgate1": {"net.1.": "conv1.", "net.2.": "bn1.", "net.4.": "conv2.", "net.5.": "bn2.", "logits.": "linear_layer."},
    "ffgate2": {"net.0.": "conv1.", "net.1.": "bn1.", "logits.": "linear_layer."},
}
SKIPNET_TOP = {"stem.0.": "conv1.", "stem.1.": "bn1.", "controller.": "control.", "exits.0.fc.": "fc."}


def _replace_prefix(rest: str, names: dict[str, str]) -> str:
    for ours, theirs in names.items():
        if rest.startswith(ours):
            return theirs + rest[len(ours) :]
    raise ValueError(f"{rest} has no place in the authors' layout")


def skipnet_block_names(blocks_per_group: list[int]) -> list[tuple[int, int]]:
    """(group, index) of every residual block in order, 1-based groups as the authors name them."""
    return [(g + 1, i) for g, n in enumerate(blocks_per_group) for i in range(n)]


def skipnet_layout(model: SkipNet) -> tuple[list[int], str, str]:
    """(blocks per group, gate kind, stem) read off the network: a group starts at every strided block."""
    blocks = list(model.body.blocks)
    strides = [max(m.stride[0] for m in b.modules() if isinstance(m, nn.Conv2d)) for b in blocks]
    starts = [0] + [k for k, s in enumerate(strides) if s > 1] + [len(blocks)]
    per_group = [b - a for a, b in itertools.pairwise(starts)]
    gate = {RecurrentGate: "rnn", FeedforwardGateI: "ffgate1", FeedforwardGateII: "ffgate2"}[type(model.body.gates[0])]
    assert isinstance(model.stem, nn.Sequential)
    stem = "imagenet" if isinstance(model.stem[-1], nn.MaxPool2d) else "cifar"
    return per_group, gate, stem


def skipnet_table(model: SkipNet) -> KeyTable:
    blocks_per_group, gate, stem = skipnet_layout(model)
    names = skipnet_block_names(blocks_per_group)
    gate_names = GATE_NAMES[gate]
    table = KeyTable({})
    block_key = re.compile(r"stages\.0\.(?P<kind>blocks|gates)\.(?P<k>\d+)\.(?P<rest>.+)")
    for key in model.state_dict():
        m = block_key.fullmatch(key)
        if m is None:
            table.to_authors[key] = _replace_prefix(key, SKIPNET_TOP)
            continue
        g, i = names[int(m["k"])]
        if m["kind"] == "gates":
            table.to_authors[key] = f"group{g}_gate{i}." + _replace_prefix(m["rest"], gate_names)
        elif m["rest"].startswith("shortcut."):
            rest = m["rest"].removeprefix("shortcut.")
            table.to_authors[key] = f"group{g}_layer{i}.downsample.{rest}"
            table.aliases[f"group{g}_ds{i}.{rest}"] = f"group{g}_layer{i}.downsample.{rest}"
        else:
            table.to_authors[key] = f"group{g}_layer{i}.{m['rest']}"
    if stem == "imagenet" and gate == "rnn":
        table.reshaped.add("controller.proj.weight")
    g, i = names[-1]
    last_gate = len(names) - 2  # dynsila's last gate: same kind and width as the authors' unused one
    for key in model.state_dict():
        m = block_key.fullmatch(key)
        if m and m["kind"] == "gates" and int(m["k"]) == last_gate:
            name = f"group{g}_gate{i}." + _replace_prefix(m["rest"], gate_names)
            table.unused[name] = key
    return table
