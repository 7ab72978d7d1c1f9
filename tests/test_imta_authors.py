"""IMTA as its authors run it: KL reduced over batch and classes, and the second stage (new classifiers and links
on the frozen first-stage network, whose last exit teaches)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dynsila.methods  # noqa: F401  (registers imta)
from dynsila.config import Config, load_config
from dynsila.errors import ConfigError
from dynsila.methods.exit_chain import ChainedExits
from dynsila.methods.imta import IMTAConfig, imta_loss_terms
from dynsila.methods.imta_heads import ReadTeacher, TaughtLogits, TaughtNetwork
from dynsila.methods.losses import ensemble_loss_terms
from dynsila.methods.self_distill import self_distillation_loss
from dynsila.methods.technique import deploy_network, prepare_network
from dynsila.runs.rundir import build_model, load_deploy_model
from dynsila.training.train import train
from tests.conftest import TINY_MSDNET, randomise_batchnorm

C = 5
HEADS = ["imta.enabled=true", "imta.stage=heads", "imta.detach=false", "imta.kl_reduction=mean"]


def tiny_cfg(*overrides: str) -> Config:
    model = [f"model.{k}={v}".replace(" ", "") for k, v in TINY_MSDNET.items()]
    return load_config(None, [*model, f"data.num_classes={C}", "data.image_size=8", "sila.enabled=false", *overrides])


def test_the_mean_kl_is_batchmean_over_classes_and_the_authors_kl_div_loss():
    torch.manual_seed(0)
    logits, T = [torch.randn(8, C) for _ in range(3)], 2.0
    batchmean = self_distillation_loss(logits, [1.0, 0.5, 1.0], T)
    mean = self_distillation_loss(logits, [1.0, 0.5, 1.0], T, reduction="mean")
    assert torch.allclose(mean, batchmean / C)
    p = F.softmax(logits[-1] / T, 1)  # the authors' nn.KLDivLoss(): the pointwise KL averaged over all N x C entries
    theirs = sum(w * (p * (p.log() - F.log_softmax(z / T, 1))).mean() * T * T
                 for w, z in zip([1.0, 0.5], logits[:2], strict=True))  # fmt: skip
    assert torch.allclose(mean, theirs, atol=1e-6)


def test_a_given_teacher_stands_in_for_the_last_exit():
    torch.manual_seed(0)
    logits, labels, teacher = [torch.randn(8, C) for _ in range(3)], torch.randint(0, C, (8,)), torch.randn(8, C)
    cfg = IMTAConfig(enabled=True, gamma=0.1, temperature=1.0, kl_reduction="mean")
    terms = imta_loss_terms(logits, labels, [1.0] * 3, cfg, 1.0, teacher)
    p = F.softmax(teacher, 1)
    expected = sum((p * (p.log() - F.log_softmax(z, 1))).sum(1).mean() / C for z in logits[:2])
    assert torch.allclose(terms["ofa"], 0.1 * expected, atol=1e-6)
    own = imta_loss_terms(logits, labels, [1.0] * 3, cfg, 1.0)
    assert not torch.allclose(terms["ofa"], own["ofa"])


def first_and_second_stage():
    """(the first-stage plain network with spread batch-norm statistics, the second stage prepared from it)."""
    torch.manual_seed(0)
    plain = randomise_batchnorm(build_model(tiny_cfg()))
    cfg = tiny_cfg(*HEADS, "train.init_from=first")
    chained = build_model(cfg)
    assert isinstance(chained, ChainedExits)
    chained.inner.load_state_dict(plain.state_dict())
    return plain, prepare_network(chained, cfg), cfg


def test_the_teacher_is_the_frozen_first_stage_last_exit_and_the_classifiers_start_fresh():
    plain, net, _ = first_and_second_stage()
    assert isinstance(net, TaughtNetwork)
    x = torch.randn(6, 3, 8, 8)
    out = net.train()(x)
    assert isinstance(out, TaughtLogits)
    with torch.no_grad():
        assert torch.allclose(out.teacher, plain.eval()(x)[-1], atol=1e-6)  # trunk in eval mode: the same features
    for k, head in enumerate(net.model.inner.exits):
        assert not torch.equal(head.fc.weight, plain.exits[k].fc.weight) and head.fc.weight.requires_grad


def test_the_frozen_network_gets_no_gradient_and_stays_bit_identical():
    plain, net, cfg = first_and_second_stage()
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    trainable = {n for n, p in net.model.named_parameters() if p.requires_grad}
    assert trainable and all(".fc." in n or ".links." in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, C, (8,))
    for _ in range(2):
        optimizer.zero_grad()
        terms = ensemble_loss_terms([net.train()(x)], y, cfg)
        assert set(terms) == {"ce", "ofa"}
        sum(terms.values()).backward()
        optimizer.step()
    after = net.model.state_dict()
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert moved and all(".fc." in k or ".links." in k for k in moved)  # batch-norm statistics of the trunk too
    assert any(".links." in k and "running_mean" in k for k in moved)  # the links' batch norms train
    assert all(p.grad is None for n, p in net.model.named_parameters() if n not in trainable)
    assert all(not torch.equal(net.teacher.weight, fc.weight) for fc in [net.model.inner.exits[-1].fc])
    deployed = deploy_network(net)
    assert not any(isinstance(h, ReadTeacher) for m in deployed.modules() for h in m._forward_hooks.values())


def test_the_heads_stage_needs_a_first_stage_run():
    with pytest.raises(ConfigError, match="train.init_from"):
        prepare_network(build_model(tiny_cfg(*HEADS)), tiny_cfg(*HEADS))


def test_the_two_stages_train_and_the_second_moves_only_classifiers_and_links(tiny_config):
    off = {"enabled": False}
    first = load_config(tiny_config("ge", ge={"enabled": True}, sila=off))
    train(first)
    second = load_config(tiny_config("isc", sila=off, imta={"enabled": True, "stage": "heads", "detach": False,
                                                            "kl_reduction": "mean"}),
                         [f"train.init_from={first.run_dir}"])  # fmt: skip
    result = train(second)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["ce"] > 0 and row["ofa"] > 0
    stage1, _ = load_deploy_model(first.run_dir)
    stage2, _ = load_deploy_model(result.run_dir)
    assert isinstance(stage2, ChainedExits)
    a, b = stage1.state_dict(), stage2.inner.state_dict()
    assert {k for k in a if not torch.equal(a[k], b[k])} == {k for k in a if ".fc." in k}
