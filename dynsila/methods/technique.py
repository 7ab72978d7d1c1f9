"""What a training technique is, and the one table of them: the only way a method enters training.

A technique is one module holding one ``Technique`` object that it registers (``register_technique``): its config
keys (a dataclass, ``settings``, validated and documented with every other key), and the hooks below, each doing
nothing unless overridden. The training loop calls the hooks in the table's order and never names a technique.

The lifecycle of a run, and where each hook comes in:

    build      network_configs(cfg)        the networks trained side by side (DML's peers); default: one
               prepare(net, cfg)           wrap or set up each network for training (SiLa's heads, SkipNet's gates)
               validate(nets, cfg)         refuse networks that cannot train together (DML's exit matching)
    each batch step_rows(cfg, n)           the rows of each optimizer step, when a batch takes several (L2W's
                                           authors: one per half); default: one step on the whole batch
    each step  before_step(step)           a step of its own before the optimizer's (a meta update)
               replaces_exit_ce(batch)     its terms stand in for the exit cross-entropy
               model_terms(batch)          terms of one network's loss
               ensemble_terms(batches)     terms that couple the networks
               monitor_terms(batches)      detached diagnostics, logged, never minimised
    deploy     deploy(net)                 the network without what only training needs (SiLa's heads)
    any time   deploy_form(model, cfg)     the deploy network itself changed (IMTA's links, ZTW's ensembles): applied
                                           by ``runs.rundir.build_model``, so a finished run is rebuilt with them

``ModelBatch`` is what a technique sees of a step: one network's raw output, its per-exit logits, the gate
decisions of a gated network, the labels, the exit weights and the run's ``Config``, from which it reads its own
settings (``cfg.section(its dataclass)``). ``order`` fixes where its terms go in the sum (part of the numerics).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from dynsila.config import TECHNIQUE_SECTIONS, Config, TechniqueSection, register_section
from dynsila.errors import ConfigError
from dynsila.models import DynamicOutput, MultiExitNetwork


class ModelBatch(NamedTuple):
    """One network's training output on one batch, with what every technique needs beside it (a NamedTuple:
    ``torch.compile`` traces the training step through it without a graph break)."""

    output: object  # what the network returned: list of logits, DynamicOutput (gated) or a wrapper's output
    logits: list[torch.Tensor]  # per exit, N x C
    gates: DynamicOutput | None  # the gate decisions of a gated network (inside a wrapper's output or not), else None
    labels: torch.Tensor  # N
    exit_weights: list[float]  # w_k, one per exit
    cfg: Config


@dataclass
class Step:
    """What ``before_step`` gets: the networks being trained, this optimizer step's normalised batch, the run's
    config and the optimizer's current learning rate."""

    networks: nn.Module  # the ``Networks`` module (or its DDP wrapper)
    images: torch.Tensor  # N x 3 x H x W, normalised
    labels: torch.Tensor  # N
    cfg: Config
    lr: float
    optimizer: torch.optim.Optimizer | None = None  # the run's optimizer (its state as before this step)
    rows: slice | None = None  # the rows of ``images`` this optimizer step trains on (None: all; see step_rows)


class Technique:
    """A training technique: each hook adds nothing unless the technique overrides it."""

    name: str = ""
    settings: type | None = None  # the dataclass of its config keys, or None
    section: str = ""  # the YAML section of those keys: its own (``sila``) or a core one (``loss``, ``train``)
    order: int = 100  # its place in the loss sum (the built-ins: 10, 20, 30, 40; a new technique goes after them)

    def active(self, cfg: Config) -> bool:
        """Whether the run uses it (for the run's first log line)."""
        return False

    def network_configs(self, cfg: Config) -> list[tuple[str, Config]] | None:
        """(folder name, config) of each network trained side by side, or None for the one the config describes."""
        return None

    def prepare(self, net: nn.Module, cfg: Config) -> nn.Module:
        """The network as this technique trains it (a wrapper around it, or the network itself, set up)."""
        return net

    def validate(self, nets: Sequence[nn.Module], cfg: Config) -> None:
        """Raise (one line) when the prepared networks cannot be trained together."""

    def step_rows(self, cfg: Config, n: int) -> list[slice] | None:
        """The rows of a batch of ``n`` that each of several optimizer steps trains on, or None for one step on all."""
        return None

    def before_step(self, step: Step) -> None:
        """Anything it does before the step's forward pass (e.g. a meta-learning update of its own module)."""

    def replaces_exit_ce(self, batch: ModelBatch) -> bool:
        """True when this technique's terms stand in for the exit cross-entropy (which is then left out)."""
        return False

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        """Terms of one network's loss (each network gets its own; equal names are summed over networks)."""
        return {}

    def ensemble_terms(self, batches: Sequence[ModelBatch]) -> dict[str, torch.Tensor]:
        """Terms that couple the networks trained together (one ``ModelBatch`` per network)."""
        return {}

    def monitor_terms(self, batches: Sequence[ModelBatch]) -> dict[str, torch.Tensor]:
        """Detached diagnostics logged beside the loss, never minimised."""
        return {}

    def deploy(self, net: nn.Module) -> nn.Module:
        """The network without this technique's training-only parts (a copy when anything is removed)."""
        return net

    def deploy_form(self, model: MultiExitNetwork, cfg: Config) -> MultiExitNetwork:
        """The network as this technique deploys it, built from the bare one: modules it adds to the deploy network
        (kept by ``deploy``, counted by the cost code, rebuilt from the config when a run is loaded), or ``model``."""
        return model


_TABLE: list[Technique] = []
TECHNIQUES: list[Technique] = []  # the table, in loss order (``order``, then registration)


def register_technique(technique: Technique) -> Technique:
    """Add a technique to the table, and its config keys to the schema; returns it (``X = register_technique(X())``)."""
    if any(t.name == technique.name for t in _TABLE) or not technique.name:
        raise ValueError(f"a training technique named {technique.name!r} is registered already (or has no name)")
    if technique.settings is not None:
        section = technique.section or technique.name
        register_section(TechniqueSection(technique.name, section, technique.settings, technique.active))
    _TABLE.append(technique)
    TECHNIQUES[:] = sorted(_TABLE, key=lambda t: t.order)  # stable: equal orders keep registration order
    return technique


def unregister_technique(name: str) -> None:
    """Remove a technique and its config keys (tests that register one of their own clean up with this)."""
    _TABLE[:] = [t for t in _TABLE if t.name != name]
    TECHNIQUES[:] = sorted(_TABLE, key=lambda t: t.order)
    TECHNIQUE_SECTIONS[:] = [s for s in TECHNIQUE_SECTIONS if s.owner != name]


class Networks(nn.Module):
    """The networks trained together (one, or several side by side), as one module for DDP and checkpoints.
    Its parameters are named ``peers.<i>.``, as in every checkpoint written before the table existed."""

    def __init__(self, nets: list[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> list[object]:
        return [net(x) for net in self.peers]


def strip_wrappers(net: nn.Module) -> nn.Module:
    """The module inside torch.compile and DistributedDataParallel wrappers."""
    net = getattr(net, "_orig_mod", net)  # torch.compile
    return getattr(net, "module", net)  # DistributedDataParallel


def unwrap(net: nn.Module) -> MultiExitNetwork:
    """The bare network inside DDP / torch.compile / technique wrappers (each holds it as ``.model``), sharing its
    weights (no copy)."""
    net = strip_wrappers(net)
    while not isinstance(net, MultiExitNetwork) and isinstance(inner := getattr(net, "model", None), nn.Module):
        net = inner
    if not isinstance(net, MultiExitNetwork):
        raise TypeError(f"{type(net).__name__} does not follow the multi-exit protocol (models.MultiExitNetwork)")
    return net


def network_configs(cfg: Config) -> list[tuple[str | None, Config]]:
    """(folder, config) of each network the run trains: a technique's (``network_configs``), or the config's one."""
    found = [(t.name, c) for t in TECHNIQUES if (c := t.network_configs(cfg))]
    if len(found) > 1:
        raise ConfigError(f"{found[0][0]} and {found[1][0]} each train several networks; switch one of them off")
    return list(found[0][1]) if found else [(None, cfg)]


def step_rows(cfg: Config, n: int) -> list[slice | None]:
    """The rows of each optimizer step a batch of ``n`` takes: a technique's (``step_rows``), or [None] (one step)."""
    found = [(t.name, rows) for t in TECHNIQUES if (rows := t.step_rows(cfg, n))]
    if len(found) > 1:
        raise ConfigError(f"{found[0][0]} and {found[1][0]} each split the batch into steps; switch one of them off")
    return list(found[0][1]) if found else [None]


def validate_networks(nets: Sequence[nn.Module], cfg: Config) -> None:
    for technique in TECHNIQUES:
        technique.validate(nets, cfg)


def prepare_network(net: nn.Module, cfg: Config) -> nn.Module:
    """The network as the run trains it: every technique's ``prepare`` in table order."""
    for technique in TECHNIQUES:
        net = technique.prepare(net, cfg)
    return net


def deploy_form(model: MultiExitNetwork, cfg: Config) -> MultiExitNetwork:
    """The network the config deploys: every technique's ``deploy_form`` in table order (the bare one unless a
    technique changes the deploy network)."""
    for technique in TECHNIQUES:
        model = technique.deploy_form(model, cfg)
    return model


def deploy_network(net: nn.Module) -> MultiExitNetwork:
    """The deployable network: a copy without DDP / compile wrappers and every technique's training-only parts;
    the same class, state-dict keys and parameter count as the config's ``deploy_form`` (the bare network unless
    a technique changes the deploy network)."""
    net = strip_wrappers(net)
    for technique in reversed(TECHNIQUES):
        net = technique.deploy(net)
    bare = unwrap(net)
    return copy.deepcopy(bare)
