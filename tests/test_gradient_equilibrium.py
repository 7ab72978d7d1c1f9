"""Gradient equilibrium: the trunk's gradient at each exit's state is the mean of the per-exit gradients there."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynsila import models
from dynsila.config import load_config
from dynsila.errors import ConfigError
from dynsila.methods.exit_chain import ChainedExits, chain_exits
from dynsila.methods.gradient_equilibrium import (
    GradientEquilibriumConfig,
    equilibrium_factors,
    has_gradient_equilibrium,
    install_gradient_equilibrium,
)
from dynsila.methods.technique import deploy_network, prepare_network
from dynsila.models import MultiExitNetwork
from dynsila.runs.rundir import load_deploy_model
from dynsila.training.train import train


class Head(nn.Module):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(h))


class Chain(MultiExitNetwork):
    """Stages of one linear layer each; exits after ``exit_after`` (a stage may have none)."""

    def __init__(self, n_stages: int = 3, exit_after: tuple[int, ...] = (0, 1, 2), width: int = 5) -> None:
        super().__init__()
        self.stem = nn.Identity()
        self.stages = nn.ModuleList(nn.Linear(width, width) for _ in range(n_stages))
        self.exits = nn.ModuleList(Head(width, 4) for _ in exit_after)
        self.exit_after = list(exit_after)


def stage_outputs(net: Chain) -> list[torch.Tensor]:
    """Capture each stage's raw output (hooked before GE's hooks, so it sees the output before rescaling)."""
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        output.retain_grad()
        captured.append(output)

    for stage in net.stages:
        stage.register_forward_hook(keep)
    return captured


@pytest.mark.parametrize("layout", [(3, (0, 1, 2)), (4, (0, 2, 3)), (4, (1, 3))])
def test_the_gradient_at_each_exit_state_is_the_mean_of_the_exit_gradients(layout):
    n_stages, after = layout
    torch.manual_seed(0)
    plain = Chain(n_stages, after)
    ge = copy.deepcopy(plain)
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    # without GE: each exit's loss gradient at every stage output, one autograd call per exit
    h = stage_outputs(plain)
    losses = [F.cross_entropy(z, y) for z in plain(x)]
    per_exit = [torch.autograd.grad(loss, h, allow_unused=True, retain_graph=True) for loss in losses]
    head_grads = [torch.autograd.grad(loss, plain.exits[k].fc.weight, retain_graph=True)[0] for k, loss in
                  enumerate(losses)]  # fmt: skip
    # with GE: one backward of the summed loss
    h_ge = stage_outputs(ge)
    install_gradient_equilibrium(ge)
    logits = ge(x)
    for z, z_plain in zip(logits, plain(x), strict=True):
        assert torch.equal(z, z_plain)  # GE never changes a forward value
    sum(F.cross_entropy(z, y) for z in logits).backward()
    num_exits = len(after)
    for k, stage in enumerate(after):  # the state exit k reads: the mean over the exits j >= k
        expected = sum(per_exit[j][stage] for j in range(k, num_exits)) / (num_exits - k)
        assert torch.allclose(h_ge[stage].grad, expected, atol=1e-6), (k, stage)
        assert torch.allclose(ge.exits[k].fc.weight.grad, head_grads[k], atol=1e-6)  # the exit's own: unscaled
    # and the plain summed gradient is not that (GE does change the trunk's gradient)
    plain_sum = sum(per_exit[j][after[0]] for j in range(num_exits))
    assert not torch.allclose(h_ge[after[0]].grad, plain_sum, atol=1e-4)


def test_the_factors_are_the_papers():
    assert equilibrium_factors(3) == [(1 / 3, 2.0), (1 / 2, 1.0), (1.0, 0.0)]


def test_two_exits_on_one_stage_are_refused():
    with pytest.raises(ConfigError, match="at most one exit per stage"):
        install_gradient_equilibrium(Chain(3, (1, 1)))


def build_msdnet(tiny_model_kwargs, seed=0):
    torch.manual_seed(seed)
    return models.build("msdnet", num_classes=10, **tiny_model_kwargs)


def test_msdnet_deploy_is_the_plain_network_with_its_logits(tiny_model_kwargs):
    plain = build_msdnet(tiny_model_kwargs)
    cfg = load_config(None, ["sila.enabled=false", "ge.enabled=true"])
    net = prepare_network(build_msdnet(tiny_model_kwargs), cfg)
    assert has_gradient_equilibrium(net)
    deployed = deploy_network(net)
    assert not has_gradient_equilibrium(deployed) and has_gradient_equilibrium(net)  # a copy; training net kept
    assert type(deployed) is type(plain) and list(deployed.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.randn(4, 3, 8, 8)
    for a, b, c in zip(deployed.eval()(x), plain.eval()(x), net.eval()(x), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_msdnet_ge_rescales_the_trunk_and_off_changes_nothing(tiny_model_kwargs):
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))

    def grads(net):
        sum(F.cross_entropy(z, y) for z in net.train()(x)).backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    plain = grads(build_msdnet(tiny_model_kwargs))
    off = grads(prepare_network(build_msdnet(tiny_model_kwargs), load_config(None, ["sila.enabled=false"])))
    on = grads(prepare_network(build_msdnet(tiny_model_kwargs), load_config(None, ["sila.enabled=false",
                                                                                  "ge.enabled=true"])))  # fmt: skip
    assert all(torch.equal(plain[n], off[n]) for n in plain)  # off: bit-identical
    assert any(not torch.allclose(plain[n], on[n]) for n in plain if n.startswith("stem."))  # the trunk: rescaled
    assert torch.allclose(plain["exits.2.fc.weight"], on["exits.2.fc.weight"])  # the last exit's own classifier


@pytest.mark.parametrize("model", ["msdnet", "timm"])
def test_ge_trains_with_sila_on_msdnet_and_a_timm_backbone(tiny_config, model):
    sections = {"ge": {"enabled": True}, "sila": {"enabled": True}}
    if model == "timm":
        sections["model"] = {"name": "timm_exits", "backbone": "test_resnet", "exit_stages": [2, 3, 4],
                             "exit_head": "linear", "pretrained": False}  # fmt: skip
    cfg = load_config(tiny_config(f"ge_{model}", **sections))
    assert cfg.section(GradientEquilibriumConfig).enabled
    result = train(cfg)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["ce"] > 0 and row["sila"] > 0 and len(result.test_top1) == 3
    deployed, _ = load_deploy_model(result.run_dir)  # rebuilt from its config: the plain network's keys
    assert not has_gradient_equilibrium(deployed)


def test_vit_exits_take_ge():
    torch.manual_seed(0)
    plain = models.build("vit_exits", num_classes=5, img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2,
                         exits=[1, 2, 3])  # fmt: skip
    ge = copy.deepcopy(plain)
    h_plain, h_ge = stage_outputs(plain), stage_outputs(ge)
    install_gradient_equilibrium(ge)
    x = torch.randn(2, 3, 16, 16)
    per_exit = [torch.autograd.grad(z.sum(), h_plain[0], retain_graph=True)[0] for z in plain(x)]
    sum(z.sum() for z in ge(x)).backward()
    assert torch.allclose(h_ge[0].grad, sum(per_exit) / 3, atol=1e-5)  # the first stage: the mean of three exits


@pytest.mark.parametrize("layout", [(3, (0, 1, 2)), (4, (1, 3))])
def test_on_a_chained_network_the_exit_states_get_the_mean_of_the_exit_gradients(layout):
    n_stages, after = layout
    torch.manual_seed(0)
    plain = chain_exits(Chain(n_stages, after), "imta", lambda k, previous, fc: nn.Linear(4, 4, bias=False))
    ge = copy.deepcopy(plain)
    x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
    h = stage_outputs(plain.inner)  # the states the classifiers read: the inner network's stage outputs
    losses = [F.cross_entropy(z, y) for z in plain(x)]
    per_exit = [torch.autograd.grad(loss, h, allow_unused=True, retain_graph=True) for loss in losses]
    h_ge = stage_outputs(ge.inner)
    install_gradient_equilibrium(ge)  # raised TypeError on the chained state (a tuple) before
    logits = ge(x)
    assert all(torch.equal(a, b) for a, b in zip(logits, plain(x), strict=True))
    sum(F.cross_entropy(z, y) for z in logits).backward()
    for k, stage in enumerate(after):
        expected = sum(per_exit[j][stage] for j in range(k, len(after))) / (len(after) - k)
        assert torch.allclose(h_ge[stage].grad, expected, atol=1e-6), (k, stage)
    assert not has_gradient_equilibrium(deploy_network(ge))


@pytest.mark.parametrize("technique", [{"imta": {"enabled": True}}, {"ztw": {"enabled": True}}])
def test_ge_trains_with_imta_and_with_ztw(tiny_config, technique):
    name = next(iter(technique))
    cfg = load_config(tiny_config(f"ge_{name}", ge={"enabled": True}, sila={"enabled": False}, **technique))
    result = train(cfg)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["ce"] > 0 and len(result.test_top1) == 3
    deployed, _ = load_deploy_model(result.run_dir)
    assert isinstance(deployed, ChainedExits) and not has_gradient_equilibrium(deployed)
