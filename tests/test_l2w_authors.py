"""L2W as its authors run it: the virtual step is the run's SGD step (MetaSGD), and each batch takes one meta update
and one optimizer step per half, halves swapped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dynsila import models
from dynsila.config import load_config
from dynsila.errors import ConfigError
from dynsila.methods import l2w
from dynsila.methods.l2w import L2WNetwork, optimizer_look_ahead
from dynsila.methods.technique import TECHNIQUES, Networks, Step, prepare_network, step_rows
from dynsila.training import train as train_module
from dynsila.training.train import train
from tests.conftest import TINY_MSDNET

AUTHORS = ["sila.enabled=false", "l2w.enabled=true", "l2w.hidden=16", "l2w.look_ahead=optimizer",
           "l2w.step_per_half=true"]  # fmt: skip


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_look_ahead_is_the_optimizers_own_step(nesterov):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    x = torch.randn(8, 4)
    for _ in range(3):  # fill the momentum buffers
        optimizer.zero_grad()
        net(x).square().sum().backward()
        optimizer.step()
    grads = [torch.randn_like(p) for p in net.parameters()]
    theta = dict(net.named_parameters())
    ahead = optimizer_look_ahead(theta, grads, 0.1, optimizer)
    for (name, p), g in zip(theta.items(), grads, strict=True):  # by hand: momentum 0.9, weight decay 0.01
        d = g + 0.01 * p
        buffer = 0.9 * optimizer.state[p]["momentum_buffer"] + d
        assert torch.allclose(ahead[name], p - 0.1 * (d + 0.9 * buffer if nesterov else buffer), atol=1e-6)
    stepped = copy.deepcopy((net, optimizer))  # torch's step on the same gradients lands on the same parameters
    for p, g in zip(stepped[0].parameters(), grads, strict=True):
        p.grad = g.clone()
    stepped[1].step()
    for (name, _), p in zip(theta.items(), stepped[0].parameters(), strict=True):
        assert torch.allclose(ahead[name], p, atol=1e-6)


def test_the_look_ahead_takes_the_first_step_without_a_buffer_and_changes_the_meta_gradient():
    msdnet = [f"model.{k}={v}".replace(" ", "") for k, v in TINY_MSDNET.items()]
    cfg = load_config(None, [*msdnet, "data.num_classes=10", "data.image_size=8", *AUTHORS])
    torch.manual_seed(0)
    net = prepare_network(models.build("msdnet", num_classes=10, **{k: v for k, v in TINY_MSDNET.items()
                                                                        if k != "name"}), cfg)  # fmt: skip
    assert isinstance(net, L2WNetwork)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    settings = cfg.l2w
    phi = {n: p.detach().requires_grad_() for n, p in net.weigher.net.named_parameters()}

    def meta_grad(opt):
        loss = l2w.look_ahead_meta_loss(net, phi, (x[:8], y[:8], x[8:], y[8:]), settings, [1.0] * 3, 0.1, opt)
        return torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(phi.values()))])

    plain = meta_grad(None)
    no_decay = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # no buffer, no decay: plain SGD
    assert torch.allclose(meta_grad(no_decay), plain, atol=1e-6)
    for _ in range(5):  # five momentum steps
        optimizer.zero_grad()
        sum(z.square().mean() for z in net(x)).backward()
        optimizer.step()
    plain = meta_grad(None)
    assert torch.nn.functional.cosine_similarity(meta_grad(optimizer), plain, dim=0) < 0.999


def test_the_batch_splits_into_torch_chunks_halves_only_when_asked():
    on = load_config(None, AUTHORS)
    assert step_rows(on, 9) == [slice(0, 5), slice(5, 9)] and step_rows(on, 1) == [None]
    assert step_rows(load_config(None, AUTHORS[:-1]), 9) == [None]
    with pytest.raises(ConfigError, match="train.optimizer=sgd"):
        next(t for t in TECHNIQUES if t.name == "l2w").validate([], load_config(None, [*AUTHORS,
                                                                               "train.optimizer=adamw"]))  # fmt: skip


def test_each_half_is_trained_on_once_and_meta_scored_once_with_roles_swapped(tiny_config, monkeypatch):
    looked, trained = [], []
    look_ahead, compute = l2w.look_ahead_meta_loss, train_module.forward_and_statistics

    def spy_look_ahead(net, phi, batch, *args):
        looked.append((batch[0].clone(), batch[2].clone()))
        return look_ahead(net, phi, batch, *args)

    def spy_compute(forward, cfg, amp, x, y):
        trained.append(x.clone())
        return compute(forward, cfg, amp, x, y)

    monkeypatch.setattr(l2w, "look_ahead_meta_loss", spy_look_ahead)
    monkeypatch.setattr(train_module, "forward_and_statistics", spy_compute)
    cfg = load_config(tiny_config("l2w_halves", sila={"enabled": False}, data={"batch_size": 64}),
                      [a for a in AUTHORS if not a.startswith("sila")])  # fmt: skip
    train(cfg)
    assert len(trained) == len(looked) and len(trained) % 2 == 0 and len(trained) >= 4
    for i in range(0, len(trained), 2):  # per batch: (virtual A, meta B), train A; (virtual B, meta A), train B
        a, b = trained[i], trained[i + 1]
        assert torch.equal(looked[i][0], a) and torch.equal(looked[i][1], b)
        assert torch.equal(looked[i + 1][0], b) and torch.equal(looked[i + 1][1], a)
        assert len(a) - len(b) in (0, 1)


def test_the_step_carries_the_optimizer_and_refuses_the_look_ahead_without_it():
    msdnet = [f"model.{k}={v}".replace(" ", "") for k, v in TINY_MSDNET.items()]
    cfg = load_config(None, [*msdnet, "data.num_classes=10", "data.image_size=8", *AUTHORS])
    net = prepare_network(models.build("msdnet", num_classes=10, **{k: v for k, v in TINY_MSDNET.items()
                                                                        if k != "name"}), cfg)  # fmt: skip
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    with pytest.raises(ValueError, match="optimizer"):
        l2w.meta_update(net, Step(Networks([net]), x, y, cfg, 0.1), [1.0] * 3)
