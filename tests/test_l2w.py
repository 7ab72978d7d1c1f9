"""L2W-DEN: per-sample, per-exit weights from a meta-learned net whose meta set is the training batch only."""

from __future__ import annotations

import json

import pytest
import torch

from dynsila import models
from dynsila.config import load_config
from dynsila.data import normalize
from dynsila.errors import ConfigError
from dynsila.methods import l2w
from dynsila.methods.l2w import (
    L2WNetwork,
    WeighedLogits,
    assign_to_exits,
    exit_shares,
    meta_halves,
    normalised_weights,
)
from dynsila.methods.losses import ensemble_loss_terms
from dynsila.methods.technique import TECHNIQUES, Networks, Step, deploy_network, prepare_network
from dynsila.runs import checkpoint as ckpt
from dynsila.runs.rundir import load_deploy_model
from dynsila.training import train as train_module
from dynsila.training.train import train
from tests.conftest import TINY_MSDNET

ON = ["sila.enabled=false", "l2w.enabled=true", "l2w.hidden=16"]


def tiny(overrides: list[str], seed: int = 0) -> tuple[torch.nn.Module, object]:
    msdnet = [f"model.{k}={v}".replace(" ", "") for k, v in TINY_MSDNET.items()]
    cfg = load_config(None, [*msdnet, "data.num_classes=10", "data.image_size=8", *overrides])
    torch.manual_seed(seed)
    return prepare_network(models.build("msdnet", num_classes=10, **{k: v for k, v in TINY_MSDNET.items()
                                                                     if k != "name"}), cfg), cfg  # fmt: skip


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def l2w_technique():
    return next(t for t in TECHNIQUES if t.name == "l2w")


def test_weights_are_per_sample_and_exit_and_average_one():
    raw = torch.tanh(torch.randn(8, 3))
    for mode, dim in (("per_sample", 1), ("per_exit", 0)):
        w = normalised_weights(raw, mode, 0.5)
        assert w.shape == (8, 3) and torch.allclose(w.mean(dim=dim), torch.ones(w.shape[1 - dim]))
        assert bool((w > 0).all())  # epsilon <= 0.5 with tanh outputs: every weight positive
    assert torch.allclose(normalised_weights(raw, "whole_batch", 0.8).mean(), torch.tensor(1.0))


def test_the_weighted_loss_uses_the_weight_nets_per_sample_weights():
    net, cfg = tiny(ON)
    x, y = batch()
    out = net.train()(x)
    assert isinstance(out, WeighedLogits) and out.weigher is net.weigher
    terms = ensemble_loss_terms([out], y, cfg)
    assert list(terms) == ["weighted_ce"]  # stands in for ce
    losses = l2w.per_sample_losses(out, y)
    w = normalised_weights(net.weigher(losses), "per_sample", 0.8)
    assert w.shape == (16, 3) and float(w.detach().std(dim=0).min()) > 0  # differs across samples, at every exit
    assert torch.allclose(terms["weighted_ce"], (w * losses).mean(0).sum())


def test_exit_shares_and_assignment_follow_confidence():
    assert exit_shares(0.5, 3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    z0 = torch.tensor([[5.0, 0], [0, 0], [4.0, 0], [0, 0]])  # samples 0 and 2 confident at exit 0
    z1 = torch.tensor([[0.0, 0], [3.0, 0], [0, 0], [0, 0]])  # sample 1 confident at exit 1
    chosen = assign_to_exits([z0, z1, z1], [0.5, 0.25, 0.25])
    assert [sorted(i.tolist()) for i in chosen] == [[0, 2], [1], [3]]


def test_the_meta_update_changes_the_weight_net_and_nothing_of_the_classifier():
    net, cfg = tiny(ON)
    x, y = batch()
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    phi = {k: v.clone() for k, v in net.weigher.net.state_dict().items()}
    l2w_technique().before_step(Step(Networks([net]), x, y, cfg, lr=0.1))
    assert all(torch.equal(before[k], v) for k, v in net.model.state_dict().items())  # params and BN stats
    assert all(p.grad is None for p in net.model.parameters())
    assert any(not torch.equal(phi[k], v) for k, v in net.weigher.net.state_dict().items())
    assert int(net.weigher.updates) == 1 and float(net.weigher.adam_v_0_weight.abs().sum()) > 0


def test_the_meta_interval_skips_steps():
    net, cfg = tiny([*ON, "l2w.meta_interval=3"])
    x, y = batch()
    for _ in range(4):
        l2w_technique().before_step(Step(Networks([net]), x, y, cfg, lr=0.1))
    assert int(net.weigher.steps) == 4 and int(net.weigher.updates) == 2  # steps 1 and 4


def test_meta_halves_are_rows_of_the_training_batch_and_disjoint():
    x, y = batch(10)
    (xa, ya), (xb, yb) = meta_halves(x, y, flip=False)
    assert torch.equal(torch.cat([xa, xb]), x) and torch.equal(torch.cat([ya, yb]), y)
    (xa2, _), (xb2, _) = meta_halves(x, y, flip=True)
    assert torch.equal(xa2, xb) and torch.equal(xb2, xa)


def test_off_is_the_plain_network_and_leaves_the_rng_alone():
    net, cfg = tiny(["sila.enabled=false"])
    assert not isinstance(net, L2WNetwork) and not any(isinstance(m, L2WNetwork) for m in net.modules())
    x, y = batch()
    state = torch.get_rng_state()
    l2w_technique().before_step(Step(Networks([net]), x, y, cfg, lr=0.1))
    assert torch.equal(state, torch.get_rng_state())
    assert list(ensemble_loss_terms([net(x)], y, cfg)) == ["ce"]


def test_deploy_drops_the_weight_net(tiny_model_kwargs):
    net, _ = tiny(ON)
    torch.manual_seed(0)
    plain = models.build("msdnet", num_classes=10, **tiny_model_kwargs)
    deployed = deploy_network(net)
    assert type(deployed) is type(plain) and list(deployed.state_dict()) == list(plain.state_dict())
    x, _ = batch()
    for a, b in zip(deployed.eval()(x), net.eval()(x), strict=True):
        assert torch.equal(a, b)


def test_compile_is_refused(tiny_config):
    cfg = load_config(tiny_config("compiled", l2w={"enabled": True}, train={"compile": True}))
    with pytest.raises(ConfigError, match="set train.compile=false"):
        train(cfg)


def test_the_meta_set_never_holds_a_validation_or_test_sample(tiny_config, monkeypatch):
    """Overwrite every validation and test image with a marker (all 255); train; no meta image carries it."""
    real_splits, real_halves, seen, marker = train_module.build_splits, l2w.meta_halves, [], []

    def marked(data_cfg):
        splits = real_splits(data_cfg)
        splits.val.images.fill_(255)
        splits.test.images.fill_(255)
        marker.append(normalize(splits.val.images[:1], splits.mean, splits.std))
        return splits

    def recording(images, labels, flip):
        halves = real_halves(images, labels, flip)
        seen.append(halves[1][0])
        return halves

    monkeypatch.setattr(train_module, "build_splits", marked)
    monkeypatch.setattr(l2w, "meta_halves", recording)
    train(load_config(tiny_config("marked", l2w={"enabled": True, "hidden": 16})))

    def constant(x: torch.Tensor) -> torch.Tensor:  # N: every channel of the image one value
        flat = x.flatten(2)
        return (flat == flat[:, :, :1]).all(dim=2).all(dim=1)

    assert bool(constant(marker[0]).all())  # the check recognises a marked image
    assert len(seen) > 1 and not bool(constant(torch.cat(seen)).any())


@pytest.mark.parametrize("model", ["msdnet", "timm"])
def test_l2w_trains_with_sila_and_resumes_its_weight_net(tiny_config, model):
    sections = {"l2w": {"enabled": True, "hidden": 16}, "sila": {"enabled": True}}
    if model == "timm":
        sections["model"] = {"name": "timm_exits", "backbone": "test_resnet", "exit_stages": [2, 3, 4],
                             "exit_head": "linear", "pretrained": False}  # fmt: skip
    cfg = load_config(tiny_config(f"l2w_{model}", **sections))
    result = train(cfg)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["weighted_ce"] > 0 and row["sila"] > 0 and "ce" not in row
    state = ckpt.load_checkpoint(result.run_dir / "last.pt")["model"]
    assert int(state["peers.0.weigher.updates"]) > 0  # the weight net and its Adam state are in the checkpoint
    deployed, _ = load_deploy_model(result.run_dir)
    assert not any("weigher" in k for k in deployed.state_dict())


def test_a_resumed_run_continues_the_weight_net_exactly(tiny_config):
    sections = {"l2w": {"enabled": True, "hidden": 16}, "sila": {"enabled": False}, "data": {"batch_size": 512}}
    constant = ["train.schedule=constant"]  # so that a 1-epoch run is the first half of a 2-epoch one
    straight = train(load_config(tiny_config("straight", **sections), [*constant, "train.epochs=2"]))
    train(load_config(tiny_config("resumed", **sections), [*constant, "train.epochs=1"]))
    resumed = train(load_config(tiny_config("resumed", **sections), [*constant, "train.epochs=2", "resume=true"]))
    a = ckpt.load_checkpoint(straight.run_dir / "last.pt")["model"]
    b = ckpt.load_checkpoint(resumed.run_dir / "last.pt")["model"]
    assert int(a["peers.0.weigher.updates"]) > 1
    assert all(torch.equal(a[k], b[k]) for k in a)  # the network, the weight net and its Adam moments
