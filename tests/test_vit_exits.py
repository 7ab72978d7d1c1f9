"""Exits on timm vision transformers (``vit_exits``): tokens as timm reads them, SiLa and its pruning, attention's
cost, real early exit in PyTorch and ONNX, and the command line. Tiny ViTs (width 32, 3 blocks, 16x16 or 8x8)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dynsila import models
from dynsila.budget.flops import count_params, exit_costs, module_macs
from dynsila.budget.thresholds import CONFIDENCE, exit_indices, fit_thresholds, geometric_fractions
from dynsila.config import Config, load_config
from dynsila.deploy.export import ThresholdFit, export_onnx
from dynsila.deploy.runner import EarlyExitRunner
from dynsila.errors import ConfigError
from dynsila.infer import main as infer_main
from dynsila.methods.losses import ensemble_loss_terms, loss_terms
from dynsila.methods.self_distill import SelfDistillConfig
from dynsila.methods.sila import SiLa, SiLaConfig, prune
from dynsila.models.vit_exits import VitExits
from dynsila.optim import build_optimizer, parameter_groups
from dynsila.runs.rundir import build_model, load_deploy_model
from dynsila.train import main as train_main
from dynsila.training.train import train
from tests.conftest import load_benchmark
from tests.test_export import assert_graphs_are_deployable, compare_runners, needs_deploy

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "exits": [1, 2, 3]}
SHAPE = (3, 16, 16)


def tiny_vit(exit_head: str = "linear", seed: int = 0, **changes) -> VitExits:
    torch.manual_seed(seed)
    model = models.build("vit_exits", num_classes=5, exit_head=exit_head, **{**TINY_VIT, **changes})
    assert isinstance(model, VitExits)
    return model.eval()


def spread_logits(model: VitExits) -> VitExits:
    """Larger exit weights, so an untrained model's confidences spread and its exits disagree."""
    with torch.no_grad():
        for e in model.exits:
            e.fc.weight.mul_(30)
    return model


@pytest.mark.parametrize(
    "variant",
    [{}, {"reg_tokens": 2, "no_embed_class": True}, {"class_token": False, "global_pool": "avg"}],
    ids=["cls", "registers_no_embed_class", "no_class_token"],
)
def test_exits_read_the_tokens_timms_forward_intermediates_returns(variant):
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, **variant
    ).eval()
    pool = "token" if vit.num_prefix_tokens and vit.cls_token is not None else "avg"
    model = VitExits(vit, [1, 3], "linear", pool, num_classes=5).eval()
    read: list[torch.Tensor] = []
    for e in model.exits:
        e.register_forward_pre_hook(lambda m, inputs: read.append(inputs[0]))
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        model(x)
        theirs = vit.forward_intermediates(x, indices=[0, 2], output_fmt="NLC", intermediates_only=True)
        if vit.num_prefix_tokens:
            prefixed = vit.forward_intermediates(
                x, indices=[0, 2], output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
            )
            theirs = [torch.cat([prefix, patches], dim=1) for patches, prefix in prefixed]
    assert len(read) == 2
    for ours, expected in zip(read, theirs, strict=True):
        assert ours.shape == expected.shape and torch.equal(ours, expected)


def test_stages_hold_the_blocks_between_exits_and_nothing_after_the_last():
    model = tiny_vit(exits=[2])
    assert [len(s) for s in model.stages] == [2] and model.exit_after == [0]
    ran: list[int] = []
    full = tiny_vit()
    for i, stage in enumerate(full.stages):
        stage.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        full(torch.randn(1, *SHAPE), upto=1)
    assert ran == [0, 1]


def test_bad_vit_settings_are_config_errors():
    base = ["model.name=vit_exits", "model.img_size=16", "model.patch_size=4", "model.depth=3", "model.embed_dim=32"]
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        build_model(load_config(None, [*base, "model.num_heads=3"]), 10)
    base.append("model.num_heads=2")
    with pytest.raises(ConfigError, match="increasing block numbers in 1..3"):
        build_model(load_config(None, [*base, "model.exits=[2,4]"]), 10)
    with pytest.raises(ConfigError, match="not a timm VisionTransformer"):
        build_model(load_config(None, ["model.name=vit_exits", "model.backbone=resnet18"]), 10)
    with pytest.raises(ConfigError, match="unknown config key 'model.exit_stages'"):
        load_config(None, [*base, "model.exit_stages=[1]"])


# --- costs -------------------------------------------------------------------------------------------------------


def flop_counter_macs(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """torch.utils.flop_counter's count of one call, in multiply-accumulates. SDPA runs on its math backend here:
    the counter has no formula for the fused CPU kernel (it would count attention as 0, as fvcore does unaided)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("exit_head", ["linear", "block"])
def test_macs_per_exit_equal_torch_flop_counter(exit_head):
    model = tiny_vit(exit_head)
    costs = exit_costs(model, SHAPE)
    x = torch.zeros(1, *SHAPE)
    for k, cost in enumerate(costs):
        assert cost.macs_cumulative == flop_counter_macs(lambda t, k=k: model(t, upto=k), x), k
        trunk = torch.nn.Sequential(model.stem, *model.stages[: k + 1])
        with torch.no_grad():
            tokens = trunk(x)
        assert cost.macs == flop_counter_macs(trunk, x) + flop_counter_macs(model.exits[k], tokens), k


def test_one_block_counted_by_hand():
    """T tokens of width D, H heads, MLP ratio r: qkv 3TD^2, Q K^T and weights x V T^2 D each, projection TD^2,
    MLP 2rTD^2 (the head count does not change it)."""
    model = tiny_vit()
    tokens, width, ratio = 16 + 1, 32, 4
    hand = tokens * width * width * (3 + 1 + 2 * ratio) + 2 * tokens * tokens * width
    block = model.stages[1][0]
    assert module_macs(block, torch.zeros(1, tokens, width))[0] == hand
    costs = exit_costs(model, SHAPE)
    assert costs[1].macs - costs[0].macs == hand  # the linear exits cost the same, so one block is the difference


# --- SiLa, self-distillation, pruning ---------------------------------------------------------------------------


@pytest.mark.parametrize(("exit_head", "sila_head"), [("linear", "linear"), ("block", "classifier")])
def test_sila_trains_a_step_and_prunes_to_the_plain_deploy_model(exit_head, sila_head):
    plain = tiny_vit(exit_head)
    torch.manual_seed(0)
    net = SiLa(tiny_vit(exit_head), SiLaConfig(head=sila_head)).train()
    cfg = Config().with_section(SiLaConfig(head=sila_head))
    cfg = cfg.with_section(SelfDistillConfig(self_distill=0.5))
    before = [p.detach().clone() for p in net.heads.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    terms = loss_terms(net(torch.randn(4, *SHAPE)), torch.tensor([0, 1, 2, 3]), cfg)
    assert {"sila", "self_distill"} <= set(terms)
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.heads.parameters())
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, net.heads.parameters(), strict=True))
    deployed = prune(net)
    assert type(deployed) is type(plain)
    assert list(deployed.state_dict()) == list(plain.state_dict())
    assert count_params(deployed) == count_params(plain)
    assert exit_costs(deployed, SHAPE) == exit_costs(plain, SHAPE)
    assert exit_costs(net, SHAPE) == exit_costs(plain, SHAPE)


def test_decay_weights_spares_norms_biases_tokens_and_position_embedding_even_under_a_sila_wrapper():
    net = SiLa(tiny_vit(), SiLaConfig(head="classifier"))
    names = {id(p): name for name, p in net.named_parameters()}
    everything = parameter_groups(net, "all")
    assert len(everything) == 1 and len(everything[0]["params"]) == len(names)
    decayed, plain = parameter_groups(net, "weights")
    assert plain["weight_decay"] == 0.0 and "weight_decay" not in decayed  # the optimizer's own value
    spared = {names[id(p)] for p in plain["params"]}
    assert {"model.stem.cls_token", "model.stem.pos_embed"} <= spared
    assert all(p.ndim >= 2 for p in decayed["params"]) and len(decayed["params"]) + len(spared) == len(names)
    assert any(name.endswith("norm1.weight") for name in spared) and any(n.endswith(".bias") for n in spared)
    # AdamW with zero gradients: decay alone moves a parameter, so only the decayed group changes
    optimizer = build_optimizer(load_config(None, ["train.optimizer=adamw", "train.decay=weights"]).train, net)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = {name for name, p in net.named_parameters() if not torch.equal(before[name], p)}
    assert moved == {names[id(p)] for p in decayed["params"]}


def test_the_classifier_twin_is_a_fresh_copy_of_the_whole_exit():
    model = tiny_vit("block")
    twin = model.fresh_exit(1)
    assert type(twin) is type(model.exits[1]) and twin.fc.in_features == 32
    ours, theirs = twin.state_dict(), model.exits[1].state_dict()
    assert list(ours) == list(theirs)
    assert not torch.equal(ours["mixer.attn.qkv.weight"], theirs["mixer.attn.qkv.weight"])
    assert ours["mixer.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.2)  # timm's ViT init


# --- early exit: the runner and ONNX ----------------------------------------------------------------------------


def test_runner_decisions_equal_the_evaluators():
    model = spread_logits(tiny_vit("block")).double()
    g = torch.Generator().manual_seed(1)
    val_x, test_x = torch.randn(100, *SHAPE, generator=g).double(), torch.randn(80, *SHAPE, generator=g).double()
    with torch.no_grad():
        val_logits, test_logits = torch.stack(model(val_x), 1), torch.stack(model(test_x), 1)
    confidence = CONFIDENCE["max_prob"]
    thresholds = fit_thresholds(confidence(val_logits), geometric_fractions([1.0], 3))[0]
    simulated = exit_indices(confidence(test_logits), thresholds[None])[0]
    assert len(set(simulated.tolist())) == 3  # samples leave at every exit
    runner = EarlyExitRunner(model, thresholds, "max_prob", costs=[1, 2, 3])
    seen: list[int] = []
    for i, stage in enumerate(runner.model.stages):
        stage.register_forward_pre_hook(lambda m, inputs, i=i: seen.append(inputs[0].shape[0]) if i == 2 else None)
    for batch in (80, 7):
        result = [runner(test_x[i : i + batch]) for i in range(0, 80, batch)]
        assert torch.equal(torch.cat([r.exit_index for r in result]), simulated)
        predictions = torch.cat([r.predictions for r in result])
        assert torch.equal(predictions, test_logits.argmax(-1)[torch.arange(80), simulated])
    assert seen[0] == int((simulated == 2).sum())  # the last stage ran only for the samples that reached it
    streamed = runner.run_stream(test_x.split(16))
    assert torch.equal(streamed.exit_index, simulated)


@needs_deploy
def test_onnx_export_writes_a_graph_per_stage_and_exit_and_decides_as_pytorch(tmp_path):
    model = spread_logits(tiny_vit("block"))
    g = torch.Generator().manual_seed(2)
    fit_x, x = torch.randn(60, *SHAPE, generator=g), torch.randn(60, *SHAPE, generator=g)
    with torch.no_grad():
        conf = CONFIDENCE["max_prob"](torch.stack(model(fit_x), 1))
    thresholds = fit_thresholds(conf, geometric_fractions([1.0], 3))[0].tolist()
    fit = ThresholdFit(thresholds, "max_prob", 1.0, None, 60, [], 0.0)
    costs = [{"macs": c.macs, "macs_cumulative": c.macs_cumulative} for c in exit_costs(model, SHAPE)]
    manifest = export_onnx(model, tmp_path / "vit", fit_x[:4], costs, fit)
    assert [s["file"] for s in manifest["stages"]] == ["stage0.onnx", "stage1.onnx", "stage2.onnx"]
    assert [e["file"] for e in manifest["exits"]] == ["exit0.onnx", "exit1.onnx", "exit2.onnx"]
    assert manifest["stages"][0]["exporter"] == "dynamo"
    assert_graphs_are_deployable(tmp_path / "vit")
    compare_runners(model, tmp_path / "vit", x, batch_size=16, singles=6)


# --- the command line -------------------------------------------------------------------------------------------

CLI_VIT = {"name": "vit_exits", **TINY_VIT, "img_size": 8, "patch_size": 4, "exit_head": "block"}


def test_train_with_sila_and_self_distillation_then_early_exit_from_the_cli(tiny_config, capsys):
    path = tiny_config(
        "vit",
        model=CLI_VIT,
        sila={"enabled": True, "head": "classifier"},
        loss={"self_distill": 0.5},
        train={
            "optimizer": "adamw",
            "lr": 1e-3,
            "weight_decay": 0.05,
            "schedule": "cosine",
            "eval_test_every_epoch": False,
        },
    )
    assert train_main([str(path)]) == 0
    run_dir = path.parent / "runs" / "vit"
    capsys.readouterr()
    assert infer_main([str(run_dir), "--q", "1.0", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    histogram = [int(line.split()[2]) for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(histogram) == 3 and sum(histogram) == 359  # every test image exits exactly once
    costs = exit_costs(build_model(load_config(path)), (3, 8, 8))
    assert infer_main([str(run_dir), "--budget", str((costs[0].macs_cumulative + costs[1].macs_cumulative) / 2)]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "images/s" in out
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1
    # the early-exit speed benchmark times a trained run's deploy model on its own images
    speed = load_benchmark("speed.early_exit_speed")
    args = ["--smoke", "--run", str(run_dir), "--mix50-only", "--results-dir", str(path.parent), "--out", "ee"]
    assert speed.main(args) == 0
    result = json.loads((path.parent / "ee.json").read_text())
    assert "vit_exits from the run" in result["model"] and len(result["exit_macs_cumulative"]) == 3
    assert result["exit_macs_cumulative"] == [c.macs_cumulative for c in costs]
    (row,) = result["rows"]
    assert row["target_fraction"] == 0.5 and sum(row["exit_histogram"]) == row["images"]
    assert "| MACs ratio, paper |" in (path.parent / "ee.md").read_text()


def test_dml_peers_with_sila_heads_train_a_step():
    peers = [SiLa(tiny_vit(head, seed=i), SiLaConfig()).train() for i, head in enumerate(("linear", "block"))]
    cfg = Config()
    cfg.dml.peers = 2
    x, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 3])
    terms = ensemble_loss_terms([p(x) for p in peers], y, cfg)
    assert {"ce", "sila", "dml"} <= set(terms) and terms["dml"] > 0
    sum(terms.values()).backward()
    for peer in peers:
        assert all(p.grad is not None for p in peer.parameters())


def test_the_named_backbones_build_for_32x32_inputs():
    """The presets' backbones, at CIFAR size, on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        for backbone, exits in (("vit_tiny_patch16_224", [3, 6, 9, 12]), ("deit_small_patch16_224", [4, 8, 12])):
            model = models.build("vit_exits", num_classes=10, backbone=backbone, img_size=32, patch_size=4, exits=exits)
            assert isinstance(model.stem.patch_embed, torch.nn.Module) and len(model.exits) == len(exits)
            assert sum(len(s) for s in model.stages) == 12


@pytest.mark.parametrize(
    "technique, adds_to_deploy",
    [
        ({"ge": {"enabled": True}}, False),
        ({"imta": {"enabled": True}}, True),
        ({"l2w": {"enabled": True}}, False),
        ({"ztw": {"enabled": True}}, True),
    ],  # fmt: skip
    ids=["ge", "imta", "l2w", "ztw"],
)
def test_the_field_techniques_train_with_sila_on_a_vit_and_their_deploy_cost_is_counted(
    tiny_config, technique, adds_to_deploy
):
    name = next(iter(technique))
    path = tiny_config(f"vit_{name}", model=CLI_VIT, sila={"enabled": True}, train={"eval_test_every_epoch": False},
                       **technique)  # fmt: skip
    result = train(load_config(path))
    assert len(result.test_top1) == 3 and all(0 <= a <= 100 for a in result.test_top1)
    deployed = exit_costs(load_deploy_model(result.run_dir)[0], (3, 8, 8))
    plain = exit_costs(build_model(load_config(path, ["sila.enabled=false", f"{name}.enabled=false"])), (3, 8, 8))
    grew = [d.macs_cumulative > p.macs_cumulative for d, p in zip(deployed, plain, strict=True)]
    assert any(grew) == adds_to_deploy and (adds_to_deploy or deployed == plain)
