"""SkipNet: residual networks whose gates skip blocks per sample (Wang, Yu, Dou, Darrell, Gonzalez; ECCV 2018).

After every residual block a small gate looks at the block's output and decides whether the *next* block runs
for that sample; the first block always runs. A skipped block passes its input through its shortcut (identity,
or the 1x1 projection where the block changes shape).

Gates: FFGate-I (max-pool 2, 3x3 conv, 3x3 stride-2 conv, pool, 1x1 conv to 2 logits), FFGate-II (3x3 stride-2
conv, pool, 1x1 conv to 2 logits), and the recurrent gate (per block: pool + 1x1 conv to a 10-d embedding; one
LSTM with 10 hidden units shared by all blocks; linear + sigmoid). A gate outputs the probability of executing.

Decisions (``gate_mode``):
- ``straight_through`` (supervised pre-training): hard decision (p >= threshold) in the forward pass, the soft
  probability's gradient in the backward pass; blocks are mixed with the mask, as the paper trains.
- ``sample`` (reinforcement stage): actions drawn from Bernoulli(p); their log-probabilities are returned.
- eval mode: hard decisions, and a skipped block is **not computed** for that sample: the samples that execute
  it are gathered, run, and scattered back (``execute_block``), so evaluation spends what the gates decide.

The public implementation also builds a gate after the last block that nothing reads; it is left out here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ._protocol import DynamicOutput, GatedBody, MultiExitNetwork
from ._registry import register_model
from .layers import PoolClassifier, he_normal_init

# --- residual blocks -------------------------------------------------------------------------------------------


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)


def projection(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))  # each batch-norm reads its convolution alone (foldable)

    def __init__(self, c_in: int, planes: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(c_in, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, c_in: int, planes: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)), inplace=True)


def skip(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a skipped block outputs: its input through the shortcut (identity or projection)."""
    shortcut = getattr(block, "shortcut", None)
    return x if shortcut is None else shortcut(x)


def execute_block(
    block: nn.Module, x: torch.Tensor, execute: torch.Tensor, overwrite_input: bool = False
) -> torch.Tensor:
    """Run ``block`` only on the samples with ``execute`` true; the others take the shortcut. N x ... -> N x ...

    Gathers the executing samples, runs the block on them, and scatters the result back: a skipped sample costs
    nothing but its shortcut. Batch-norm in eval mode is per sample, so this equals the masked computation.
    ``overwrite_input``: where the shortcut is the identity, write the executed samples into ``x`` itself (its
    skipped rows are already the output), saving a gather, a scatter and a new tensor; only where no one reads
    ``x`` afterwards and nothing needs it for a gradient."""
    run = execute.nonzero().squeeze(1)
    if len(run) == x.shape[0]:
        return block(x)
    if len(run) == 0:
        return skip(block, x)
    executed = block(x[run])  # advanced indexing keeps a channels-last layout (index_select does not)
    if overwrite_input and getattr(block, "shortcut", None) is None:
        return x.index_copy_(0, run, executed)
    rest = (~execute).nonzero().squeeze(1)
    skipped = skip(block, x[rest])
    layout = torch.channels_last if executed.is_contiguous(memory_format=torch.channels_last) else None
    out = torch.empty(
        (x.shape[0], *executed.shape[1:]), dtype=executed.dtype, device=executed.device,
        memory_format=layout or torch.contiguous_format,
    )  # fmt: skip
    return out.index_copy_(0, run, executed).index_copy_(0, rest, skipped)


# --- gates -----------------------------------------------------------------------------------------------------


def float32_policy(x: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off around a gate's policy head. Under bf16 a probability of 0.999 rounds to exactly 1.0: the gate
    could never sample a skip, log(1 - p) is -inf, and HRL gets no policy gradient. The authors train in float32;
    the head is tiny, so its sigmoid / softmax, the sampling and the log-probabilities stay float32 here."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class FeedforwardGate(nn.Module):
    """A convolutional gate: ``net`` (subclass) -> pooled features -> 1x1 conv to 2 logits -> P(execute)."""

    net: nn.Sequential

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.logits = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        features = self.net(x)
        with float32_policy(features):
            logits = self.logits(features.float()).flatten(1)
            return F.softmax(logits, dim=1)[:, 1], state


class FeedforwardGateI(FeedforwardGate):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.net = nn.Sequential(
            nn.MaxPool2d(2),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            conv3x3(channels, channels, stride=2),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )


class FeedforwardGateII(FeedforwardGate):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.net = nn.Sequential(
            conv3x3(channels, channels, stride=2),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )


class GateEmbedding(nn.Module):
    """Per-block input of the recurrent gate: global average pool and a 1x1 conv to ``embed_dim``."""

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Conv2d(channels, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.pool(x)).flatten(1)


class RecurrentGateController(nn.Module):
    """The LSTM shared by all blocks: one step per block, then linear + sigmoid."""

    def __init__(self, embed_dim: int = 10, hidden_dim: int = 10) -> None:
        super().__init__()
        self.rnn = nn.LSTM(embed_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, 1)

    def forward(self, e: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        with float32_policy(e):  # the LSTM and the projection are the policy: float32 under any autocast
            out, state = self.rnn(e.float()[None], state)  # state None: a fresh sequence, zero hidden state
            return torch.sigmoid(self.proj(out[0])).squeeze(1), state


class RecurrentGate(nn.Module):
    """One block's view of the recurrent gate: its own embedding, the shared controller."""

    def __init__(self, channels: int, controller: RecurrentGateController, embed_dim: int) -> None:
        super().__init__()
        self.embedding = GateEmbedding(channels, embed_dim)
        self.controller = [controller]  # a list: shared, registered once on the network, not per gate

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        return self.controller[0](self.embedding(x), state)


# --- SkipNet's own conventions ----------------------------------------------------------------------------------


def reference_linear_init(m: nn.Module) -> None:
    """SkipNet's initialisation of every linear layer (the recurrent gate's projection, the classifier): weights
    from N(0, sqrt(2 / (in x out))), bias as PyTorch draws it, as the public SP models do (its RL models zero the
    bias, but they start from SP weights). Use with ``model.apply`` after ``he_normal_init``."""
    if isinstance(m, nn.Linear):
        m.reset_parameters()  # the default bias, which he_normal_init zeroed
        nn.init.normal_(m.weight, 0.0, (2.0 / m.weight.numel()) ** 0.5)


def skipnet_computation_percent(executed: torch.Tensor) -> float:
    """SkipNet's "computation percentage": (sum over gates of the share of samples that run the block + 1) /
    (G + 1) x 100, the always-run first block counted as one more executed block. ``executed``: N x G (1 = ran).
    Block counts, not MACs: blocks differ in cost, so report it beside the true MACs."""
    if executed.dim() != 2 or executed.shape[0] == 0:
        raise ValueError(f"executed must be N x G gate decisions with N > 0, got shape {tuple(executed.shape)}")
    run_per_gate = executed.double().mean(dim=0)
    return float((run_per_gate.sum() + 1) / (executed.shape[1] + 1) * 100)


# --- the network -----------------------------------------------------------------------------------------------


class GatedResidualBody(GatedBody):
    """The residual blocks with their gates: the network's single stage (gates[k] reads block k's output and
    decides block k + 1)."""

    def __init__(self, blocks: Sequence[nn.Module], gates: Sequence[nn.Module]) -> None:
        super().__init__(blocks, gates)
        self.last_gates: DynamicOutput | None = None

    def skip_path(self, index: int) -> nn.Module | None:
        """A skipped residual block still computes its projection shortcut (None: identity)."""
        shortcut = getattr(self.blocks[index], "shortcut", None)
        return shortcut if isinstance(shortcut, nn.Module) else None

    def computation_percent(self, executed: torch.Tensor) -> float:
        return skipnet_computation_percent(executed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs, actions, log_probs = [], [], []
        state: object = None
        x = self.blocks[0](x)
        for block, gate in zip(self.blocks[1:], self.gates, strict=True):
            p, state = gate(x, state)
            probs.append(p)
            if not self.training:
                hard = p >= self.threshold
                actions.append(hard.float())
                # x is this loop's own tensor: overwritten in place when no gradient needs it
                x = execute_block(block, x, hard, overwrite_input=not torch.is_grad_enabled())
                continue
            if self.gate_mode == "sample":
                action = torch.bernoulli(p.detach())
                log_probs.append(torch.where(action > 0, p, 1 - p).clamp_min(1e-8).log())
                mask = action
            else:
                hard = (p >= self.threshold).float()
                mask = hard - p.detach() + p  # straight-through: hard forward, soft gradient
            actions.append(mask.detach())
            m = mask.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # 0/1 forward values: exact in any dtype
            x = m * block(x) + (1 - m) * skip(block, x)
        log_prob = torch.stack(log_probs).sum(0) if log_probs else None
        self.last_gates = DynamicOutput([], probs, actions, log_prob, torch.empty(0))
        return x


class SkipNet(MultiExitNetwork):
    """stem -> gated residual body -> average pool -> fc. ``forward`` returns ``DynamicOutput``."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        gate: str,
        stem: str,
        num_classes: int,
        embed_dim: int = 10,
        hidden_dim: int = 10,
    ) -> None:
        super().__init__()
        c = widths[0] if stem == "cifar" else 64
        if stem == "cifar":
            self.stem = nn.Sequential(conv3x3(3, c), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, c, 7, 2, 3, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
            )
        self.controller = RecurrentGateController(embed_dim, hidden_dim) if gate == "rnn" else None
        blocks, gates = [], []
        for group, (n_blocks, planes) in enumerate(zip(layers, widths, strict=True)):
            for i in range(n_blocks):
                stride = 2 if group > 0 and i == 0 else 1
                c_out = planes * block.expansion
                shortcut = projection(c, c_out, stride) if stride != 1 or c != c_out else None
                blocks.append(block(c, planes, stride, shortcut))
                c = c_out
                gates.append(self._gate(gate, c_out, embed_dim))
        gates.pop()  # the gate after the last block would decide nothing
        self.stages = nn.ModuleList([GatedResidualBody(blocks, gates)])
        self.exits = nn.ModuleList([PoolClassifier(c, num_classes)])
        self.exit_after = [0]
        self.apply(he_normal_init)
        self.apply(reference_linear_init)

    def init_exit(self, module: nn.Module) -> None:
        module.apply(he_normal_init)
        module.apply(reference_linear_init)

    def _gate(self, kind: str, channels: int, embed_dim: int) -> nn.Module:
        if kind == "ffgate1":
            return FeedforwardGateI(channels)
        if kind == "ffgate2":
            return FeedforwardGateII(channels)
        assert self.controller is not None
        return RecurrentGate(channels, self.controller, embed_dim)

    @property
    def body(self) -> GatedResidualBody:
        body = self.stages[0]
        assert isinstance(body, GatedResidualBody)
        return body

    def gated_body(self) -> GatedResidualBody:
        return self.body

    def forward(self, x: torch.Tensor, upto: int | None = None) -> DynamicOutput:  # type: ignore[override]  # + gates
        logits = super().forward(x, upto)
        gates = self.body.last_gates
        assert gates is not None
        self.body.last_gates = None
        share = self.body.block_cost_share
        return DynamicOutput(logits, gates.gate_probs, gates.gate_actions, gates.action_log_prob, share)


CIFAR_DEPTHS = {20: 3, 38: 6, 74: 12, 110: 18, 152: 25}  # 20: not in the paper; a small net for CPU runs
IMAGENET_DEPTHS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


@register_model("skipnet")
def skipnet(
    num_classes: int,
    depth: int = 110,
    gate: Literal["ffgate1", "ffgate2", "rnn"] = "rnn",
    stem: Literal["cifar", "imagenet"] = "cifar",
) -> SkipNet:
    """SkipNet-``depth``: CIFAR ResNet-20/38/74/110/152 (basic blocks, 16/32/64 channels) or ImageNet
    ResNet-50/101 (bottlenecks), with ``gate`` after every block but the last."""
    if stem == "cifar":
        if depth not in CIFAR_DEPTHS:
            raise ValueError(f"CIFAR SkipNet depth must be one of {sorted(CIFAR_DEPTHS)}, got {depth}")
        n = CIFAR_DEPTHS[depth]
        return SkipNet(BasicBlock, [n, n, n], [16, 32, 64], gate, stem, num_classes)
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet SkipNet depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth}")
    return SkipNet(Bottleneck, IMAGENET_DEPTHS[depth], [64, 128, 256, 512], gate, stem, num_classes)
