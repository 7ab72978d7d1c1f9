"""ZTW's ``ensemble_last``: the last exit answers with the geometric ensemble of every exit, itself included."""

from __future__ import annotations

import torch

import dynsila.methods  # noqa: F401  (registers ztw)
from dynsila.config import load_config
from dynsila.methods.ztw import GeometricEnsemble, freeze_all_but_ensembles
from dynsila.runs.rundir import build_model
from tests.conftest import TINY_MSDNET


def ztw_model(*overrides: str):
    model = [f"model.{k}={v}".replace(" ", "") for k, v in TINY_MSDNET.items()]
    cfg = load_config(None, [*model, "data.num_classes=5", "data.image_size=8", "ztw.enabled=true",
                             "ztw.stage=ensemble", *overrides])  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg).eval()


def raw_logits(model, x):
    state = model.stem(x)
    for stage in model.stages:
        state = stage(state)
    return state[1]  # every exit's own logits (before its readout)


def test_the_last_exit_is_the_geometric_ensemble_of_all_exits():
    model = ztw_model("ztw.ensemble_last=true")
    last = model.exits[-1].combine
    assert isinstance(last, GeometricEnsemble) and last.weight.shape == (3,)
    with torch.no_grad():
        last.weight.copy_(torch.tensor([0.3, -0.2, 0.1]))
        last.bias.copy_(torch.arange(5.0) / 10)
        x = torch.randn(4, 3, 8, 8)
        z = raw_logits(model, x)
        expected = sum(w.exp() / 3 * torch.log_softmax(zj, 1) for w, zj in zip(last.weight, z, strict=True))
        assert torch.allclose(model(x)[-1], expected + last.bias, atol=1e-6)
        assert not torch.allclose(model(x)[-1], z[-1])


def test_off_the_last_exit_answers_alone_and_the_switch_trains_its_ensemble():
    model = ztw_model()
    assert model.exits[-1].combine is None
    with torch.no_grad():
        x = torch.randn(4, 3, 8, 8)
        assert torch.equal(model(x)[-1], raw_logits(model, x)[-1])
    on = ztw_model("ztw.ensemble_last=true")
    freeze_all_but_ensembles(on)
    trainable = {n for n, p in on.named_parameters() if p.requires_grad}
    assert {"exits.2.combine.weight", "exits.2.combine.bias"} <= trainable
    assert all(".combine." in n for n in trainable)
