"""SiLa: Siamese Labels auxiliary learning, in the readings we could make of the paper's two abstracts.

The full text of the paper (arXiv 2103.00200) was not available; README, section SiLa, tabulates which abstract
supports what. Every exit k of a multi-exit network gets a siamese head g_k trained on a twin copy of the labels,
with z_k the exit's logits and z'_k = g_k(h_k) (``attach: features``, h_k the input of the exit's ``fc``) or
z'_k = g_k(z_k) (``attach: logits``). Per ``softmax``, with w_k the exit weights and c = ``loss.ce_weight``:

    separate:    L = sum_k w_k [ c CE(z_k, y) + lambda CE(z'_k, y) ]
    joint:       L = sum_k w_k [ c CE(z_k, y) + lambda JCE(z_k, z'_k, y) ]
    joint_only:  L = sum_k w_k   c JCE(z_k, z'_k, y)           (no separate main CE; lambda must stay 1)

JCE is one softmax over the 2C logits [z_k, z'_k] against the duplicated label 1/2 [onehot(y), onehot(y)] (the
output layer doubled, the twin half cut away for deployment: the SilaNet v1 abstract's label-level auxiliary).
Any reading may add mu * T^2 * KL(softmax(z'_k / T) || softmax(z_k / T)). Symmetry: with a linear head on the
features, the twin solves the main head's convex problem and converges to it (separate is then the baseline
with its CE scaled by 1 + lambda, joint_only the baseline with a halved learning rate on the exits' fc). The
``mlp`` head, and ``attach: logits`` with ``separate``, are not forced onto the main head; a head on the logits
under a joint softmax can become the identity. ``losses.ensemble_monitor_terms`` measures |z' - z|.

``head: classifier`` makes the twin of exit k a fresh copy of exit k's whole classifier (``model.fresh_exit(k)``:
same architecture, its own initialisation from the run's seed), reading what that classifier reads; it is the
reading that can send the trunk a gradient the main head does not. A *copy-initialised* twin would not: twin and
exit then receive identical gradients and stay equal forever, so ``separate`` becomes the baseline with the trunk's
gradient scaled by 1 + lambda and the exit classifiers' left at 1 (not quite the loss-scale control, which scales
the classifiers' too); ``tests/test_sila_classifier.py`` checks both statements.

Heads attach through forward hooks on ``model.exits[k].fc`` (on ``model.exits[k]`` for ``classifier``): the model
code never knows SiLa exists, and ``prune`` hands back the bare model with exactly the parameters (and so the
FLOPs) of a plain one.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from dynsila.config import Config, bounded
from dynsila.errors import ConfigError
from dynsila.methods.technique import ModelBatch, Technique, register_technique, strip_wrappers, unwrap
from dynsila.models import DynamicOutput, MultiExitNetwork, exit_logits


@dataclass
class SiLaConfig:
    enabled: bool = True
    attach: Literal["features", "logits"] = "features"
    # separate: twin CE on its own softmax; joint: + a 2C softmax over [z, z'] (main CE kept); joint_only: that
    # 2C softmax replaces the exit CE (SilaNet v1's duplicated label; see README, SiLa)
    softmax: Literal["separate", "joint", "joint_only"] = "separate"
    # linear / mlp: a twin of the exit's fc (reads its input, or its logits); classifier: a fresh copy of the exit's
    # whole classifier module (for MSDNet its convolutions, pooling and fc) reading what that classifier reads
    head: Literal["linear", "mlp", "classifier"] = "linear"
    hidden: int = bounded(256, 1)  # width of the mlp head
    weight: float = bounded(1.0, 0.0)  # lambda: the twin head's loss
    consistency: float = bounded(0.0, 0.0)  # mu: KL(twin || main) at temperature T
    temperature: float = bounded(1.0, 0.0, low_open=True)


class SiameseHead(nn.Module):
    """The twin classifier: a linear layer, or a one-hidden-layer MLP (``hidden`` wide, ReLU)."""

    def __init__(self, in_features: int, num_classes: int, kind: str = "linear", hidden: int = 256) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_features, num_classes)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SiLaOutput(NamedTuple):
    logits: list[torch.Tensor]  # main exits, N x C each: what the deployed network computes
    twin_logits: list[torch.Tensor]  # siamese heads, N x C each (training only)
    dynamic: DynamicOutput | None = None  # a gated network's full output (gate decisions), else None


class SiLa(nn.Module):
    """Training wrapper: ``SiLa(model, cfg)(x, upto)`` returns main and twin logits of exits ``0..upto``."""

    def __init__(self, model: MultiExitNetwork, cfg: SiLaConfig) -> None:
        super().__init__()
        if replaces_exit_ce(cfg) and cfg.weight != 1.0:
            raise ConfigError(
                f"sila.weight={cfg.weight} has no effect with sila.softmax=joint_only (the joint softmax replaces "
                "the exit cross-entropy); leave sila.weight at 1 and scale the loss with loss.ce_weight"
            )
        if cfg.head == "classifier" and cfg.attach == "logits":
            raise ConfigError(
                "sila.head=classifier copies the whole exit classifier, which reads the exit's input, not its logits; "
                "set sila.attach=features (or pick sila.head=linear/mlp for a twin on the logits)"
            )
        self.model = model
        self.cfg = cfg
        self.heads = nn.ModuleList()
        self._captured: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = {}
        self._capturing = False  # hooks are inert outside this wrapper's forward (e.g. evaluating self.model)
        self._handles: list[RemovableHandle] = []
        for k, exit_module in enumerate(model.exits):
            fc = exit_module.fc
            if not isinstance(fc, nn.Linear):
                raise TypeError(f"exit {k} of {type(model).__name__} must end in an nn.Linear named fc")
            if cfg.head == "classifier":
                self.heads.append(model.fresh_exit(k))
            else:
                in_features = fc.in_features if cfg.attach == "features" else fc.out_features
                self.heads.append(SiameseHead(in_features, fc.out_features, cfg.head, cfg.hidden))
            self._handles.append(self._hooked(exit_module).register_forward_hook(self._capture_hook(k)))

    def _hooked(self, exit_module: nn.Module) -> nn.Module:
        """Where the twin reads: the whole exit classifier (its inputs), or the exit's ``fc``."""
        fc = exit_module.fc
        assert isinstance(fc, nn.Module)
        return exit_module if self.cfg.head == "classifier" else fc

    def _capture_hook(self, k: int) -> Any:
        def capture(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if self._capturing:
                self._captured[k] = (inputs, output)

        return capture

    def _twin(self, k: int) -> torch.Tensor:
        inputs, z = self._captured[k]
        if self.cfg.head == "classifier":
            return self.heads[k](*inputs)
        return self.heads[k](inputs[0] if self.cfg.attach == "features" else z)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> SiLaOutput:
        self._captured.clear()
        self._capturing = True
        try:
            output = self.model(x, upto=upto)
        finally:
            self._capturing = False
        logits = exit_logits(output)
        twins = [self._twin(k) for k in range(len(logits))]
        self._captured.clear()  # hold no activations between steps
        return SiLaOutput(logits, twins, output if isinstance(output, DynamicOutput) else None)

    def bare_model(self) -> MultiExitNetwork:
        """A copy of the wrapped model without the siamese hooks: the deploy network."""
        bare = copy.deepcopy(self.model)
        for exit_module, handle in zip(bare.exits, self._handles, strict=True):
            self._hooked(exit_module)._forward_hooks.pop(handle.id, None)
        return bare


def prune(net: nn.Module) -> MultiExitNetwork:
    """The deployable network: a copy with SiLa heads dropped and DDP / compile wrappers removed.

    Returns a model of the same class, state-dict keys and parameter count as one built without SiLa."""
    net = strip_wrappers(net)
    return net.bare_model() if isinstance(net, SiLa) else copy.deepcopy(unwrap(net))


def replaces_exit_ce(cfg: SiLaConfig) -> bool:
    """True when the SiLa term takes the place of the exit cross-entropy (``softmax: joint_only``)."""
    return cfg.enabled and cfg.softmax == "joint_only"


def sila_loss_terms(
    output: SiLaOutput, labels: torch.Tensor, cfg: SiLaConfig, exit_weights: list[float], ce_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """The twin-label terms of the SiLa loss, summed over exits with weights w_k.

    Returns ``{"sila": lambda * sum_k w_k twin loss}`` (separate: CE(z', y); joint: JCE(z, z', y)), or for
    ``joint_only`` ``{"joint_ce": ce_weight * sum_k w_k JCE(z, z', y)}``, which stands in for the exit CE (the
    caller then leaves its ``ce`` term out); plus ``{"consistency": mu * sum_k w_k T^2 KL}`` when mu > 0."""
    twin_terms, kl_terms = [], []
    for w, z, z_twin in zip(exit_weights, output.logits, output.twin_logits, strict=True):
        if cfg.softmax == "separate":
            twin_terms.append(w * F.cross_entropy(z_twin, labels))
        else:
            twin_terms.append(w * joint_siamese_cross_entropy(z, z_twin, labels))
        if cfg.consistency > 0:
            t = cfg.temperature
            kl = F.kl_div(
                F.log_softmax(z / t, dim=1), F.log_softmax(z_twin / t, dim=1), reduction="batchmean", log_target=True
            )  # KL(p_twin || p_main)
            kl_terms.append(w * kl * t * t)
    twin_sum = torch.stack(twin_terms).sum()
    terms = {"joint_ce": ce_weight * twin_sum} if replaces_exit_ce(cfg) else {"sila": cfg.weight * twin_sum}
    if kl_terms:
        terms["consistency"] = cfg.consistency * torch.stack(kl_terms).sum()
    return terms


def joint_siamese_cross_entropy(z: torch.Tensor, z_twin: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of softmax([z, z_twin]) (N x 2C) against 1/2 [onehot(y), onehot(y)]."""
    log_p = F.log_softmax(torch.cat([z, z_twin], dim=1), dim=1)
    num_classes = z.shape[1]
    picked = log_p.gather(1, labels[:, None]) + log_p.gather(1, labels[:, None] + num_classes)
    return -(0.5 * picked).mean()


def twin_agreement(outputs: Sequence[object]) -> dict[str, torch.Tensor]:
    """Detached per-exit twin/main agreement of SiLa outputs, for metrics only (never added to the loss).

    For exit k, averaged over the batch and over the SiLa peers: ``twin_gap_e{k}`` = mean |z'_k - z_k| (all
    logits), ``twin_rel_gap_e{k}`` = that gap / mean |z_k|, ``twin_agree_e{k}`` = share of samples whose argmax
    agrees. Empty when no output is SiLa-wrapped. Returns 0-d tensors on the logits' device (no host sync)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with torch.no_grad():
        for output in outputs:
            if not isinstance(output, SiLaOutput):
                continue
            for k, (z, z_twin) in enumerate(zip(output.logits, output.twin_logits, strict=True)):
                z, z_twin = z.detach().float(), z_twin.detach().float()
                gap = (z_twin - z).abs().mean()
                values = {
                    f"twin_gap_e{k}": gap,
                    f"twin_rel_gap_e{k}": gap / z.abs().mean().clamp_min(1e-12),
                    f"twin_agree_e{k}": (z_twin.argmax(1) == z.argmax(1)).float().mean(),
                }
                for name, value in values.items():
                    sums[name] = sums[name] + value if name in sums else value
                    counts[name] = counts.get(name, 0) + 1
    return {name: value / counts[name] for name, value in sums.items()}


class SiLaTechnique(Technique):
    """SiLa's siamese heads around each network (``prepare``; ``deploy`` drops them), its twin-label terms, and its
    twin/main agreement as monitor terms. With ``softmax: joint_only`` its joint CE stands in for the exit CE."""

    name = "sila"
    settings = SiLaConfig
    order = 10

    def active(self, cfg: Config) -> bool:
        return bool(cfg.section(SiLaConfig).enabled)

    def prepare(self, net: nn.Module, cfg: Config) -> nn.Module:
        settings = cfg.section(SiLaConfig)
        return SiLa(unwrap(net), settings) if settings.enabled else net

    def deploy(self, net: nn.Module) -> nn.Module:
        return net.bare_model() if isinstance(net, SiLa) else net

    def replaces_exit_ce(self, batch: ModelBatch) -> bool:
        return isinstance(batch.output, SiLaOutput) and replaces_exit_ce(batch.cfg.section(SiLaConfig))

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        if not isinstance(batch.output, SiLaOutput):
            return {}
        cfg = batch.cfg
        return sila_loss_terms(batch.output, batch.labels, cfg.section(SiLaConfig), batch.exit_weights,
                               cfg.loss.ce_weight)  # fmt: skip

    def monitor_terms(self, batches: Sequence[ModelBatch]) -> dict[str, torch.Tensor]:
        return twin_agreement([batch.output for batch in batches])


SILA = register_technique(SiLaTechnique())
