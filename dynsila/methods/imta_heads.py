"""IMTA's second stage as its authors run it: new classifiers and ISC links on a frozen first-stage network.

In github.com/kalviny/IMTA the ISC and OFA training (``main_IMTA.py`` with ``models/msdnet_imta.py``) starts from
an MSDNet trained with Gradient Equilibrium (``main_GE.py``, ``models/msdnet_ge.py``), freezes all of it
(``for param in model.module.net.parameters(): param.requires_grad = False``) and trains only new last linear
layers (``self.classifier``) and the links (``self.isc_modules``); the teacher of OFA is the frozen network's own
last classifier (``real_logits[-1]``). Here (``imta.stage: heads``) the run starts from the first-stage run's deploy
weights (``train.init_from``: a run of the plain network, e.g. ``ge.enabled: true``, loaded into the network inside
the chain; the links start fresh), and ``TaughtNetwork``:

- keeps a frozen copy of the loaded last exit's ``fc`` as the teacher: on every forward it reads what the last exit's
  ``fc`` reads (a forward hook), so its logits are the first-stage network's last exit on the same features;
- re-initialises every exit's ``fc`` (PyTorch's default ``nn.Linear`` initialisation, as the authors' new
  ``nn.Linear`` classifiers) and freezes every other parameter of the network but the links;
- keeps the trunk and the exit heads in eval mode (``ChainedExits.trains_only_classifiers``): their batch-norm
  statistics stay the first stage's, so the frozen part is bit-identical after training. Deviation: the authors
  call ``model.train()``, so their frozen batch norms normalise with batch statistics and update their running
  estimates though no weight moves.

``deploy`` drops the wrapper (the teacher): the deploy network is the chained one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dynsila.methods.exit_chain import ChainedExits
from dynsila.methods.technique import unwrap


class TaughtLogits(list):
    """An exit-logit list carrying the frozen teacher's logits (N x C) of the same batch."""

    teacher: torch.Tensor


class ReadTeacher:
    """A forward hook on the last exit's ``fc``: the frozen teacher's logits of what that ``fc`` reads."""

    def __init__(self, teacher: nn.Linear) -> None:
        self.teacher = teacher
        self.logits: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self.logits = self.teacher(inputs[0])


class TaughtNetwork(nn.Module):
    """Training wrapper of IMTA's second stage: the network (``.model``) and the frozen teacher (``.teacher``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        chained = unwrap(model)
        if not isinstance(chained, ChainedExits):
            raise TypeError(f"imta.stage=heads trains the links of a chained network, not a {type(chained).__name__}")
        last_fc = chained.inner.exits[-1].fc
        assert isinstance(last_fc, nn.Linear)  # chain_exits refuses exits without one
        self.teacher = copy.deepcopy(last_fc).requires_grad_(False)
        freeze_all_but_classifiers(chained)
        self.__dict__["_reader"] = reader = ReadTeacher(self.teacher)
        last_fc.register_forward_hook(reader)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> Any:
        reader = self.__dict__["_reader"]
        reader.logits = None
        output = self.model(x, upto=upto)
        teacher, reader.logits = reader.logits, None
        return output if teacher is None else tag_teacher(output, teacher)

    def without_teacher(self) -> nn.Module:
        """A copy of the network inside, without the teacher's hook (what ``deploy`` hands on)."""
        bare = copy.deepcopy(self.model)
        for module in bare.modules():
            hooks = module._forward_hooks
            for key in [k for k, hook in hooks.items() if isinstance(hook, ReadTeacher)]:
                del hooks[key]
        return bare


def freeze_all_but_classifiers(chained: ChainedExits) -> None:
    """Every parameter frozen but each exit's ``fc`` (re-initialised) and the links; trunk and heads in eval mode."""
    chained.requires_grad_(False)
    for head in chained.inner.exits:
        fc = head.fc
        assert isinstance(fc, nn.Linear)
        fc.reset_parameters()
        fc.requires_grad_(True)
    for stage in chained.stages:
        stage.links.requires_grad_(True)
    chained.trains_only_classifiers = True


def tag_teacher(output: Any, teacher: torch.Tensor) -> Any:
    """``output`` with its logit list replaced by a ``TaughtLogits`` (a list, or a NamedTuple's ``logits``)."""
    logits = getattr(output, "logits", output)
    tagged = TaughtLogits(logits)
    tagged.teacher = teacher
    return tagged if output is logits else output._replace(logits=tagged)
