from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from dynsila import models
from dynsila.budget.flops import exit_costs, module_macs
from dynsila.config import load_config
from dynsila.errors import ConfigError
from dynsila.flops import main as flops_main
from dynsila.models.timm_exits import TimmExits
from dynsila.runs.rundir import build_model

REPO = Path(__file__).resolve().parents[1]

FAMILIES = [
    ("resnet18", [1, 2, 3, 4]),
    ("efficientnet_b0", [1, 2, 3, 4]),
    ("mobilenetv3_small_050", [1, 2, 3, 4]),
    ("convnext_atto", [0, 1, 2, 3]),
]


class TimmTruncated(nn.Module):
    """The bare timm model run by timm itself up to one feature level (``forward_intermediates``)."""

    def __init__(self, backbone: nn.Module, level: int) -> None:
        super().__init__()
        self.backbone, self.level = backbone, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_intermediates(x, indices=[self.level], intermediates_only=True, stop_early=True)[0]


@pytest.mark.parametrize(("backbone", "levels"), FAMILIES)
def test_stages_reproduce_timms_own_features(backbone, levels):
    torch.manual_seed(0)
    bare = timm.create_model(backbone, num_classes=0).eval()
    model = TimmExits(bare, levels, "linear", 16, num_classes=7).eval()
    features: list[torch.Tensor] = []
    for exit_module in model.exits:
        exit_module.register_forward_pre_hook(lambda m, inp: features.append(inp[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        expected = bare.forward_intermediates(x, indices=levels, intermediates_only=True)
    assert [z.shape for z in logits] == [(2, 7)] * len(levels)
    for ours, theirs in zip(features, expected, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize(("backbone", "levels"), FAMILIES)
def test_truncated_forward_runs_nothing_past_the_exit(backbone, levels):
    model = models.build("timm_exits", num_classes=3, backbone=backbone, exit_stages=levels).eval()
    ran: list[int] = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), upto=1)
    assert ran == list(range(levels[1] + 1))
    assert len(model.stages) == levels[-1] + 1  # nothing after the last exit is even built


@pytest.mark.parametrize(("backbone", "levels"), FAMILIES)
@pytest.mark.parametrize("head", ["linear", "conv"])
def test_exit_macs_equal_truncated_timm_plus_the_head(backbone, levels, head):
    torch.manual_seed(0)
    bare = timm.create_model(backbone, num_classes=0).eval()
    model = TimmExits(bare, levels, head, 16, num_classes=7).eval()
    costs = exit_costs(model, (3, 32, 32))
    x = torch.zeros(1, 3, 32, 32)
    for k, level in enumerate(levels):
        trunk, _ = module_macs(TimmTruncated(bare, level), x)
        feature = TimmTruncated(bare, level)(x)
        head_macs, _ = module_macs(model.exits[k], feature)
        assert costs[k].macs == trunk + head_macs, (backbone, head, k)


def test_cli_costs_for_the_timm_preset(capsys):
    assert flops_main([str(REPO / "configs" / "timm_resnet18_sila.yaml"), "--json"]) == 0
    assert "macs_cumulative" in capsys.readouterr().out


def test_pretrained_weights_only_from_local_files(tmp_path):
    cfg = load_config(None, ["model.name=timm_exits", "model.pretrained=true", "model.backbone=resnet18"])
    with pytest.raises(ConfigError, match="never downloads"):
        build_model(cfg, 10)
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(load_config(None, ["model.name=timm_exits", f"model.pretrained_file={tmp_path / 'x.pth'}"]), 10)
    torch.manual_seed(3)
    source = timm.create_model("resnet18")
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    cfg = load_config(None, ["model.name=timm_exits", f"model.pretrained_file={tmp_path / 'resnet18.pth'}"])
    model = build_model(cfg, 10)
    assert torch.equal(model.stages[0].conv1.weight, source.conv1.weight)
    assert torch.equal(model.stages[4].layer4[0].conv2.weight, source.layer4[0].conv2.weight)


def test_bad_timm_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown timm backbone 'resnet1'"):
        build_model(load_config(None, ["model.name=timm_exits", "model.backbone=resnet1"]), 10)
    with pytest.raises(ConfigError, match="exit_stages"):
        build_model(load_config(None, ["model.name=timm_exits", "model.exit_stages=[3,1]"]), 10)
