"""The benchmark scripts run end to end on tiny runs (their real results live in benchmarks/results/)."""

import importlib.util
import json
from pathlib import Path

from dynsila.config import load_config
from dynsila.train import train

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_vs_acc_on_two_tiny_runs(tiny_config, tmp_path, capsys):
    a = train(load_config(tiny_config("tiny_base"), ["sila.enabled=false"])).run_dir
    b = train(load_config(tiny_config("tiny_sila"))).run_dir
    script = load_script("flops_vs_acc")
    out_dir = tmp_path / "results"
    assert script.main(["--runs", str(a), str(b), "--out", "cmp", "--results-dir", str(out_dir)]) == 0
    payload = json.loads((out_dir / "cmp.json").read_text())
    assert [e["report"]["run"] for e in payload["runs"]] == ["tiny_base", "tiny_sila"]
    assert payload["command"].startswith("python benchmarks/flops_vs_acc.py --runs")
    md = (out_dir / "cmp.md").read_text()
    assert "MACs" in md and "| tiny_base | msdnet | digits | 0 | 1 |" in md
    assert (out_dir / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    # identical architectures: the SiLa run's deploy costs equal the baseline's
    costs = [[x["macs_cumulative"] for x in e["report"]["exits"]] for e in payload["runs"]]
    assert costs[0] == costs[1]
