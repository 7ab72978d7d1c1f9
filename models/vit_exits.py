"""Exits on timm's vision transformers (ViT, DeiT): groups of blocks become the protocol's stages.

A ViT is a token embedding followed by a plain sequence of equal blocks, so any block can end a stage. The stem
is the embedding exactly as timm's ``VisionTransformer.forward_intermediates`` computes it before its first block
(patch embedding, class / register tokens, position embedding, patch dropout, pre-norm); stage k runs the blocks
after exit k-1's block up to exit k's, and exit k reads the whole token tensor (``N x tokens x dim``, prefix tokens
first) that block writes: what ``forward_intermediates(x, indices=[b], output_fmt="NLC")`` returns for that block
before it splits the prefix tokens off (tested). Blocks after the last exit are not built. The state between
stages is one batch-first tensor, so the early-exit runner compacts it and the ONNX export cuts at it as it does a
CNN's feature map.

Exit heads (both end in the ``nn.Linear`` named ``fc`` that SiLa's heads hook):

- ``linear``: layer norm, then the class token (``pool: token``) or the mean of the patch tokens (``pool: avg``),
  then ``fc``: ViT's own classification head (Dosovitskiy et al., ICLR 2021; timm's ``norm`` -> pool -> ``head``)
  placed after block k, the plain per-block exit of the multi-exit ViT literature. Each exit's norm starts from
  the backbone's final norm, so with pretrained weights the exit after the last block is the backbone's own head
  but for ``fc``.
- ``block``: one more transformer encoder block (same width, heads and MLP ratio as the backbone's, initialised
  afresh) on the exit's token map, then the ``linear`` head: a transformer-layer exit branch of the kind
  Bakhtiarnia, Zhang and Iosifidis propose among their seven ViT exit branches ("Multi-Exit Vision Transformer
  for Dynamic Inference", BMVC 2021) and build on in "Single-Layer Vision Transformers for More Accurate Early
  Exits with Less Overhead" (Neural Networks, 2022). It mixes tokens with attention before pooling, which a linear
  exit on block k's tokens cannot; it costs about one more block per exit (counted, attention included).

Pretrained weights load as in ``timm_exits`` (a local file or the local cache only; timm resamples the position
embedding to ``img_size`` / ``patch_size``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ._protocol import MultiExitNetwork
from ._registry import register_model
from .timm_exits import create_backbone

Pool = Literal["token", "avg"]


class TokenEmbedding(nn.Module):
    """Image -> tokens, as ``VisionTransformer.forward_intermediates`` begins (fixed image size only)."""

    cls_token: torch.Tensor | None
    reg_token: torch.Tensor | None
    pos_embed: torch.Tensor | None

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        if vit.dynamic_img_size:
            raise ValueError("dynamic_img_size backbones are not supported: build the ViT for one img_size")
        self.patch_embed: nn.Module = vit.patch_embed
        self.register_parameter("cls_token", vit.cls_token)
        self.register_parameter("reg_token", vit.reg_token)
        self.register_parameter("pos_embed", vit.pos_embed)
        self.no_embed_class = bool(vit.no_embed_class)
        self.pos_drop: nn.Module = vit.pos_drop
        self.patch_drop: nn.Module = vit.patch_drop
        self.norm_pre: nn.Module = vit.norm_pre

    def no_weight_decay(self) -> set[str]:
        """The parameters weight decay should not pull to zero (``train.decay: weights``)."""
        return {"cls_token", "reg_token", "pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # N x patches x dim
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and self.no_embed_class:  # the position embedding skips the prefix tokens
            x = x + self.pos_embed
        x = torch.cat([*prefix, x], dim=1) if prefix else x
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class TokenClassifier(nn.Module):
    """An exit on a token map: ``mixer`` (an extra transformer block, or nothing), layer norm, pooling, ``fc``."""

    def __init__(self, dim: int, num_classes: int, pool: Pool, num_prefix_tokens: int, mixer: nn.Module) -> None:
        super().__init__()
        if pool == "token" and num_prefix_tokens == 0:
            raise ValueError("pool='token' needs a class token; this backbone has none, use pool='avg'")
        self.mixer = mixer
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool, self.num_prefix_tokens = pool, num_prefix_tokens
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.mixer(tokens))
        pooled = x[:, 0] if self.pool == "token" else x[:, self.num_prefix_tokens :].mean(dim=1)
        logits: torch.Tensor = self.fc(pooled)
        return logits


def init_vit_linear(module: nn.Module) -> None:
    """timm's ViT initialisation of linear layers (truncated normal, std 0.02; zero bias) on every submodule."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class VitExits(MultiExitNetwork):
    def __init__(
        self, vit: VisionTransformer, exit_blocks: Sequence[int], exit_head: str, pool: Pool, num_classes: int
    ) -> None:
        super().__init__()
        blocks = list(vit.blocks)
        after = list(exit_blocks)
        if not after or sorted(set(after)) != after or after[0] < 1 or after[-1] > len(blocks):
            raise ValueError(f"exits {after} must be increasing block numbers in 1..{len(blocks)} (1 = first block)")
        self.stem = TokenEmbedding(vit)
        self.stages = nn.ModuleList()
        for start, end in zip([0, *after[:-1]], after, strict=True):
            named = [(f"blocks_{i}", blocks[i]) for i in range(start, end)]
            self.stages.append(nn.Sequential(OrderedDict(named)))
        self.exit_after = list(range(len(after)))
        dim, prefix = int(vit.embed_dim), int(vit.num_prefix_tokens)
        first: Any = blocks[0]  # a timm Block
        num_heads, mlp_ratio = int(first.attn.num_heads), float(first.mlp.fc1.out_features / dim)
        self.exits = nn.ModuleList()
        for _ in after:
            mixer = Block(dim, num_heads, mlp_ratio, qkv_bias=True) if exit_head == "block" else nn.Identity()
            head = TokenClassifier(dim, num_classes, pool, prefix, mixer)
            self.init_exit(head)
            if isinstance(vit.norm, nn.LayerNorm):
                head.norm.load_state_dict(vit.norm.state_dict())
            self.exits.append(head)

    def init_exit(self, module: nn.Module) -> None:
        init_vit_linear(module)


@register_model("vit_exits")
def vit_exits(
    num_classes: int,
    backbone: str = "vit_tiny_patch16_224",
    exits: Sequence[int] = (3, 6, 9, 12),
    exit_head: Literal["linear", "block"] = "linear",
    pool: Pool = "token",
    img_size: int = 224,
    patch_size: int = 16,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    in_chans: int = 3,
) -> VitExits:
    """Exits after blocks ``exits`` (1-based: ``[3, 6, 9, 12]`` on a 12-block ViT) of a timm ViT / DeiT.

    ``img_size`` / ``patch_size``: the input the ViT is built for (32 / 4 for CIFAR). ``embed_dim``, ``depth``,
    ``num_heads``, ``mlp_ratio``: override the named backbone's (None keeps it), for small ViTs trained from
    scratch. ``exit_head``: ``linear`` or ``block`` (module docstring); ``pool``: class token or patch mean."""
    overrides = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio}
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    sizes = {"in_chans": in_chans, "img_size": img_size, "patch_size": patch_size, **kwargs}
    try:
        vit = create_backbone(backbone, pretrained, pretrained_file, drop_path_rate=drop_path_rate, **sizes)
    except AssertionError as e:  # timm checks its shapes with asserts (e.g. width divisible by the heads)
        raise ValueError(f"timm cannot build {backbone} with {sizes}: {e}") from None
    except TypeError as e:  # a family that takes no ViT sizes
        raise ValueError(f"{backbone} is not a timm VisionTransformer ({e}); use timm_exits for CNNs") from None
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"{backbone} is a {type(vit).__name__}, not a timm VisionTransformer; use timm_exits")
    return VitExits(vit, list(exits), exit_head, pool, num_classes)
