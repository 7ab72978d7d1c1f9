"""IMTA and ZTW change the deploy network: their modules are kept, rebuilt from the config, counted and followed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynsila.methods  # noqa: F401  (registers imta and ztw)
from dynsila.budget.flops import exit_costs
from dynsila.budget.thresholds import CONFIDENCE, exit_indices, fit_thresholds, geometric_fractions
from dynsila.config import Config, load_config
from dynsila.deploy.export import ThresholdFit, export_onnx
from dynsila.deploy.runner import EarlyExitRunner
from dynsila.errors import ConfigError
from dynsila.methods.exit_chain import ChainedExits
from dynsila.methods.imta import IMTAConfig, imta_loss_terms
from dynsila.methods.self_distill import self_distillation_loss
from dynsila.methods.technique import Networks, deploy_network
from dynsila.runs.checkpoint import load_checkpoint
from dynsila.runs.rundir import build_model, build_networks, load_deploy_model
from dynsila.training.train import train
from tests.conftest import TINY_MSDNET, randomise_batchnorm
from tests.test_export import compare_runners, needs_deploy

C = 5  # classes of the hand-built configs
TINY_TIMM = {"name": "timm_exits", "backbone": "resnet18", "exit_stages": [1, 2, 3]}


def tiny_cfg(*overrides: str) -> Config:
    model = [f"model.{k}={v}" for k, v in TINY_MSDNET.items()]
    return load_config(None, [*model, f"data.num_classes={C}", "data.image_size=8", *overrides])


def test_the_added_modules_are_exactly_what_the_deploy_costs_gain():
    plain = exit_costs(build_model(tiny_cfg()), (3, 8, 8))
    width = TINY_MSDNET["head_channels"]  # d_k: what each exit's fc reads
    imta = exit_costs(build_model(tiny_cfg("imta.enabled=true")), (3, 8, 8))
    # ISC link into exit k >= 1: Linear(C, d) -> BatchNorm1d(d) -> ReLU -> Linear(d, C, no bias)
    link_macs, link_params = 2 * C * width, (C * width + width) + 2 * width + width * C
    for k, (p, c) in enumerate(zip(plain, imta, strict=True)):
        assert c.macs_cumulative - p.macs_cumulative == k * link_macs
        assert c.params_cumulative - p.params_cumulative == k * link_params
        assert c.macs == c.macs_cumulative  # exit k cannot be computed without the classifiers before it

    ztw = exit_costs(build_model(tiny_cfg("ztw.enabled=true", "ztw.stage=ensemble")), (3, 8, 8))
    # cascading into IC k >= 1 (not the last exit): Linear(C, C, no bias); IC k's ensemble: k + 1 weights x C
    # multiply-adds, k + 1 weights and C biases as parameters; the last exit is the backbone's own classifier
    ics = len(plain) - 1
    for k, (p, c) in enumerate(zip(plain, ztw, strict=True)):
        cascades = min(k, ics - 1)
        ensembles = range(min(k, ics - 1) + 1)
        assert c.macs_cumulative - p.macs_cumulative == cascades * C * C + sum((j + 1) * C for j in ensembles)
        assert c.params_cumulative - p.params_cumulative == cascades * C * C + sum(j + 1 + C for j in ensembles)
        own_ensemble = (k + 1) * C if k < ics else 0
        assert c.macs == c.macs_cumulative - sum((j + 1) * C for j in ensembles) + own_ensemble


def test_the_links_change_the_logits_and_the_first_exit_is_untouched():
    torch.manual_seed(0)
    plain = build_model(tiny_cfg()).eval()
    torch.manual_seed(0)
    chained = build_model(tiny_cfg("imta.enabled=true")).eval()
    assert isinstance(chained, ChainedExits)
    x = torch.randn(6, 3, 8, 8)
    a, b = plain(x), chained(x)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    assert [z.shape for z in chained(x, upto=1)] == [(6, C), (6, C)]


def test_the_isc_input_is_detached_unless_asked():
    for detach, reaches in ((True, False), (False, True)):
        model = build_model(tiny_cfg("imta.enabled=true", f"imta.detach={str(detach).lower()}")).train()
        logits = model(torch.randn(4, 3, 8, 8))
        logits[1].sum().backward()
        first_fc = model.exits[0].fc
        assert (first_fc.weight.grad is not None and first_fc.weight.grad.abs().sum() > 0) == reaches


def test_the_ofa_loss_is_the_papers_mixture():
    torch.manual_seed(0)
    logits, labels = [torch.randn(8, C) for _ in range(3)], torch.randint(0, C, (8,))
    cfg = IMTAConfig(enabled=True, gamma=0.25, temperature=2.0)
    terms = imta_loss_terms(logits, labels, [1.0, 1.0, 1.0], cfg, ce_weight=1.0)
    ce = [nn.functional.cross_entropy(z, labels) for z in logits]
    assert terms["ce"].item() == pytest.approx((0.75 * (ce[0] + ce[1]) + ce[2]).item())
    assert terms["ofa"].item() == pytest.approx(0.25 * self_distillation_loss(logits, [1.0] * 3, 2.0).item())


@pytest.mark.parametrize("technique", [["imta.enabled=true"], ["ztw.enabled=true", "ztw.stage=ensemble"]])
def test_the_runner_follows_a_chained_network_to_the_evaluators_decisions(technique):
    torch.manual_seed(0)
    model = randomise_batchnorm(build_model(tiny_cfg(*technique))).double().eval()
    g = torch.Generator().manual_seed(1)
    val_x, test_x = torch.randn(120, 3, 8, 8, generator=g).double(), torch.randn(90, 3, 8, 8, generator=g).double()
    with torch.no_grad():
        val_logits, test_logits = torch.stack(model(val_x), 1), torch.stack(model(test_x), 1)
    confidence = CONFIDENCE["max_prob"]
    thresholds = fit_thresholds(confidence(val_logits), geometric_fractions([1.0], 3))[0]
    simulated = exit_indices(confidence(test_logits), thresholds[None])[0]
    assert len(set(simulated.tolist())) > 1
    for deferred in (True, False):
        runner = EarlyExitRunner(model, thresholds, costs=[1, 2, 3], deferred=deferred, fold_batchnorm=False)
        for batch in (90, 7):
            exits = torch.cat([runner(test_x[i : i + batch]).exit_index for i in range(0, 90, batch)])
            assert torch.equal(exits, simulated)
        assert torch.equal(runner(test_x).predictions, test_logits.argmax(-1)[torch.arange(90), simulated])


def test_a_network_whose_exits_cannot_be_chained_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="skipnet|SkipNet"):
        build_model(load_config(None, ["model.name=skipnet", "data.num_classes=5", "imta.enabled=true"]))
    with pytest.raises(ConfigError, match="switch one of them off"):
        build_model(tiny_cfg("imta.enabled=true", "ztw.enabled=true"))
    with pytest.raises(ConfigError, match="loss.self_distill=0"):
        cfg = tiny_cfg("imta.enabled=true", "loss.self_distill=1.0")
        build_networks(cfg, C, resuming=False)
    with pytest.raises(ConfigError, match="train.init_from"):
        build_networks(tiny_cfg("ztw.enabled=true", "ztw.stage=ensemble"), C, resuming=False)


def _trained_deploy_round_trip(cfg: Config) -> tuple[nn.Module, Config]:
    """Train ``cfg``; check that the run's deploy model, rebuilt from its directory, is the chained network and
    gives exactly the logits of the trained network's deploy copy. Returns the loaded model and its config."""
    result = train(cfg)
    model, deploy_cfg = load_deploy_model(result.run_dir)
    assert isinstance(model, ChainedExits)
    _, nets = build_networks(deploy_cfg, deploy_cfg.data.num_classes or C, resuming=True)
    networks = Networks(nets)
    networks.load_state_dict(load_checkpoint(result.run_dir / "best.pt")["model"])
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = deploy_network(networks.peers[0]).eval()(x)
        assert all(torch.equal(a, b) for a, b in zip(model(x), expected, strict=True))
    return model, deploy_cfg


@pytest.mark.parametrize("model", [TINY_MSDNET, TINY_TIMM], ids=["msdnet", "timm"])
def test_imta_trains_with_sila_and_its_deploy_model_round_trips(tiny_config, model):
    cfg = load_config(tiny_config("imta", model=dict(model), imta={"enabled": True}))
    assert cfg.sila.enabled
    loaded, _ = _trained_deploy_round_trip(cfg)
    assert not any(name.startswith("heads") for name, _ in loaded.named_modules())  # SiLa's heads are gone


@pytest.mark.parametrize("model", [TINY_MSDNET, TINY_TIMM], ids=["msdnet", "timm"])
def test_ztw_trains_its_two_stages_and_the_second_fits_only_the_ensembles(tiny_config, model):
    first = load_config(tiny_config("ics", model=dict(model), ztw={"enabled": True}))
    ics, _ = _trained_deploy_round_trip(first)
    second = load_config(
        tiny_config("ens", model=dict(model), ztw={"enabled": True, "stage": "ensemble"}),
        [f"train.init_from={first.run_dir}"],
    )
    ensembled, _ = _trained_deploy_round_trip(second)
    before, after = ics.state_dict(), ensembled.state_dict()
    changed = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    assert changed and all(".combine." in k for k in changed)  # batch-norm statistics included: all frozen


@needs_deploy
@pytest.mark.parametrize("technique", [["imta.enabled=true"], ["ztw.enabled=true", "ztw.stage=ensemble"]])
def test_the_onnx_export_of_a_chained_network_decides_as_pytorch(technique, tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorm(build_model(tiny_cfg(*technique))).eval()
    g = torch.Generator().manual_seed(1)
    fit_x, x = torch.randn(120, 3, 8, 8, generator=g), torch.randn(60, 3, 8, 8, generator=g)
    with torch.no_grad():
        confidence = CONFIDENCE["max_prob"](torch.stack(model(fit_x), 1))
    thresholds = fit_thresholds(confidence, geometric_fractions([1.0], 3))[0].tolist()
    costs = [{"macs": c.macs, "macs_cumulative": c.macs_cumulative} for c in exit_costs(model, (3, 8, 8))]
    fit = ThresholdFit(thresholds, "max_prob", 1.0, None, 120, [], 0.0)
    export_onnx(model, tmp_path / "onnx", fit_x[:4], costs, fit, exporter="torchscript")
    compare_runners(model, tmp_path / "onnx", x, batch_size=16, singles=8)
