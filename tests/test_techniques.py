"""Training techniques: one module each, one table, and the same losses as before the table existed."""

from __future__ import annotations

import json

import pytest
import torch

from dynsila.config import load_config
from dynsila.methods import losses
from dynsila.methods.losses import TECHNIQUES, ensemble_loss_terms, loss_terms, register_technique
from dynsila.methods.sila import SiLa
from dynsila.methods.technique import ModelBatch, Technique
from dynsila.runs.rundir import build_model
from dynsila.training.train import train
from tests.conftest import TINY_MSDNET


class LogitNorm(Technique):
    """A toy technique: a small penalty on every exit's mean squared logit, defined here and nowhere else."""

    name = "logit_norm"
    config_section = "(none: its weight is fixed)"
    weight = 1e-3

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        return {"logit_norm": self.weight * torch.stack([z.pow(2).mean() for z in batch.logits]).sum()}


@pytest.fixture
def toy_technique(monkeypatch):
    monkeypatch.setattr(losses, "TECHNIQUES", list(losses.TECHNIQUES))  # the registration ends with the test
    return register_technique(LogitNorm())


def test_the_builtin_techniques_are_one_module_each_in_one_table():
    assert [(t.name, type(t).__module__) for t in TECHNIQUES] == [
        ("sila", "dynsila.methods.sila"),
        ("self_distill", "dynsila.methods.self_distill"),
        ("gates", "dynsila.methods.hrl"),
        ("dml", "dynsila.methods.dml"),
    ]


def test_a_registered_technique_adds_its_term_after_the_others(toy_technique):
    cfg = load_config(None, ["sila.enabled=false", "loss.self_distill=1.0"])
    logits = [torch.randn(4, 10, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    labels = torch.tensor([0, 1, 2, 3])
    terms = loss_terms(logits, labels, cfg)
    assert list(terms) == ["ce", "self_distill", "logit_norm"]
    assert torch.equal(terms["logit_norm"], 1e-3 * torch.stack([z.pow(2).mean() for z in logits]).sum())
    with pytest.raises(ValueError, match="logit_norm"):
        register_technique(LogitNorm())


def test_a_registered_technique_is_trained_and_logged_with_no_other_file_touched(toy_technique, tiny_config):
    result = train(load_config(tiny_config("toy", sila={"enabled": False})))
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["logit_norm"] > 0 and "ce" in row


# Loss terms of each technique on tiny models, as the code computed them before techniques became one table
# (revision 53050e0, same model initialisation from torch.manual_seed(0), same inputs). The refactor reproduced
# them exactly; the tolerance here only allows for another CPU's floating-point kernels.
BEFORE = {
    "baseline": {"ce": 6.706045627593994},
    "sila_separate": {"ce": 6.90534782409668, "sila": 6.731354713439941},
    "sila_joint_only": {"joint_ce": 8.9002103805542},
    "sila_joint_consistency": {"ce": 6.781570911407471, "sila": 8.912425994873047, "consistency": 0.05535166710615158},
    "sila_classifier_logits": {"ce": 7.268570423126221, "sila": 7.023406028747559},
    "self_distill": {"ce": 6.706045627593994, "self_distill": 0.17664946615695953},
    "dml": {"ce": 13.77412223815918, "dml": 0.41046518087387085},
    "sila_dml": {"ce": 16.05214500427246, "sila": 16.804702758789062, "dml": 0.34491798281669617},
    "skipnet_sp_gatecost": {"ce": 2.326634407043457, "gate_cost": 0.19577641785144806},
    "skipnet_hrl": {"ce": 2.476686477661133, "sila": 2.5388846397399902, "reinforce": -0.9917951226234436},
}
CASES = {
    "baseline": "sila.enabled=false",
    "sila_separate": "sila.enabled=true",
    "sila_joint_only": "sila.enabled=true sila.softmax=joint_only",
    "sila_joint_consistency": "sila.enabled=true sila.softmax=joint sila.consistency=0.5 sila.head=mlp",
    "sila_classifier_logits": "sila.enabled=true sila.head=classifier",
    "self_distill": "sila.enabled=false loss.self_distill=1.0",
    "dml": "sila.enabled=false dml.peers=2",
    "sila_dml": "sila.enabled=true dml.peers=2 loss.exit_weights=[1,0.5,2]",
    "skipnet_sp_gatecost": "sila.enabled=false model.name=skipnet model.depth=20 loss.gate_cost=0.3",
    "skipnet_hrl": "sila.enabled=true model.name=skipnet model.depth=20 train.stage=hrl",
}


@pytest.mark.parametrize("case", CASES)
def test_each_technique_gives_the_losses_it_gave_before(case):
    overrides = CASES[case].split()
    msdnet = [f"model.{k}={v}".replace(" ", "") for k, v in TINY_MSDNET.items()]
    base = [] if "model.name=skipnet" in overrides else msdnet
    cfg = load_config(None, [*base, "data.num_classes=10", "data.image_size=16", "data.batch_size=8", *overrides])
    torch.manual_seed(0)
    nets = []
    for _ in range(cfg.dml.peers):
        model = build_model(cfg)
        if cfg.train.stage == "hrl":
            model.gated_body().gate_mode = "sample"
        nets.append((SiLa(model, cfg.sila) if cfg.sila.enabled else model).train())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    terms = ensemble_loss_terms([net(x) for net in nets], y, cfg)
    assert list(terms) == list(BEFORE[case])  # the order is the order of the sum
    for name, value in terms.items():
        assert float(value) == pytest.approx(BEFORE[case][name], rel=1e-6, abs=1e-7), name
