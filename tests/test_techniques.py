"""Training techniques: one module each, one table, the only way in; and the same losses as before the table."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dynsila.config import bounded, config_from_yaml, config_to_yaml, load_config
from dynsila.errors import ConfigError
from dynsila.methods.losses import ensemble_loss_terms, loss_terms
from dynsila.methods.technique import (
    TECHNIQUES,
    ModelBatch,
    Step,
    Technique,
    prepare_network,
    register_technique,
    unregister_technique,
)
from dynsila.runs.rundir import build_model
from dynsila.training.train import train
from tests.conftest import TINY_MSDNET

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LogitNormConfig:
    weight: float = bounded(0.0, 0.0, 1.0)  # the toy penalty's weight on every exit's mean squared logit; 0 = off


class LogitNorm(Technique):
    """A toy technique, defined here and nowhere else: a key of its own, a loss term, a step hook."""

    name = "logit_norm"
    settings = LogitNormConfig
    steps = 0

    def active(self, cfg):
        return cfg.section(LogitNormConfig).weight > 0

    def before_step(self, step: Step) -> None:
        LogitNorm.steps += int(self.active(step.cfg) and step.images.shape[0] == step.labels.shape[0])

    def model_terms(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        weight = batch.cfg.section(LogitNormConfig).weight
        return {"logit_norm": weight * torch.stack([z.pow(2).mean() for z in batch.logits]).sum()} if weight else {}


@pytest.fixture
def toy_technique():
    technique = register_technique(LogitNorm())
    LogitNorm.steps = 0
    yield technique
    unregister_technique(technique.name)


def test_the_builtin_techniques_are_one_module_each_in_one_table():
    assert [(t.name, type(t).__module__) for t in TECHNIQUES] == [
        ("sila", "dynsila.methods.sila"),
        ("self_distill", "dynsila.methods.self_distill"),
        ("gate_stage", "dynsila.methods.hrl"),
        ("gates", "dynsila.methods.hrl"),
        ("dml", "dynsila.methods.dml"),
        ("ge", "dynsila.methods.gradient_equilibrium"),
        ("l2w", "dynsila.methods.l2w"),
        ("imta", "dynsila.methods.imta"),
        ("ztw", "dynsila.methods.ztw"),
    ]


def test_the_training_package_names_no_technique_and_the_run_directory_no_peer():
    words = r"\b(peers?|sila|dml|gates?|gated|hrl|distil\w*|siamese|twins?)\b"
    training = sorted((REPO_ROOT / "dynsila" / "training").glob("*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in training)
    assert lines <= 450, f"the training package has {lines} lines"
    for path in [*training, *(REPO_ROOT / "dynsila" / "runs").glob("*.py")]:
        pattern = r"\bpeers?\b" if path.parent.name == "runs" else words
        found = subprocess.run(["grep", "-inE", pattern, str(path)], capture_output=True, text=True).stdout
        assert not found, f"{path.name} names a technique: {found}"


def test_config_py_holds_no_technique_section():
    from dynsila import config

    classes = [name for name in vars(config) if name.endswith("Config") and name != "Config"]
    assert sorted(classes) == ["DataConfig", "LossConfig", "TrainConfig"]


def test_a_registered_technique_adds_its_term_after_the_others(toy_technique):
    cfg = load_config(None, ["sila.enabled=false", "loss.self_distill=1.0", "logit_norm.weight=0.001"])
    logits = [torch.randn(4, 10, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    labels = torch.tensor([0, 1, 2, 3])
    terms = loss_terms(logits, labels, cfg)
    assert list(terms) == ["ce", "self_distill", "logit_norm"]
    assert torch.equal(terms["logit_norm"], 1e-3 * torch.stack([z.pow(2).mean() for z in logits]).sum())
    with pytest.raises(ValueError, match="logit_norm"):
        register_technique(LogitNorm())


def test_a_technique_from_one_file_is_validated_trained_logged_and_documented(toy_technique, tiny_config):
    with pytest.raises(ConfigError, match=r"config key 'logit_norm.weight' must lie in \[0.0, 1.0\], got 2"):
        load_config(tiny_config("bad", logit_norm={"weight": 2}))
    with pytest.raises(ConfigError, match="unknown config key 'logit_norm.wieght'; did you mean 'logit_norm.weight'"):
        load_config(tiny_config("typo", logit_norm={"wieght": 0.1}))
    cfg = load_config(tiny_config("toy", sila={"enabled": False}, logit_norm={"weight": 0.01}))
    assert config_from_yaml(config_to_yaml(cfg)).section(LogitNormConfig).weight == 0.01  # the run's config.yaml
    result = train(cfg)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["logit_norm"] > 0 and "ce" in row and LogitNorm.steps > 0
    spec = importlib.util.spec_from_file_location("make_config_reference", REPO_ROOT / "docs/make_config_reference.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    page = generator.reference()
    assert "| `logit_norm.weight` | `float` | `0.0` | [0.0, 1.0] | the toy penalty's weight" in page


def test_a_technique_whose_keys_clash_is_refused():
    class Clash(Technique):
        name = "clash"
        settings = LogitNormConfig
        section = "loss"

    @dataclass
    class Taken:
        ce_weight: float = 1.0

    class Clash2(Technique):
        name = "clash2"
        settings = Taken
        section = "loss"

    register_technique(Clash())  # loss.weight: free
    try:
        with pytest.raises(ValueError, match=r"config key\(s\) \['ce_weight'\] in 'loss' exist already"):
            register_technique(Clash2())
    finally:
        unregister_technique("clash")
    assert "clash2" not in [t.name for t in TECHNIQUES]


def test_an_installed_package_registers_its_technique_through_its_entry_point():
    code = (
        "from importlib.metadata import entry_points; "
        "import sys; names = sorted(e.name for e in entry_points(group='dynsila.techniques')); print(names)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    installed = set(ast.literal_eval(out.strip()))
    declared = set(re.findall(r'"(\w+) = dynsila\.methods\.\w+"', (REPO_ROOT / "setup.py").read_text()))
    # an install made before the newer techniques were declared lists the older ones only; a fresh one lists all
    assert {"dml", "gates", "self_distill", "sila"} <= installed <= declared
    modules = re.findall(r'"\w+ = (dynsila\.methods\.\w+)"', (REPO_ROOT / "setup.py").read_text())
    assert {type(t).__module__ for t in TECHNIQUES} == set(modules)  # dynsila.methods imports every declared one
    # a fresh process that only loads a config finds every built-in technique's keys
    code = "from dynsila.config import load_config; c = load_config(None, ['dml.peers=2', 'loss.gate_cost=0.5']); "
    code += "print(c.dml.peers, c.loss.ce_weight)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "1.0"]


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
    nets = [prepare_network(build_model(cfg), cfg).train() for _ in range(cfg.dml.peers)]
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    terms = ensemble_loss_terms([net(x) for net in nets], y, cfg)
    assert list(terms) == list(BEFORE[case])  # the order is the order of the sum
    for name, value in terms.items():
        assert float(value) == pytest.approx(BEFORE[case][name], rel=1e-6, abs=1e-7), name
