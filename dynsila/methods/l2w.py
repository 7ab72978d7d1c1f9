"""Learning to weight samples (L2W-DEN): meta-learned per-sample, per-exit weights on the exit cross-entropy.

Han, Pu, Lai, Wang, Song, Cao, Huang, Deng and Huang, "Learning to Weight Samples for Dynamic Early-exiting
Networks" (ECCV 2022). A weight-prediction network f_phi (an MLP: K losses -> ``hidden`` ReLU -> K, tanh) maps a
sample's per-exit losses l_n = (CE(z_nk, y_n))_k to its per-exit weights. As in the authors' code
(github.com/LeapLabTHU/L2W-DEN, ``tools/main_cifar_DDP.py``), the raw outputs are centred and scaled,

    W = 1 + epsilon (f_phi(l) - mean f_phi(l)),    mean over exits per sample (``per_sample``, their CIFAR "col"),
                                                 over the whole batch (``whole_batch``, ImageNet "mat") or over
                                                 the samples per exit (``per_exit``, "row"),

so the weights average 1 along that dimension; with tanh in (-1, 1) they lie in (1 - 2 epsilon, 1 + 2 epsilon):
positive for epsilon <= 0.5 (the authors use 0.8 on CIFAR, 0.3 on ImageNet, where a weight may go below 0).
The network trains on ``weighted_ce`` = ``loss.ce_weight`` sum_k w_k mean_n W_nk l_nk (W detached), which stands
in for ``ce``.

The meta update (``before_step``, every ``l2w.meta_interval`` steps) is the paper's one-step look-ahead: the step's
batch is halved; on one half the classifier takes a virtual SGD step on the weighted loss at the current lr,
theta' = theta - lr grad_theta(phi) (``torch.func.functional_call``, graph kept, so theta' depends on phi); the other
half, the meta batch, is assigned to exits as early exiting would (exit k takes the floor(n q_k) samples it is
most confident on among those no earlier exit took; the last takes the rest), with the target exit shares
q_k proportional to p^k (``l2w.target_p``; the authors' ``target_p_index`` 15 is p = 0.75); the meta loss is the
CE of each exit of theta' on its samples, summed over exits, and its gradient in phi takes one Adam step
(``l2w.meta_lr``, following the run's lr schedule; ``l2w.meta_weight_decay``). The halves swap at every meta update.
By default the real step stays one step on the whole batch and the virtual step is plain SGD (the paper's
equation). As the authors run it (``tools/main_cifar_DDP.py``, ``tools/meta.py``): ``l2w.look_ahead: optimizer``
takes the run's SGD step instead (weight decay, the momentum buffer, dampening and Nesterov as each parameter's
group has them; the buffer is read, not updated), as their ``MetaSGD`` loaded with the optimizer's state does;
``l2w.step_per_half: true`` splits each batch into halves (``torch.chunk``) and takes one meta update and one
optimizer step per half: the virtual step on the half the optimizer step then trains on, the meta loss on the
other (``step_rows``; the meta interval counts batches). The classifier's parameters and batch-norm statistics
are untouched by the meta update (the virtual pass runs on copies of the buffers).

**The meta set is the training batch itself**: the technique never sees a validation or test sample
(``tests/test_l2w.py`` trains with the validation and test images overwritten by a marker and checks no meta
image carries it). The weight net lives in the training wrapper (``L2WNetwork.weigher``) with frozen parameters
(the optimizer, DDP and weight decay leave them alone; only the meta step writes them) and its Adam moments as
buffers, so checkpoints hold it and a resumed run continues it exactly. ``deploy`` drops the wrapper: the deploy
network is the plain one. Under DDP each rank's meta gradient is averaged over ranks (untested here: no GPUs).
``train.compile`` is refused. ``order`` 60: after the built-ins and GE (its term replaces ``ce``, so it heads the
sum; its wrapper is the outermost, around SiLa's).

Anchor, as the authors' repository reports it (github.com/LeapLabTHU/L2W-DEN, ``figs/result_cifar.jpg``, shown
in its README under "Results", read off the figure's labels): MSDNet + L2W over MSDNet in budgeted batch
classification, "+1.3 Acc" and "+1.1 Acc" at two budgets and "x1.6 Speedup" on CIFAR-100, "+1.0 Acc" and
"x2.0 Speedup" on CIFAR-10. Not reproduced here (``configs/cifar100/msdnet_l2w.yaml`` is the paper-scale run).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from dynsila.config import Config, bounded
from dynsila.errors import ConfigError
from dynsila.methods.technique import ModelBatch, Step, Technique, register_technique, strip_wrappers, unwrap

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
LabelledImages = tuple[torch.Tensor, torch.Tensor]  # N x 3 x H x W, N


@dataclass
class L2WConfig:
    enabled: bool = False  # meta-learned per-sample, per-exit weights on the exit cross-entropy (L2W-DEN)
    hidden: int = bounded(500, 1)  # width of the weight-prediction MLP's hidden layer
    meta_lr: float = bounded(1e-4, 0.0, low_open=True)  # Adam lr of the weight net, scaled like the run's lr
    meta_weight_decay: float = bounded(1e-4, 0.0)  # Adam's L2 on the weight net
    meta_interval: int = bounded(1, 1)  # a meta update every this many optimizer steps
    epsilon: float = bounded(0.8, 0.0, 1.0)  # W = 1 + epsilon (f - mean f); <= 0.5 keeps every weight positive
    normalise: Literal["per_sample", "whole_batch", "per_exit"] = "per_sample"  # what the mean is taken over
    target_p: float = bounded(0.75, 0.0, 2.0, low_open=True)  # target exit shares q_k proportional to p^k
    # the virtual step: sgd, theta - lr grad (the paper's equation); optimizer, the run's SGD step with its weight
    # decay and momentum buffer, as the authors' MetaSGD (tools/meta.py, loaded with the optimizer's state in
    # tools/main_cifar_DDP.py)
    look_ahead: Literal["sgd", "optimizer"] = "sgd"
    # two meta updates and two optimizer steps per batch, one per half, halves swapped (the authors' train() in
    # tools/main_cifar_DDP.py: virtual step on half 1, meta loss on half 2, real step on half 1; then the reverse);
    # off: one meta update on alternating halves and one optimizer step on the whole batch
    step_per_half: bool = False


class SampleWeigher(nn.Module):
    """f_phi: per-exit losses (N x K) -> raw weights (N x K) in (-1, 1). Its parameters are frozen: only the meta
    step writes them (with Adam moments kept as buffers, so checkpoints hold the whole meta state)."""

    steps: torch.Tensor
    updates: torch.Tensor

    def __init__(self, num_exits: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_exits, hidden), nn.ReLU(), nn.Linear(hidden, num_exits), nn.Tanh())
        for name, p in self.net.named_parameters():
            p.requires_grad_(False)
            self.register_buffer(f"adam_m_{name.replace('.', '_')}", torch.zeros_like(p))
            self.register_buffer(f"adam_v_{name.replace('.', '_')}", torch.zeros_like(p))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # optimizer steps seen (meta interval)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))  # meta updates made (Adam's t)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses)

    def functional(self, params: dict[str, torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
        """f with the given parameters (names as in ``self.net``), differentiable in them."""
        return functional_call(self.net, params, (losses,))


def normalised_weights(raw: torch.Tensor, mode: str, epsilon: float) -> torch.Tensor:
    """W = 1 + epsilon (raw - mean raw), the mean over exits per sample, the whole batch, or samples per exit.
    ``raw``: N x K; returns N x K."""
    if mode == "per_sample":
        centre = raw.mean(dim=1, keepdim=True)
    elif mode == "per_exit":
        centre = raw.mean(dim=0, keepdim=True)
    else:
        centre = raw.mean()
    return 1.0 + epsilon * (raw - centre)


def per_sample_losses(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """CE of every sample at every exit: N x K."""
    return torch.stack([F.cross_entropy(z.float(), labels, reduction="none") for z in logits], dim=1)


def weighted_exit_loss(losses: torch.Tensor, weights: torch.Tensor, exit_weights: Sequence[float]) -> torch.Tensor:
    """sum_k w_k mean_n W_nk l_nk. ``losses``, ``weights``: N x K; returns a 0-d tensor."""
    w = torch.as_tensor(list(exit_weights), dtype=losses.dtype, device=losses.device)
    return ((weights * losses).mean(dim=0) * w).sum()


class WeighedLogits(list):
    """An exit-logit list that carries the weight net of the wrapper that produced it (how ``model_terms`` finds
    it without the output changing type: SiLa's and a gated network's outputs stay what they are)."""

    weigher: SampleWeigher


class L2WNetwork(nn.Module):
    """Training wrapper: the network (``.model``, possibly itself wrapped) and its weight net (``.weigher``)."""

    def __init__(self, model: nn.Module, hidden: int) -> None:
        super().__init__()
        self.model = model
        self.weigher = SampleWeigher(unwrap(model).num_exits, hidden)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> Any:
        return tag_logits(self.model(x, upto=upto), self.weigher)


def tag_logits(output: Any, weigher: SampleWeigher) -> Any:
    """``output`` with its logit list replaced by a ``WeighedLogits`` (a list, or a NamedTuple's ``logits``)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, list):
        raise TypeError(f"l2w cannot find the exit logits in a {type(output).__name__}")
    tagged = WeighedLogits(logits)
    tagged.weigher = weigher
    return tagged if output is logits else output._replace(logits=tagged)


def exit_shares(p: float, num_exits: int) -> list[float]:
    """Target share q_k of samples leaving at exit k, proportional to p^(k+1) (the authors' calc_target_probs)."""
    powers = [p ** (k + 1) for k in range(num_exits)]
    return [v / sum(powers) for v in powers]


def assign_to_exits(logits: Sequence[torch.Tensor], shares: Sequence[float]) -> list[torch.Tensor]:
    """The meta samples each exit is scored on, as early exiting by confidence would send them: exit k takes the
    floor(n q_k) most confident (max softmax) samples no earlier exit took; the last exit takes the rest.
    ``logits[k]``: N x C; returns index tensors, disjoint, covering 0..N-1."""
    n = logits[0].shape[0]
    taken = torch.zeros(n, dtype=torch.bool, device=logits[0].device)
    chosen = []
    for k, z in enumerate(logits):
        if k == len(logits) - 1:
            chosen.append((~taken).nonzero().flatten())
            break
        confidence = F.softmax(z.detach().float(), dim=1).amax(dim=1).masked_fill(taken, -1.0)
        index = confidence.argsort(descending=True)[: math.floor(n * shares[k])]
        taken[index] = True
        chosen.append(index)
    return chosen


def meta_loss(logits: Sequence[torch.Tensor], labels: torch.Tensor, shares: Sequence[float]) -> torch.Tensor:
    """sum_k CE of exit k on the meta samples assigned to it (exits with none add nothing)."""
    parts = [F.cross_entropy(z[i], labels[i]) for z, i in zip(logits, assign_to_exits(logits, shares), strict=True)
             if len(i)]  # fmt: skip
    return torch.stack(parts).sum()


def meta_halves(
    images: torch.Tensor, labels: torch.Tensor, flip: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((virtual-step images, labels), (meta images, labels)): the two halves of the step's own training batch,
    swapped when ``flip``."""
    half = images.shape[0] // 2
    first, second = (images[:half], labels[:half]), (images[half:], labels[half:])
    return (second, first) if flip else (first, second)


def look_ahead_meta_loss(
    net: L2WNetwork, phi: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...], settings: L2WConfig,
    exit_weights: Sequence[float], lr: float, optimizer: torch.optim.Optimizer | None = None,
) -> torch.Tensor:  # fmt: skip
    """The meta loss of the classifier after a virtual SGD step on the loss weighted by f_phi, differentiable in
    ``phi``: plain SGD, or ``optimizer``'s step when given (``optimizer_look_ahead``). ``batch`` = (virtual images,
    labels, meta images, labels). The network's own tensors are not changed: the passes run on its parameters and
    on copies of its buffers."""
    x_train, y_train, x_meta, y_meta = batch
    theta = {n: p for n, p in net.model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in net.model.named_buffers()}
    logits = getattr(out := functional_call(net.model, {**theta, **buffers}, (x_train,)), "logits", out)
    losses = per_sample_losses(logits, y_train)
    weights = normalised_weights(net.weigher.functional(phi, losses.detach()), settings.normalise, settings.epsilon)
    grads = torch.autograd.grad(weighted_exit_loss(losses, weights, exit_weights), list(theta.values()),
                                create_graph=True, allow_unused=True)  # fmt: skip
    if optimizer is None:
        ahead = {n: p if g is None else p - lr * g for (n, p), g in zip(theta.items(), grads, strict=True)}
    else:
        ahead = optimizer_look_ahead(theta, grads, lr, optimizer)
    meta_out = functional_call(net.model, {**ahead, **buffers}, (x_meta,))
    meta_logits = getattr(meta_out, "logits", meta_out)
    return meta_loss(meta_logits, y_meta, exit_shares(settings.target_p, len(meta_logits)))


def optimizer_look_ahead(
    theta: Mapping[str, torch.Tensor], grads: Sequence[torch.Tensor | None], lr: float, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """theta after the step torch.optim.SGD would take on ``grads``, differentiable in them, its state untouched:
    d = g + wd p; with momentum m and a buffer b, d = m b + (1 - dampening) d (no buffer yet: d); nesterov adds
    m d to the first d; theta - lr d. Each parameter takes its own group's settings."""
    groups = {p: group for group in optimizer.param_groups for p in group["params"]}
    ahead = {}
    for (name, p), g in zip(theta.items(), grads, strict=True):
        if g is None:
            ahead[name] = p
            continue
        group = groups[p]
        momentum, decayed = group["momentum"], g + group["weight_decay"] * p.detach()
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        step = decayed
        if momentum != 0 and buffer is not None:
            step = momentum * buffer + (1 - group["dampening"]) * decayed
        if group["nesterov"]:
            step = decayed + momentum * step
        ahead[name] = p - lr * step
    return ahead


def adam_step(weigher: SampleWeigher, grads: dict[str, torch.Tensor], lr: float, weight_decay: float) -> None:
    """One Adam step (L2 weight decay, as torch.optim.Adam) on the weight net's parameters, in place."""
    weigher.updates += 1
    t = int(weigher.updates)
    (b1, b2), buffers = ADAM_BETAS, dict(weigher.named_buffers())
    with torch.no_grad():
        for name, p in weigher.net.named_parameters():
            g = grads[name] + weight_decay * p
            m, v = buffers[f"adam_m_{name.replace('.', '_')}"], buffers[f"adam_v_{name.replace('.', '_')}"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            step = lr / (1 - b1**t)
            p.addcdiv_(m, (v / (1 - b2**t)).sqrt().add_(ADAM_EPS), value=-step)


def halves_of_step(step: Step, flip: bool) -> tuple[LabelledImages, LabelledImages]:
    """((virtual-step images, labels), (meta images, labels)): with ``step.rows`` (one optimizer step per half) the
    half that step trains on and the other half; else ``meta_halves`` of the batch."""
    if step.rows is None:
        return meta_halves(step.images, step.labels, flip)
    rows = step.rows
    other = slice(rows.stop, None) if rows.start in (0, None) else slice(0, rows.start)
    return (step.images[rows], step.labels[rows]), (step.images[other], step.labels[other])


def meta_update(net: L2WNetwork, step: Step, exit_weights: Sequence[float]) -> torch.Tensor:
    """The weight net's meta step on this optimizer step's batch; returns the (detached) meta loss."""
    settings = step.cfg.section(L2WConfig)
    weigher = net.weigher
    (x_train, y_train), (x_meta, y_meta) = halves_of_step(step, flip=bool(weigher.updates % 2))
    phi = {n: p.detach().requires_grad_() for n, p in weigher.net.named_parameters()}
    optimizer = step.optimizer if settings.look_ahead == "optimizer" else None
    if settings.look_ahead == "optimizer" and optimizer is None:
        raise ValueError("l2w.look_ahead=optimizer needs the run's optimizer in the Step")
    # attention through its math path: the fused kernels' backward has no derivative, and the meta gradient
    # differentiates the virtual step's backward (a ViT failed here with the default kernels)
    with sdpa_kernel(SDPBackend.MATH):
        loss = look_ahead_meta_loss(net, phi, (x_train, y_train, x_meta, y_meta), settings, exit_weights, step.lr,
                                    optimizer)  # fmt: skip
    grads = dict(zip(phi, torch.autograd.grad(loss, list(phi.values())), strict=True))
    if dist.is_available() and dist.is_initialized():  # every rank keeps the same weight net
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    meta_lr = settings.meta_lr * step.lr / step.cfg.train.lr  # the run's lr schedule, applied to the meta lr
    adam_step(weigher, grads, meta_lr, settings.meta_weight_decay)
    return loss.detach()


class LearningToWeight(Technique):
    """L2W-DEN: the weight net around each network (``prepare``; ``deploy`` drops it), its meta update before
    each ``meta_interval``-th step, and the weighted exit CE standing in for ``ce``."""

    name = "l2w"
    settings = L2WConfig
    order = 60

    def active(self, cfg: Config) -> bool:
        return bool(cfg.section(L2WConfig).enabled)

    def prepare(self, net: nn.Module, cfg: Config) -> nn.Module:
        return L2WNetwork(net, cfg.section(L2WConfig).hidden) if self.active(cfg) else net

    def validate(self, nets: Sequence[nn.Module], cfg: Config) -> None:
        if self.active(cfg) and cfg.train.compile:
            raise ConfigError("l2w.enabled does not run under train.compile (its meta step is second-order "
                              "autograd outside the compiled step); set train.compile=false")  # fmt: skip
        if self.active(cfg) and cfg.section(L2WConfig).look_ahead == "optimizer" and cfg.train.optimizer != "sgd":
            raise ConfigError("l2w.look_ahead=optimizer takes the step of SGD (the authors' MetaSGD); set "
                              "train.optimizer=sgd or l2w.look_ahead=sgd")  # fmt: skip

    def step_rows(self, cfg: Config, n: int) -> list[slice] | None:
        if not (self.active(cfg) and cfg.section(L2WConfig).step_per_half) or n < 2:
            return None
        half = (n + 1) // 2  # torch.chunk's halves, as the authors split the batch
        return [slice(0, half), slice(half, n)]

    def before_step(self, step: Step) -> None:
        if not self.active(step.cfg):
            return
        peers = getattr(strip_wrappers(step.networks), "peers", [step.networks])
        for net in peers:
            if not isinstance(net, L2WNetwork):
                continue
            if step.rows is None or step.rows.start in (0, None):  # the meta interval counts batches
                net.weigher.steps += 1
            if (int(net.weigher.steps) - 1) % step.cfg.section(L2WConfig).meta_interval == 0:
                exit_weights = step.cfg.loss.exit_weights or [1.0] * unwrap(net).num_exits
                meta_update(net, step, exit_weights)

    def replaces_exit_ce(self, batch: ModelBatch) -> bool:
        return isinstance(batch.logits, WeighedLogits)

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        if not isinstance(batch.logits, WeighedLogits):
            return {}
        settings = batch.cfg.section(L2WConfig)
        losses = per_sample_losses(batch.logits, batch.labels)
        with torch.no_grad():
            weights = normalised_weights(batch.logits.weigher(losses), settings.normalise, settings.epsilon)
        return {"weighted_ce": batch.cfg.loss.ce_weight * weighted_exit_loss(losses, weights, batch.exit_weights)}

    def deploy(self, net: nn.Module) -> nn.Module:
        return net.model if isinstance(net, L2WNetwork) else net


LEARNING_TO_WEIGHT = register_technique(LearningToWeight())
