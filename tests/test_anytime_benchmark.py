"""benchmarks/anytime.py end to end on tiny runs; its statistics on numbers with known answers."""

import json

import numpy as np
import pytest

from tests.test_benchmarks import load_script

anytime = load_script("anytime")


def test_interval_and_paired_test_known_values():
    i = anytime.interval(np.array([1.0, 2.0, 3.0]))
    assert i["mean"] == 2.0 and i["std"] == 1.0
    assert i["ci95"] == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)  # t(0.975, 2) * s / sqrt(n)
    p = anytime.paired(np.array([2.0, 3.0, 4.5]), np.array([1.0, 2.0, 3.0]))
    assert p["mean"] == pytest.approx(7 / 6) and 0 < p["p_value"] < 0.05
    assert anytime.anytime_area(np.array([1.0, 3.0]), np.array([50.0, 70.0])) == pytest.approx(60.0)


def test_grid_on_tiny_runs(tiny_config, tmp_path, capsys):
    config = tiny_config()
    out = tmp_path / "results"
    argv = [
        "--config",
        str(config),
        "--seeds",
        "0",
        "1",
        "--methods",
        "sila_features",
        "dml",
        "--runs-root",
        str(tmp_path / "runs"),
        "--results-dir",
        str(out),
    ]
    assert anytime.main(argv) == 0
    payload = json.loads((out / "anytime_cifar10_dev.json").read_text())
    methods = payload["summary"]["methods"]
    assert list(methods) == ["baseline", "sila_features", "dml"]
    assert methods["baseline"]["vs_baseline"]["anytime_area"]["mean"] == 0.0
    assert len(methods["dml"]["test_top1"]) == 3 and methods["dml"]["seeds"] == 2
    assert len(payload["runs"]["dml"][0]["peers"]) == 2
    md = (out / "anytime_cifar10_dev.md").read_text()
    assert "## Verdict" in md and "sila_features" in md and "Generalisation" in md
    assert (out / "anytime_cifar10_dev.png").read_bytes()[:4] == b"\x89PNG"
    # a second invocation reuses every finished run
    capsys.readouterr()
    assert anytime.main(argv) == 0
    assert capsys.readouterr().out.count("reused") == 6


def test_missing_dataset_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert anytime.main(["--preset", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cifar10_dev.npz" in err and err.count("\n") == 1
