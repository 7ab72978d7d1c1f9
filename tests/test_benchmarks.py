"""The benchmark toolkit's pieces on known answers, and every benchmark script end to end in its smoke mode (their
real results live in benchmarks/results/; a smoke run's numbers mean nothing and are written to tmp_path)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dynsila.config import load_config
from dynsila.evaluation.report import EvalReport
from dynsila.training.train import train
from tests.conftest import deploy_installed, load_benchmark

REPO = Path(__file__).resolve().parents[1]
# the scripts that use benchmarks/toolkit.py
TOOLKIT_SCRIPTS = (
    "speed/budgeted_sweep_speed",
    "speed/early_exit_speed",
    "accuracy/flops_vs_acc",
    "speed/skip_speed",
    "speed/throughput",
    "speed/technique_step",
    "accuracy/calibrated_exits",
)


def test_command_line_keeps_the_flags_of_a_shell_call(monkeypatch):
    toolkit = load_benchmark("toolkit")
    monkeypatch.setattr(sys, "argv", ["benchmarks/speed/skip_speed.py", "--gate", "rnn", "--out", "a b"])
    assert toolkit.command_line("/x/benchmarks/speed/skip_speed.py", None) == (
        "python benchmarks/speed/skip_speed.py --gate rnn --out 'a b'"
    )
    assert toolkit.command_line("/x/benchmarks/speed/skip_speed.py", []) == "python benchmarks/speed/skip_speed.py"
    assert toolkit.command_line("skip_speed.py", []) == "python benchmarks/skip_speed.py"  # given: not sys.argv
    assert toolkit.command_line("skip_speed.py", ["--smoke"]) == "python benchmarks/skip_speed.py --smoke"


def test_script_run_from_a_shell_in_another_directory_records_its_flags(tmp_path):
    """``python benchmarks/speed/x.py`` (not imported): the toolkit import works and the saved command has the
    flags."""
    script = REPO / "benchmarks" / "speed" / "budgeted_sweep_speed.py"
    done = subprocess.run(
        [sys.executable, str(script), "--smoke", "--results-dir", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "budgeted_sweep_speed.json").read_text())
    assert result["command"] == f"python benchmarks/speed/budgeted_sweep_speed.py --smoke --results-dir {tmp_path}"
    assert result["setup"]["val"] == 200 and result["max_abs_test_top1_difference"] < 1e-9
    md = (tmp_path / "budgeted_sweep_speed.md").read_text()
    assert md.startswith("# Budgeted sweep speed\n\nCommand: `python benchmarks/speed/budgeted_sweep_speed.py --smoke")
    assert f"; torch {torch.__version__}; device cpu" in md.splitlines()[3]


def test_timing_synchronises_cuda_only_on_cuda(monkeypatch):
    toolkit = load_benchmark("toolkit")
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", str(device))))
    toolkit.run_seconds(lambda: calls.append("run"), "cuda:0")
    assert calls == [("sync", "cuda:0"), "run", ("sync", "cuda:0")]  # queue drained before and after the call
    calls.clear()
    assert toolkit.timed(lambda: calls.append("run"), "cpu", repeats=3, warmup=2) >= 0
    assert calls == ["run"] * 5


def test_paired_ratio_alternates_and_takes_the_median_ratio(monkeypatch):
    toolkit = load_benchmark("toolkit")
    order = []
    seconds = iter([2.0, 1.0, 9.0, 3.0, 6.0, 2.0])  # fn, baseline, fn, baseline, ...: ratios 2, 3, 3

    def fake_run_seconds(fn, device="cpu"):
        fn()
        return next(seconds)

    monkeypatch.setattr(toolkit, "run_seconds", fake_run_seconds)
    ratio = toolkit.paired_ratio(lambda: order.append("fn"), lambda: order.append("base"), repeats=3, warmup=1)
    assert ratio == 3.0
    # one untimed run of each right before its timed run, then back to back
    assert order == ["fn", "fn", "base", "base"] * 3


def test_accuracy_curve_helpers_on_known_numbers():
    toolkit = load_benchmark("toolkit")
    points = [{"avg_macs": 3.0, "test_top1": 70.0}, {"avg_macs": 1.0, "test_top1": 50.0}]  # unsorted on purpose
    assert toolkit.accuracy_at(points, 2.0) == pytest.approx(60.0)
    inside_outside = toolkit.accuracy_at(points, np.array([1.5, 0.5, 3.5]))
    assert inside_outside[0] == pytest.approx(55.0) and np.isnan(inside_outside[1:]).all()  # never extrapolated
    # trapezoid over unevenly spaced exits, divided by the MACs range: (1 * 55 + 3 * 80) / 4
    assert toolkit.anytime_area(np.array([1.0, 2.0, 5.0]), np.array([50.0, 60.0, 100.0])) == pytest.approx(73.75)
    assert toolkit.anytime_area(np.array([4.0]), np.array([42.0])) == 42.0
    row = {"q": 1.0, "target_fractions": [1.0], "thresholds": [float("-inf")], "val_top1": 50.0, "val_avg_macs": 1.0}
    row |= {"val_exit_fractions": [1.0], "test_top1": 51.0, "avg_macs": 1.5, "exit_fractions": [1.0]}
    header = {"run": "r", "run_dir": "runs/r", "model": "msdnet", "dataset": "digits", "sila": False, "seed": 0}
    curves = [{"kind": "budgeted", "criterion": c, "points": p} for c, p in (("entropy", []), ("max_prob", [row]))]
    report = EvalReport.from_dict({**header, "units": "MACs", "splits": {}, "exits": [], "curves": curves})
    assert toolkit.budget_points(report) == [row]  # the max_prob curve's points, as dicts
    with pytest.raises(ValueError, match="margin"):
        toolkit.budget_points(report, "margin")


def test_schedule_text_names_milestones_only_where_the_schedule_reads_them():
    toolkit = load_benchmark("toolkit")
    train_cfg = load_config(REPO / "configs" / "msdnet_sila.yaml").train
    train_cfg.schedule, train_cfg.milestones = "multistep", [0.5, 0.75]
    assert toolkit.schedule_text(train_cfg) == "multistep [0.5, 0.75]"
    train_cfg.schedule = "cosine"
    assert toolkit.schedule_text(train_cfg) == "cosine"


def test_write_results_is_strict_json_and_markdown(tmp_path):
    toolkit = load_benchmark("toolkit")
    payload = {"a": float("inf"), "b": [float("nan"), np.float32(0.5)], "c": torch.tensor([1, 2]), "d": tmp_path}
    out = toolkit.write_results("r", payload, "# title", tmp_path / "new")
    assert out == tmp_path / "new" / "r"
    text = out.with_suffix(".json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data == {"a": "inf", "b": ["nan", 0.5], "c": [1, 2], "d": str(tmp_path)}
    assert out.with_suffix(".md").read_text() == "# title\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json", "r.md"]  # no temporary file left


@pytest.mark.parametrize("name", TOOLKIT_SCRIPTS)
def test_scripts_share_the_toolkit_instead_of_their_own_copies(name):
    source = (REPO / "benchmarks" / f"{name}.py").read_text()
    assert "from benchmarks.toolkit import" in source
    for own_copy in ("platform.machine", "datetime.date", "atomic_write_text(", "time.perf_counter", '/ "results"'):
        assert own_copy not in source, f"{name}.py has its own {own_copy}; use benchmarks/toolkit.py"


def test_technique_step_smoke(tmp_path):
    assert load_benchmark("speed.technique_step").main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "technique_step.json").read_text())
    assert result["command"] == f"python benchmarks/speed/technique_step.py --smoke --results-dir {tmp_path}"
    rows = {r["technique"]: r for r in result["rows"]}
    plain = result["plain"]
    assert all(r["step_time_ratio"] > 0 for r in rows.values() if "step_time_ratio" in r)
    assert "step_time_ratio" not in rows["ZTW, + ensembles (stage 2)"]  # a stage of its own: not timed as a step
    # SiLa's twins and the training-only parts leave the deploy network as plain; IMTA and ZTW add to it
    for name in ("SiLa (MLP twin)", "self-distillation", "DML (2 peers)", "gradient equilibrium", "L2W-DEN"):
        assert (rows[name]["deploy_macs"], rows[name]["deploy_params"]) == (
            plain["deploy_macs"],
            plain["deploy_params"],
        )
    for name in ("IMTA", "ZTW, cascading (stage 1)", "ZTW, + ensembles (stage 2)"):
        assert rows[name]["deploy_macs"] > plain["deploy_macs"] and rows[name]["deploy_params"] > plain["deploy_params"]
    assert rows["ZTW, + ensembles (stage 2)"]["deploy_macs"] > rows["ZTW, cascading (stage 1)"]["deploy_macs"]
    assert "load average" in (tmp_path / "technique_step.md").read_text()


def test_skip_speed_smoke(tmp_path, capsys):
    argv = ["--smoke", "--processes", "2", "--results-dir", str(tmp_path)]
    assert load_benchmark("speed.skip_speed").main(argv) == 0
    result = json.loads((tmp_path / "skip_speed.json").read_text())
    assert result["command"] == f"python benchmarks/speed/skip_speed.py {' '.join(argv)}"
    rows = result["rows"]
    for r in rows:  # two fresh processes measured each share; the row's ratio is their median
        assert len(r["wall_ratio_per_process"]) == 2 and r["wall_ratio"] == np.median(r["wall_ratio_per_process"])
    assert [r["share_target"] for r in rows] == [0.25, 0.5, 0.75]
    assert all(0 < r["skipped_fraction"] < 1 and 0 < r["macs_ratio"] < 1 for r in rows)
    assert rows[0]["macs_ratio"] >= rows[2]["macs_ratio"]  # closing more gates never costs more MACs
    assert result["met"] == (rows[1]["wall_ratio"] <= result["target_wall_ratio"])
    assert "wall ratio <= 0.65" in (tmp_path / "skip_speed.md").read_text()


@pytest.mark.skipif(not deploy_installed(), reason='onnx or onnxruntime not installed: pip install -e ".[deploy]"')
def test_skip_speed_times_the_onnx_runner_at_the_same_thresholds(tmp_path, capsys):
    argv = ["--smoke", "--onnx", "--processes", "1", "--results-dir", str(tmp_path)]
    assert load_benchmark("speed.skip_speed").main(argv) == 0
    rows = json.loads((tmp_path / "skip_speed.json").read_text())["rows"]
    for r in rows:
        assert r["onnx_wall_ratio"] > 0 and r["onnx_over_torch"] > 0
        # a bisected threshold sits within float rounding of some gate probability, so one decision may differ
        assert r["onnx_decisions_equal"] > 0.95
    assert "| ONNX wall ratio |" in (tmp_path / "skip_speed.md").read_text()


def test_early_exit_speed_smoke(tmp_path, capsys):
    assert (
        load_benchmark("speed.early_exit_speed").main(["--smoke", "--results-dir", str(tmp_path), "--out", "ee"]) == 0
    )
    result = json.loads((tmp_path / "ee.json").read_text())
    costs = result["exit_macs_cumulative"]
    assert len(costs) == 3 and costs == sorted(costs)
    assert [(r["batch_size"], r["target_fraction"]) for r in result["rows"]] == [
        (b, f) for b in (8, 1) for f in (0.25, 0.5, 0.75)
    ]
    for r in result["rows"]:
        assert sum(r["exit_histogram"]) == r["images"] and 0 < r["macs_ratio"] <= 1 and r["wall_ratio"] > 0
    long_row = result["long_stream"]
    assert long_row["images"] == 32 and sum(long_row["exit_histogram"]) == 32
    assert long_row["lazy_macs_ratio"] <= long_row["macs_ratio"] <= 1 and long_row["ideal_wall_ratio"] > 0
    assert set(result["targets"]) == {"batch8_mix50", "batch1_exit1"}
    assert result["targets"]["batch1_exit1"]["macs_share"] == pytest.approx(costs[0] / costs[-1])
    md = (tmp_path / "ee.md").read_text()
    assert "device cpu" in md and "longer stream (32 images" in md


def test_throughput_smoke(tmp_path, capsys):
    assert load_benchmark("speed.throughput").main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "throughput.json").read_text())
    (row,) = result["rows"]
    assert row["variant"] == "train_sila_eager" and "error" not in row and row["images_per_second"] > 0
    memory = result["paired"]["memory_bytes"]
    # SiLa adds heads (parameters) and their activations; pruned heads are not in the baseline
    assert memory["sila"]["parameters_grads_momentum"] > memory["baseline"]["parameters_grads_momentum"]
    assert result["sila_training_memory_ratio"] > 1 and not math.isnan(result["sila_step_time_ratio"])
    heads = result["paired"]["heads"]
    assert set(heads) == {"sila", "sila_mlp", "sila_classifier"}
    # the whole-classifier twin costs as much as the exits themselves: more than a linear twin
    assert heads["sila_classifier"]["extra_parameters"] > heads["sila"]["extra_parameters"] > 0
    assert heads["sila_classifier"]["memory_ratio"] > heads["sila"]["memory_ratio"]


def test_smoke_run_never_overwrites_the_committed_result(monkeypatch, capsys):
    committed = REPO / "benchmarks" / "results" / "budgeted_sweep_speed.json"
    before = committed.read_bytes()
    written = []
    script = load_benchmark("speed.budgeted_sweep_speed")
    monkeypatch.setattr(script, "write_results", lambda *a, **k: written.append(a))
    assert script.main(["--smoke"]) == 0
    assert written == [] and committed.read_bytes() == before


def test_flops_vs_acc_on_two_tiny_runs(tiny_config, tmp_path, capsys):
    a = train(load_config(tiny_config("tiny_base"), ["sila.enabled=false"])).run_dir
    b = train(load_config(tiny_config("tiny_sila"))).run_dir
    script = load_benchmark("accuracy.flops_vs_acc")
    out_dir = tmp_path / "results"
    assert script.main(["--runs", str(a), str(b), "--out", "cmp", "--results-dir", str(out_dir)]) == 0
    payload = json.loads((out_dir / "cmp.json").read_text())
    assert [e["report"]["run"] for e in payload["runs"]] == ["tiny_base", "tiny_sila"]
    assert (
        payload["command"]
        == f"python benchmarks/accuracy/flops_vs_acc.py --runs {a} {b} --out cmp --results-dir {out_dir}"
    )
    md = (out_dir / "cmp.md").read_text()
    assert "MACs" in md and "| tiny_base | msdnet | digits | 0 | 1 |" in md
    assert (out_dir / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    # identical architectures: the SiLa run's deploy costs equal the baseline's
    costs = [[x["macs_cumulative"] for x in e["report"]["exits"]] for e in payload["runs"]]
    assert costs[0] == costs[1]


def test_torch_inference_forms_smoke(tmp_path):
    bench = load_benchmark("speed.torch_inference_forms")
    assert bench.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "torch_inference_forms.json").read_text())
    assert [r["form"].split(",")[0] for r in result["rows"]] == ["eager", "eager", "TorchScript"]
    assert all(r["max_abs_logit_difference"] < 1e-3 and r["seconds"] > 0 for r in result["rows"])


def test_calibrated_exits_on_two_tiny_runs(tiny_config, tmp_path, capsys):
    runs = [train(load_config(tiny_config(f"tiny_{i}"), [f"seed={i}"])).run_dir for i in (0, 1)]
    evals = [(r / "eval.json").read_bytes() for r in runs]
    script = load_benchmark("accuracy.calibrated_exits")
    out_dir = tmp_path / "results"
    assert script.main(["--runs", *map(str, runs), "--results-dir", str(out_dir)]) == 0
    payload = json.loads((out_dir / "calibrated_exits.json").read_text())
    assert [(r / "eval.json").read_bytes() for r in runs] == evals  # the runs' own evaluations are not rewritten
    for run, row in zip(runs, payload["runs"], strict=True):  # the same fit as the run's own evaluation
        written = EvalReport.from_json((run / "eval.json").read_text())
        assert row["temperatures"] == pytest.approx(written.calibration.fit.temperatures)
    gains = [r["area"][1] - r["area"][0] for r in payload["runs"]]
    assert payload["differences"]["area"]["mean"] == pytest.approx(sum(gains) / 2)
    assert payload["differences"]["area"]["n"] == 2
    assert "| figure | difference |" in (out_dir / "calibrated_exits.md").read_text()


def test_calibrated_exits_names_a_missing_run_in_one_line(tmp_path, capsys):
    script = load_benchmark("accuracy.calibrated_exits")
    assert script.main(["--runs", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err and "train it first" in err
