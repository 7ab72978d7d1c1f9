"""SiLa's classifier twin (``sila.head: classifier``): a fresh copy of each exit's whole classifier.

Checked for the three families: it prunes to exactly the plain deploy model (keys, parameters, MACs), it starts
from an initialisation of its own, it reads exactly what the exit reads, and a copy-initialised twin would only
rescale the trunk's gradient (the documented symmetry)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dynsila import models
from dynsila.budget.flops import count_params, exit_costs
from dynsila.errors import ConfigError
from dynsila.methods.sila import SiLa, SiLaConfig, prune
from tests.conftest import TINY_MSDNET

CLASSIFIER = SiLaConfig(head="classifier")


def msdnet() -> models.MultiExitNetwork:
    return models.build("msdnet", num_classes=10, **{k: v for k, v in TINY_MSDNET.items() if k != "name"})


def timm_resnet() -> models.MultiExitNetwork:
    return models.build("timm_exits", num_classes=10, backbone="resnet18", exit_stages=[2, 4], exit_head="conv")


def skipnet() -> models.MultiExitNetwork:
    return models.build("skipnet", num_classes=10, depth=38, gate="ffgate2")


FAMILIES = {"msdnet": (msdnet, 8), "timm_resnet18": (timm_resnet, 32), "skipnet38": (skipnet, 16)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("softmax", ["separate", "joint_only"])
def test_classifier_twin_prunes_to_the_plain_deploy_model(family, softmax):
    build, size = FAMILIES[family]
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    net = SiLa(build(), SiLaConfig(head="classifier", softmax=softmax))
    twin_params = sum(p.numel() for p in net.heads.parameters())
    exit_params = sum(p.numel() for e in plain.exits for p in e.parameters())
    assert twin_params == exit_params  # one whole classifier per exit
    deployed = prune(net)
    assert type(deployed) is type(plain)
    assert list(deployed.state_dict()) == list(plain.state_dict())
    assert count_params(deployed) == count_params(plain)
    assert all(not m._forward_hooks for m in deployed.modules())
    shape = (3, size, size)
    assert exit_costs(deployed, shape) == exit_costs(plain, shape)
    assert exit_costs(net, shape) == exit_costs(plain, shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_classifier_twin_trains_a_step_and_reaches_the_trunk(family):
    build, size = FAMILIES[family]
    torch.manual_seed(0)
    net = SiLa(build(), CLASSIFIER)
    out = net(torch.randn(4, 3, size, size))
    assert [z.shape for z in out.twin_logits] == [z.shape for z in out.logits]
    sum(F.cross_entropy(z, torch.tensor([0, 1, 2, 3])) for z in out.twin_logits).backward()
    assert all(p.grad is not None for p in net.heads.parameters())
    trunk = [p for name, p in net.model.named_parameters() if not name.startswith("exits.")]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk)
    assert all(p.grad is None for p in net.model.exits.parameters())  # the twin loss never touches the main heads


def test_the_twin_has_its_own_initialisation_drawn_from_the_seed():
    torch.manual_seed(0)
    a = SiLa(msdnet(), CLASSIFIER)
    torch.manual_seed(0)
    b = SiLa(msdnet(), CLASSIFIER)
    for twin, same_seed_twin, main in zip(a.heads, b.heads, a.model.exits, strict=True):
        twin_w, main_w = twin.state_dict(), main.state_dict()
        assert all(torch.equal(twin_w[k], same_seed_twin.state_dict()[k]) for k in twin_w)  # reproducible
        conv_keys = [k for k, v in twin_w.items() if v.dim() == 4]
        assert conv_keys and all(not torch.equal(twin_w[k], main_w[k]) for k in conv_keys)  # its own draw
        # the family's initialisation: He-normal convolutions (fan-out), zero linear bias
        w = twin_w[conv_keys[0]]
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        assert w.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.35)
        assert torch.count_nonzero(twin_w["fc.bias"]) == 0


def test_classifier_twin_refuses_logits_attachment():
    with pytest.raises(ConfigError, match="sila.attach=features"):
        SiLa(msdnet(), SiLaConfig(head="classifier", attach="logits"))


def copy_initialised(net: SiLa) -> SiLa:
    for twin, main in zip(net.heads, net.model.exits, strict=True):
        twin.load_state_dict(copy.deepcopy(main.state_dict()))
    return net


def test_a_copy_initialised_twin_reads_exactly_what_its_exit_reads():
    torch.manual_seed(0)
    net = copy_initialised(SiLa(msdnet(), CLASSIFIER)).eval()
    out = net(torch.randn(5, 3, 8, 8))
    for z, z_twin in zip(out.logits, out.twin_logits, strict=True):
        assert torch.equal(z, z_twin)


def sgd_steps(net: torch.nn.Module, loss_of, steps: int = 3) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step()


def test_a_copy_initialised_twin_only_rescales_the_trunks_gradient():
    """Twin and exit get identical gradients and stay equal forever; the trunk then trains on (1 + lambda) x the
    baseline's gradient while each exit classifier trains on 1 x its own: SiLa adds no new signal."""
    lam = 1.0
    torch.manual_seed(0)
    sila = copy_initialised(SiLa(msdnet(), SiLaConfig(head="classifier", weight=lam)))
    reference = copy.deepcopy(sila.model)  # the same start, trained as baseline with its trunk's loss x (1 + lambda)

    def sila_loss(net, x, y):
        out = net(x)
        return sum(F.cross_entropy(z, y) + lam * F.cross_entropy(t, y) for z, t in zip(*out[:2], strict=True))

    def rescaled_trunk_loss(net, x, y):
        # exits on detached features see 1 x CE; the trunk sees (1 + lambda) x CE through a scaled copy
        return sum(F.cross_entropy(z, y) for z in net(x))

    trunk_scale_hooks = [
        p.register_hook(lambda g: g * (1 + lam))
        for name, p in reference.named_parameters()
        if not name.startswith("exits.")
    ]
    sgd_steps(sila, sila_loss)
    sgd_steps(reference, rescaled_trunk_loss)
    for hook in trunk_scale_hooks:
        hook.remove()
    for twin, main in zip(sila.heads, sila.model.exits, strict=True):
        for (name, a), b in zip(twin.state_dict().items(), main.state_dict().values(), strict=True):
            assert torch.allclose(a, b, atol=1e-6), name  # equal forever
    ours, theirs = sila.model.state_dict(), reference.state_dict()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name
