from pathlib import Path

import pytest
import torch

from dynsila import models
from dynsila.budget.flops import exit_params_cumulative
from dynsila.config import load_config
from tests.conftest import randomise_batchnorm

REPO = Path(__file__).resolve().parents[1]


def paper_model_kwargs(preset: str, num_classes: int) -> dict:
    """The model section of a shipped paper-scale preset: the acceptance tests check the presets themselves."""
    return {"num_classes": num_classes, **load_config(REPO / "configs" / preset).model_kwargs()}


CIFAR100_B7 = paper_model_kwargs("cifar100/msdnet_baseline.yaml", 100)
IMAGENET_STEP4 = paper_model_kwargs("imagenet/msdnet_baseline.yaml", 1000)


# Cumulative parameters per exit (blocks up to exit k plus classifiers 1..k) of the authors' PyTorch
# implementation, github kalviny/MSDNet-PyTorch models/msdnet.py, built with the README's CIFAR-100 b7 and ImageNet
# step-4 commands (figures as given in this project's brief, which took them from that code).


def test_cifar100_parameters_per_exit_match_the_paper_code():
    model = models.build("msdnet", **CIFAR100_B7)
    assert exit_params_cumulative(model) == [433876, 876792, 1274952, 1695548, 2178352, 2603252, 3067960]


def test_imagenet_parameters_per_exit_match_the_paper_code():
    model = models.build("msdnet", **IMAGENET_STEP4)
    assert exit_params_cumulative(model) == [4238504, 8772240, 13073272, 16748416, 23958440]


def test_output_shapes_on_cifar_input():
    model = models.build("msdnet", **CIFAR100_B7).eval()
    logits = model(torch.randn(2, 3, 32, 32))
    assert len(logits) == 7
    assert all(z.shape == (2, 100) for z in logits)


@pytest.mark.parametrize("upto", [0, 1, 2])
def test_truncated_forward_computes_nothing_beyond_the_exit(tiny_model_kwargs, upto):
    model = models.build("msdnet", num_classes=10, **tiny_model_kwargs).eval()
    ran: list[str] = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda *_, i=i: ran.append(f"stage{i}"))
    for i, exit_module in enumerate(model.exits):
        exit_module.register_forward_hook(lambda *_, i=i: ran.append(f"exit{i}"))
    x = torch.randn(2, 3, 8, 8)
    logits = model(x, upto=upto)
    assert len(logits) == upto + 1
    assert ran == [f"{kind}{i}" for i in range(upto + 1) for kind in ("stage", "exit")]
    full = model(x)
    for a, b in zip(logits, full[: len(logits)], strict=True):
        assert torch.equal(a, b)


def test_upto_out_of_range_is_an_error(tiny_model_kwargs):
    model = models.build("msdnet", num_classes=10, **tiny_model_kwargs)
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(1, 3, 8, 8), upto=3)


@pytest.mark.parametrize(
    "variant", [dict(prune="min"), dict(stepmode="lin_grow"), dict(bottleneck=False), dict(reduction=0.0)]
)
def test_variants_build_and_run(tiny_model_kwargs, variant):
    model = models.build("msdnet", num_classes=5, **{**tiny_model_kwargs, **variant}).eval()
    logits = model(torch.randn(2, 3, 8, 8))
    assert [z.shape for z in logits] == [(2, 5)] * 3


def test_every_exit_ends_in_a_linear_named_fc():
    model = models.build("msdnet", **CIFAR100_B7)
    assert all(isinstance(e.fc, torch.nn.Linear) for e in model.exits)
    assert model.exit_after == list(range(7))


@pytest.mark.parametrize(
    ("changes", "size"),
    [
        (dict(gr_factor=[1, 2, 4], bn_factor=[1, 2, 4], step=2, base=2), 8),  # CIFAR form, prune max
        (dict(gr_factor=[1, 2, 4, 4], bn_factor=[1, 2, 4, 4], prune="min", step=2, base=2, stem="imagenet"), 32),
        (dict(gr_factor=[1, 2, 4], bn_factor=[1, 2, 4], stepmode="lin_grow", reduction=0.0), 8),
    ],
)
def test_deferred_split_computes_each_stage_in_two_parts(tiny_model_kwargs, changes, size):
    torch.manual_seed(0)
    model = models.build("msdnet", num_classes=5, **{**tiny_model_kwargs, **changes}).double().eval()
    randomise_batchnorm(model)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    splits = 0
    with torch.no_grad():
        state = model.stem(x)
        for i, stage in enumerate(model.stages):
            full = stage(state)
            split = model.deferred_split(i)
            if split is not None:
                splits += 1
                exit_state, pending = split.for_exits(state)
                assert torch.equal(model.exits[i](exit_state), model.exits[i](full))  # the exit reads the same
                assert exit_state[0] is None  # ... without the finest scale of the stage's last layer
                completed = split.complete(pending)
                assert len(completed) == len(full) and all(map(torch.equal, completed, full))
            state = full
    assert splits > 0
