import json

import pytest
import torch
import torch.nn.functional as F

from dynsila.budget.flops import count_params
from dynsila.config import load_config
from dynsila.errors import ConfigError, DynsilaError
from dynsila.methods import dml as dml_module
from dynsila.methods.dml import DMLConfig, dml_loss, exit_pairs
from dynsila.runs.rundir import build_model, load_deploy_model, read_metrics, read_run_config
from dynsila.training.train import train
from tests.conftest import tiny_msdnet_section


def test_kl_gradients_and_detachment():
    torch.manual_seed(0)
    z0, z1 = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss = dml_loss([[z0], [z1]], DMLConfig(peers=2, weight=0.5), [[2.0], [2.0]])
    loss.backward()
    p0, p1 = F.softmax(z0, 1).detach(), F.softmax(z1, 1).detach()
    # d/dz_i KL(p_j || p_i) = (p_i - p_j) / batch; the other peer is a detached target, so each peer's gradient
    # comes from its own term only (without detachment z0 would also get the gradient of KL(p0 || p1))
    assert torch.allclose(z0.grad, 0.5 * 2.0 * (p0 - p1) / 5, atol=1e-6)
    assert torch.allclose(z1.grad, 0.5 * 2.0 * (p1 - p0) / 5, atol=1e-6)
    kl_10 = F.kl_div(p0.log(), p1, reduction="batchmean")  # KL(p1 || p0)
    kl_01 = F.kl_div(p1.log(), p0, reduction="batchmean")
    expected = 0.5 * 2.0 * (kl_10 + kl_01)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_three_peers_average_over_the_others():
    z = [[torch.randn(3, 2)] for _ in range(3)]
    three = dml_loss(z, DMLConfig(peers=3), [[1.0]] * 3)
    pairwise = sum(dml_loss([z[i], z[j]], DMLConfig(peers=2), [[1.0]] * 2) for i in range(3) for j in range(i + 1, 3))
    assert three.item() == pytest.approx(pairwise.item() / 2, rel=1e-5)  # weight / (N - 1) with N = 3


def test_exit_matching_rules():
    assert exit_pairs(3, 3, "strict") == [(0, 0), (1, 1), (2, 2)]
    assert exit_pairs(4, 2, "tail") == [(2, 0), (3, 1)]
    with pytest.raises(ConfigError, match="dml.align=tail"):
        exit_pairs(4, 2, "strict")


def test_one_peer_reproduces_a_plain_run(tiny_config, monkeypatch):
    """The reference has no dml section and runs with the DML functions removed, so it cannot have gone through
    mutual learning; one peer with a large DML weight must train exactly like it."""

    def no_dml(*args, **kwargs):
        raise AssertionError("the plain run reached DML code")

    with monkeypatch.context() as absent:
        absent.setattr(dml_module, "dml_loss", no_dml)
        absent.setattr(dml_module, "exit_pairs", no_dml)
        plain = train(load_config(tiny_config("plain")))
    one = train(load_config(tiny_config("one_peer"), ["dml.peers=1", "dml.weight=3"]))
    assert read_run_config(one.run_dir).dml.weight == 3  # the override was applied, not dropped
    assert plain.val_top1 == one.val_top1 and plain.test_top1 == one.test_top1
    rows = [
        [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in read_metrics(run.run_dir)]
        for run in (plain, one)
    ]
    assert rows[0] == rows[1] and "dml" not in rows[1][0]  # every loss term equal; no DML term with one peer
    a, _ = load_deploy_model(plain.run_dir)
    b, _ = load_deploy_model(one.run_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_sila_with_dml_prunes_to_independent_baseline_sized_models(tiny_config):
    result = train(load_config(tiny_config("mutual"), ["dml.peers=2"]))
    baseline_params = count_params(build_model(load_config(tiny_config("base"), ["sila.enabled=false"])))
    assert [p.name for p in result.network_dirs] == ["peer0", "peer1"]
    deployed = [load_deploy_model(d)[0] for d in result.network_dirs]
    assert [count_params(m) for m in deployed] == [baseline_params] * 2
    assert not torch.equal(deployed[0].stem.scales[0][0].weight, deployed[1].stem.scales[0][0].weight)
    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert "dml" in row and "sila" in row and len(row["networks"]) == 2
    for d in result.network_dirs:
        assert (d / "eval.json").is_file() and (d / "config.yaml").is_file()
    with pytest.raises(DynsilaError, match="several networks, each with its own deploy model; pass one of: .*peer0"):
        load_deploy_model(result.run_dir)


def test_heterogeneous_peers(tiny_config, capsys):
    small, three = tiny_msdnet_section(n_blocks=2), tiny_msdnet_section()
    path = tiny_config("hetero", dml={"peers": 2, "models": [small, three]})
    with pytest.raises(ConfigError, match="2 and 3 exits"):
        train(load_config(path))
    result = train(load_config(path, ["dml.align=tail", "name=hetero_tail"]))
    assert [len(json.loads((d / "eval.json").read_text())["exits"]) for d in result.network_dirs] == [2, 3]


def test_dml_config_errors(tiny_config):
    with pytest.raises(ConfigError, match="one per peer"):
        load_config(tiny_config(), ["dml.peers=3", "dml.models=[{name: msdnet}]"])
    with pytest.raises(ConfigError, match="did you mean 'dml.models\\[0\\].growth_rate'"):
        load_config(tiny_config(), ["dml.peers=1", "dml.models=[{name: msdnet, growth: 2}]"])
    with pytest.raises(ConfigError, match=r"dml.peers. must lie in \[1, inf\], got 0"):
        load_config(tiny_config(), ["dml.peers=0"])
