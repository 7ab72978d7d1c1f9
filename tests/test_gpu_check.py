"""benchmarks/speed/gpu_check.py, the device check: its CPU smoke version end to end (well-formed results, every target
evaluated from the numbers it reports), the time budget, the run without fvcore, and the target verdicts."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynsila import models
from tests.conftest import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def check_target_verdicts(targets: dict) -> None:
    """Every target states its number, limit and a verdict that follows from them."""
    assert set(targets) == {"training_speedup", "sila_step_overhead", "runner_mix50"}
    for name, t in targets.items():
        assert t["comparison"] in (">=", "<="), name
        if t["value"] is None:
            assert t["met"] is None and t["status"].startswith("not measured ("), name
            continue
        met = t["value"] >= t["limit"] if t["comparison"] == ">=" else t["value"] <= t["limit"]
        assert t["met"] is met and t["status"] == ("met" if met else "missed"), name


def test_smoke_check_measures_every_part_and_evaluates_every_target(tmp_path, capsys):
    gpu_check = load_benchmark("speed.gpu_check")
    assert gpu_check.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["command"] == f"python benchmarks/speed/gpu_check.py --smoke --results-dir {tmp_path}"
    assert result["complete"] and result["environment"]["device"].startswith("cpu")
    assert result["cost_counter"].startswith("fvcore") and len(result["msdnet_exit_macs"]) == 3
    parts = result["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    assert not any("error" in p or "skipped" in p for p in parts.values())

    train = parts["train64"]
    plain, optimised = train["rows"]
    assert plain["name"] == "plain eager loop" and plain["images_per_second"] > 0
    assert optimised["options"] == ["data.on_device=true", "train.channels_last=true", "train.amp=bf16"]
    assert train["left_out"] == ["+ torch.compile: not in the smoke run"]
    assert train["speedup"] == pytest.approx(optimised["images_per_second"] / plain["images_per_second"])
    assert [r["name"] for r in parts["ablation"]["rows"]] == [label for label, _ in gpu_check.training.STACK[:-1]]
    assert all(r["images_per_second"] > 0 for r in parts["ablation"]["rows"] + parts["train256"]["rows"])
    sila = parts["sila"]
    assert sila["step_time_ratio"] == statistics.median(sila["ratios"]) > 0
    assert {(r["batch_size"], r["target_fraction"]) for r in parts["runner"]["rows"]} == {
        (b, f) for b in (8, 1) for f in (0.25, 0.5, 0.75)
    }
    skip = parts["skipnet"]
    assert 0 < skip["skipped_fraction"] < 1 and 0 < skip["macs_ratio"] < 1 and skip["wall_ratio"] > 0
    measured = [r for r in parts["eval"]["rows"] if "images_per_second" in r]
    assert len(measured) == 4 and all(r["images_per_second"] > 0 for r in measured)

    targets = result["targets"]
    check_target_verdicts(targets)
    half = next(r for r in parts["runner"]["rows"] if r["batch_size"] == 8 and r["target_fraction"] == 0.5)
    assert targets["training_speedup"]["value"] == train["speedup"]
    assert targets["sila_step_overhead"]["value"] == pytest.approx(sila["step_time_ratio"] - 1)
    assert targets["runner_mix50"]["value"] == pytest.approx(half["wall_ratio"] / half["macs_ratio"])
    md = (tmp_path / "gpu.md").read_text()
    title = "# GPU check: training, evaluation and early exit\n\n"
    assert md.startswith(title + "Command: `python benchmarks/speed/gpu_check")
    for t in targets.values():
        assert f"{t['value']:.3f} (target {t['comparison']} {t['limit']}): {t['status']}" in md


def test_an_exhausted_budget_skips_every_part_and_leaves_the_targets_unmeasured(tmp_path, capsys):
    gpu_check = load_benchmark("speed.gpu_check")
    args = ["--smoke", "--budget-s", "0", "--parts", "sila,train64", "--out", "b", "--results-dir", str(tmp_path)]
    assert gpu_check.main(args) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    assert list(result["parts"]) == ["train64", "sila"]  # priority order, whatever order they were asked in
    assert all(p["skipped"].startswith("time budget: ") for p in result["parts"].values())
    check_target_verdicts(result["targets"])
    assert all(t["met"] is None for t in result["targets"].values())
    assert "not measured (part not run)" in result["targets"]["runner_mix50"]["status"]


def test_without_fvcore_costs_come_from_flop_counter_and_fvcore_parts_say_why(tmp_path):
    code = (
        "import sys; sys.modules['fvcore'] = sys.modules['fvcore.nn'] = None\n"
        "from benchmarks.speed.gpu_check import main\n"
        f"raise SystemExit(main(['--smoke', '--parts', 'runner,eval', '--results-dir', {str(tmp_path)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["cost_counter"] == "torch.utils.flop_counter (fvcore not installed)"
    assert result["parts"]["runner"]["skipped"].startswith("needs fvcore (")
    assert "not measured (needs fvcore" in result["targets"]["runner_mix50"]["status"]
    assert len([r for r in result["parts"]["eval"]["rows"] if "images_per_second" in r]) == 4


def test_flop_counter_fallback_counts_what_fvcore_counts(tiny_model_kwargs):
    gpu_check = load_benchmark("speed.gpu_check")
    from dynsila.budget.flops import exit_costs

    model = models.build("msdnet", num_classes=10, **tiny_model_kwargs).eval()
    fvcore_macs = [c.macs_cumulative for c in exit_costs(model, (3, 32, 32))]
    assert gpu_check.flop_counter_exit_macs(model) == fvcore_macs
    assert fvcore_macs[0] < fvcore_macs[-1]


@pytest.mark.parametrize(
    ("value", "comparison", "status"),
    [(2.0, ">=", "met"), (1.999, ">=", "missed"), (1.3, "<=", "met"), (1.301, "<=", "missed"), (None, "<=", None)],
)
def test_a_target_is_met_exactly_when_its_number_is_within_the_limit(value, comparison, status):
    gpu_check = load_benchmark("speed.gpu_check")
    limit = 2.0 if comparison == ">=" else 1.3
    t = gpu_check.target("x", value, limit, comparison, "skipped: why")
    assert t["status"] == (status or "not measured (skipped: why)")
    assert t["met"] is (None if status is None else status == "met")


def test_targets_are_computed_from_the_parts_numbers():
    gpu_check = load_benchmark("speed.gpu_check")
    parts = {
        "train64": {"batch": 64, "speedup": 2.5},
        "sila": {"step_time_ratio": 1.07},
        "runner": {
            "batch": 256,
            "rows": [
                {"batch_size": 1, "target_fraction": 0.5, "wall_ratio": 0.9, "macs_ratio": 0.5},
                {"batch_size": 256, "target_fraction": 0.25, "wall_ratio": 0.3, "macs_ratio": 0.25},
                {"batch_size": 256, "target_fraction": 0.5, "wall_ratio": 0.6, "macs_ratio": 0.5},
            ],
        },
    }
    targets = gpu_check.targets_of(parts)
    assert targets["training_speedup"]["met"] is True
    assert math.isclose(targets["sila_step_overhead"]["value"], 0.07) and targets["sila_step_overhead"]["met"] is False
    assert targets["runner_mix50"]["value"] == pytest.approx(1.2) and targets["runner_mix50"]["met"] is True
    assert targets["runner_mix50"]["wall_ratio"] == 0.6
    check_target_verdicts(targets)


def test_bad_command_lines_stop_with_one_clear_line(capsys):
    gpu_check = load_benchmark("speed.gpu_check")
    with pytest.raises(SystemExit):
        gpu_check.main(["--smoke", "--parts", "train64,nonsense"])
    assert "unknown part(s) nonsense; choose from train64,runner," in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.main([])
        assert "no CUDA device is visible" in capsys.readouterr().err


def test_config_keys_this_checkout_lacks_are_named():
    training = load_benchmark("speed.gpu_training")
    assert training.missing_keys(["data.on_device=true", "train.no_such_option=1", "train.amp=bf16"]) == [
        "train.no_such_option"
    ]
