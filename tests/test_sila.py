import math

import pytest
import torch
import torch.nn.functional as F

from dynsila import models
from dynsila.budget.flops import exit_costs
from dynsila.config import Config, LossConfig
from dynsila.errors import ConfigError
from dynsila.methods.losses import loss_terms
from dynsila.methods.sila import SiLa, SiLaConfig, SiLaOutput, joint_siamese_cross_entropy, prune, sila_loss_terms

VARIANTS = [
    SiLaConfig(),
    SiLaConfig(attach="logits"),
    SiLaConfig(softmax="joint"),
    SiLaConfig(softmax="joint_only"),
    SiLaConfig(head="mlp", hidden=16, consistency=0.5, temperature=2.0),
]


def build(kwargs, seed=0):
    torch.manual_seed(seed)
    return models.build("msdnet", num_classes=10, **kwargs)


@pytest.mark.parametrize("cfg", VARIANTS)
def test_prune_gives_the_plain_model(tiny_model_kwargs, cfg):
    plain = build(tiny_model_kwargs)
    net = SiLa(build(tiny_model_kwargs), cfg)
    assert sum(p.numel() for p in net.parameters()) > sum(p.numel() for p in plain.parameters())
    deployed = prune(net)
    assert type(deployed) is type(plain)
    assert list(deployed.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in plain.parameters())
    assert all(not e.fc._forward_hooks for e in deployed.exits)


@pytest.mark.parametrize("cfg", VARIANTS)
def test_pruned_logits_equal_the_wrappers_main_logits(tiny_model_kwargs, cfg):
    net = SiLa(build(tiny_model_kwargs), cfg).eval()
    x = torch.randn(4, 3, 8, 8)
    out = net(x)
    deployed = prune(net).eval()
    for z_wrapped, z_deployed in zip(out.logits, deployed(x), strict=True):
        assert torch.equal(z_wrapped, z_deployed)
    assert len(out.twin_logits) == 3 and out.twin_logits[0].shape == (4, 10)
    # the wrapper keeps working after pruning, and truncation applies to the twins too
    assert len(net(x, upto=1).twin_logits) == 2


@pytest.mark.parametrize("cfg", VARIANTS)
def test_sila_loss_gradients_reach_the_backbone(tiny_model_kwargs, cfg):
    net = SiLa(build(tiny_model_kwargs), cfg)
    out = net(torch.randn(4, 3, 8, 8))
    terms = sila_loss_terms(out, torch.tensor([0, 1, 2, 3]), cfg, [1.0, 1.0, 1.0])
    # the twin term alone, without the main CE (joint_only: the joint CE, which stands in for it)
    terms["joint_ce" if cfg.softmax == "joint_only" else "sila"].backward()
    stem_grad = net.model.stem.scales[0][0].weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.heads.parameters())


def test_hooks_are_inert_outside_the_wrapper(tiny_model_kwargs):
    net = SiLa(build(tiny_model_kwargs), SiLaConfig())
    net.model(torch.randn(2, 3, 8, 8))  # evaluating the bare model through the wrapper's weights
    assert net._captured == {}


def test_joint_softmax_known_value():
    # equal logits everywhere: softmax over 2C classes is uniform, so the loss is log(2C)
    z = torch.zeros(3, 5)
    loss = joint_siamese_cross_entropy(z, z.clone(), torch.tensor([0, 3, 4]))
    assert loss.item() == pytest.approx(math.log(10))
    # perfect agreement on the label in both halves: mass 1/2 on each -> loss log 2
    z = torch.full((1, 5), -1e4)
    z[0, 2] = 0
    assert joint_siamese_cross_entropy(z, z.clone(), torch.tensor([2])).item() == pytest.approx(math.log(2))


def test_separate_loss_terms_match_the_formula():
    torch.manual_seed(0)
    z, z2 = [torch.randn(6, 4)], [torch.randn(6, 4)]
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    cfg = SiLaConfig(weight=0.7, consistency=0.3, temperature=2.0)
    terms = sila_loss_terms(SiLaOutput(z, z2), y, cfg, [2.0])
    assert terms["sila"].item() == pytest.approx(2.0 * 0.7 * F.cross_entropy(z2[0], y).item(), rel=1e-6)
    p_twin, p_main = F.softmax(z2[0] / 2, 1), F.softmax(z[0] / 2, 1)
    kl = (p_twin * (p_twin.log() - p_main.log())).sum(1).mean()
    assert terms["consistency"].item() == pytest.approx(2.0 * 0.3 * 4 * kl.item(), rel=1e-5)


def _hand_joint_ce(z: list[list[float]], z_twin: list[list[float]], labels: list[int]) -> float:
    """-1/2 [log q_y + log q'_y] averaged over samples, q = softmax of the 2C logits, in plain Python floats."""
    total = 0.0
    for row, twin_row, y in zip(z, z_twin, labels, strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row + twin_row))
        total += -0.5 * ((row[y] - log_norm) + (twin_row[y] - log_norm))
    return total / len(labels)


def test_joint_only_loss_is_the_weighted_joint_cross_entropy_alone():
    z = [[[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]], [[0.5, 0.5, -2.0], [3.0, -1.0, 0.0]]]  # exit x sample x class
    z_twin = [[[-0.3, 0.8, 0.1], [1.5, 0.2, 0.4]], [[0.0, -1.0, 1.0], [2.0, 2.0, -0.5]]]
    labels = [2, 1]
    cfg = Config(loss=LossConfig(exit_weights=[0.5, 2.0], ce_weight=1.5)).with_section(SiLaConfig(softmax="joint_only"))
    output = SiLaOutput([torch.tensor(e) for e in z], [torch.tensor(e) for e in z_twin])
    terms = loss_terms(output, torch.tensor(labels), cfg)
    assert set(terms) == {"joint_ce"}  # no separate main cross-entropy and no twin term beside it
    expected = 1.5 * (0.5 * _hand_joint_ce(z[0], z_twin[0], labels) + 2.0 * _hand_joint_ce(z[1], z_twin[1], labels))
    assert terms["joint_ce"].item() == pytest.approx(expected, rel=1e-6)


def test_joint_only_at_equal_halves_is_the_plain_cross_entropy_plus_log_two():
    # z' = z: each half holds half of softmax(z), so -1/2 (log p_y/2 + log p_y/2) = CE(z, y) + log 2
    torch.manual_seed(0)
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert joint_siamese_cross_entropy(z, z.clone(), y).item() == pytest.approx(
        F.cross_entropy(z, y).item() + math.log(2), rel=1e-6
    )


def test_joint_only_deploy_model_is_the_baseline_model(tiny_model_kwargs):
    plain = build(tiny_model_kwargs)
    net = SiLa(build(tiny_model_kwargs), SiLaConfig(softmax="joint_only"))
    deployed = prune(net)
    assert list(deployed.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in deployed.parameters()) == sum(p.numel() for p in plain.parameters())
    assert exit_costs(deployed, (3, 8, 8)) == exit_costs(plain, (3, 8, 8))
    assert exit_costs(net, (3, 8, 8)) == exit_costs(plain, (3, 8, 8))  # the wrapper is costed as its deploy model


def test_joint_only_refuses_a_twin_weight(tiny_model_kwargs):
    with pytest.raises(ConfigError, match="loss.ce_weight"):
        SiLa(build(tiny_model_kwargs), SiLaConfig(softmax="joint_only", weight=0.5))
