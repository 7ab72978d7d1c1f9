"""benchmarks/anytime.py: paired statistics, the design check, and a resumable grid that reports from run files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.sila_experiment import anytime
from benchmarks.sila_experiment.anytime_last_epoch import comparisons, last_epoch_test_top1
from benchmarks.sila_experiment.anytime_markdown import NO_VALUE, markdown
from benchmarks.sila_experiment.anytime_report import summarise
from benchmarks.sila_experiment.paired_stats import holm, minimum_detectable_effect, paired, pairs_for_width
from benchmarks.sila_experiment.plan import RunSpec, load_plan, planned_runs, run_overrides

PLAN = load_plan(anytime.DEFAULT_PLAN)
CPU = PLAN.devices["cpu"]


def fake_run(method: str, seed: int, test: list[float], clean: float = 99.0) -> dict:
    macs = [1e6, 2e6, 3e6]
    return {
        "method": method,
        "seed": seed,
        "tier": PLAN.arms[method].group if method in PLAN.arms else 1,
        "train_seconds": 60.0,
        "last_epoch": {"twin_gap_e1": 0.5} if method.startswith("sila") else {},
        "peers": [
            {
                "exit_macs": macs,
                "params_cumulative": [10, 20, 30],
                "test_top1": test,
                "val_top1": test,
                "train_top1_clean": [clean] * 3,
                "budgeted": [{"q": q, "avg_macs": 1e6 + q * 1e6, "test_top1": test[0] + q} for q in (0.0, 1.0, 2.0)],
            }
        ],
    }


def grid_runs(shift: dict[str, float], seeds: int = 5, noise: float = 0.3) -> list[dict]:
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(seeds):
        base = 60 + 3 * rng.standard_normal()  # seeds differ a lot; paired differences do not
        for method, delta in shift.items():
            level = base + delta + noise * rng.standard_normal()
            runs.append(fake_run(method, seed, [level - 4, level - 2, level]))
    return runs


def report_payload(runs: list[dict], plan=PLAN) -> dict:
    """What ``anytime.report`` hands to ``markdown``, for fake runs."""
    return {
        "command": "x", "plan": "p.yaml", "name": "anytime_x", "title": "T", "config": "c.yaml", "notes": [],
        "augmentation": "none", "planned_runs": 10, "finished_runs": len(runs),
        "methods": {n: {"group": a.group, "about": a.about, "overrides": list(a.overrides)} for n, a in
                    plan.arms.items()},
        "families": {n: {"title": f.title, "pairing": f.pairing, "holm_scope": f.holm_scope, "target": f.target}
                     for n, f in plan.families.items()},
        "summary": summarise(runs, plan),
    }  # fmt: skip


def tiny_plan(tmp_path: Path, config: Path, arms: dict[str, list[str]], starts_from: dict | None = None,
              families: dict | None = None) -> Path:  # fmt: skip
    """A plan file of ``arms`` (name -> overrides) on seed 0 of a tiny config, its canary the first arm."""
    first = next(iter(arms))
    raw = {
        "name": "anytime_tiny", "config": str(config), "needs": str(config), "widths": {"full": []},
        "devices": {"cpu": {"jobs": 2, "threads": 1}},
        "canary": {"arm": first, "seed": 0, "overrides": ["train.lr=0.04"], "reference": str(tmp_path / "canary.json")},
        "arms": {n: {"overrides": o, **({"starts_from": (starts_from or {})[n]} if n in (starts_from or {}) else {}),
                     "compare_with": [first] if n != first else []} for n, o in arms.items()},
        "seeds": [{"arms": list(arms), "seeds": 0}],
        "families": families or {},
    }  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_paired_difference_matches_a_hand_computation() -> None:
    d = paired({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.0})  # differences 2, 3, 2
    assert d["mean"] == pytest.approx(7 / 3)
    std = np.std([2, 3, 2], ddof=1)
    assert d["ci95"] == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-5)  # t(0.975, 2) = 4.3027
    assert d["mde"] == pytest.approx((4.302653 + 1.060660) * std / math.sqrt(3), rel=1e-5)  # t(0.80, 2) = 1.0607
    assert minimum_detectable_effect(1.0, 1) != minimum_detectable_effect(1.0, 1)  # one pair: nan


def test_pairs_for_width_is_the_first_seed_count_under_the_target() -> None:
    # sd 2.29 (the spread behind a +-3.64 interval at 4 seeds): t(0.975, n-1) * 2.29 / sqrt(n) first drops
    # below 1.0 at n = 23 (t(0.975, 22) = 2.0739 -> 0.990; t(0.975, 21) = 2.0796 at n = 22 -> 1.015)
    assert pairs_for_width(2.29, 1.0) == 23
    assert pairs_for_width(0.1, 1.0) == 2
    assert pairs_for_width(100.0, 1.0, limit=50) is None
    assert pairs_for_width(math.nan, 1.0) is None


def test_last_epoch_comparisons_pair_each_rule_over_the_same_seeds() -> None:
    by_method = {
        "baseline": {"best": {0: 50.0, 1: 52.0, 2: 51.0}, "last": {0: 55.0, 1: 56.0, 2: 55.5}},
        "baseline_x2": {"best": {0: 51.0, 1: 52.0, 2: 53.0}, "last": {0: 55.0, 1: 56.0, 2: 56.0}},
        "sila_features": {"best": {0: 52.0, 1: 53.0, 2: 51.0}, "last": {0: 56.0, 1: 57.0, 2: 56.5}},
        "dml": {"best": {0: 53.0, 1: 54.0}, "last": {0: 57.0, 1: 58.0}},
        "sila_dml": {"best": {0: 53.5}, "last": {0: 57.5}},
    }
    rows = {(r["method"], r["reference"]): r for r in comparisons(by_method)}
    # the same pairs as the primary report: SiLa + DML also against DML (the method without SiLa)
    assert set(rows) == {
        ("baseline_x2", "baseline"),
        ("sila_features", "baseline"),
        ("sila_features", "baseline_x2"),
        ("dml", "baseline"),
        ("sila_dml", "baseline"),
        ("sila_dml", "baseline_x2"),
        ("sila_dml", "dml"),
    }
    assert rows[("sila_dml", "dml")]["last"]["mean"] == pytest.approx(0.5)  # seed 0 only: 57.5 - 57.0
    sila = rows[("sila_features", "baseline")]
    assert sila["best"]["mean"] == pytest.approx(1.0) and sila["last"]["mean"] == pytest.approx(1.0)
    assert sila["last"]["std"] == 0.0 and sila["best"]["std"] > 0  # the rules give different spreads


def test_holm_adjusts_a_family_step_down_by_hand() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 of m = 4: x4, x3, x2, x1 -> 0.02, 0.03, 0.06, max(0.04, 0.06) = 0.06
    adjusted = holm([0.01, 0.04, 0.03, 0.005, math.nan])
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[4])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1 (2 x 0.6), then carried forward


def test_pairs_only_seeds_both_sides_have() -> None:
    assert paired({0: 1.0, 1: 2.0, 7: 9.0}, {0: 0.0, 1: 0.0})["n"] == 2


def test_a_real_effect_is_seen_and_a_null_is_not() -> None:
    runs = grid_runs({"baseline": 0.0, "baseline_x2": 0.0, "sila_features": 0.0, "self_distill": 2.0})
    summary = summarise(runs, PLAN)
    found = {(c["method"], c["reference"]): c["area"] for c in summary["comparisons"]}
    control = found[("self_distill", "baseline")]
    assert control["mean"] == pytest.approx(2.0, abs=0.5)
    assert abs(control["mean"]) > control["ci95"]
    assert summary["design"]["positive_control_seen"]
    family = {(c["method"], c["reference"]): c for c in summary["design"]["tier1_holm"]}
    assert family[("self_distill", "baseline")]["p_holm"] < 0.05  # a 2-point effect survives the correction
    assert family[("sila_features", "baseline")]["p_holm"] >= family[("sila_features", "baseline")]["p"]
    null = found[("sila_features", "baseline")]
    assert abs(null["mean"]) < 0.6
    assert ("sila_features", "baseline_x2") in found  # each SiLa reading also against the loss-scale control
    baseline_test = [r["peers"][0]["test_top1"] for r in runs if r["method"] == "baseline"]
    assert summary["design"]["baseline_gap"] == pytest.approx(99.0 - np.mean(baseline_test))


def test_half_width_claim_pairs_half_sila_with_both_baselines() -> None:
    runs = grid_runs({"baseline": 0.0, "half_baseline": -3.0, "half_sila": -1.0}, seeds=4, noise=0.1)
    half = summarise(runs, PLAN)["claims"]["half_width"]
    assert list(half["methods"]) == ["baseline", "half_baseline", "half_sila"]
    full, narrow = half["half_sila_vs"]["baseline"], half["half_sila_vs"]["half_baseline"]
    assert all(d["mean"] == pytest.approx(-1.0, abs=0.3) and d["n"] == 4 for d in full)
    assert all(d["mean"] == pytest.approx(2.0, abs=0.3) for d in narrow)
    assert summarise(grid_runs({"baseline": 0.0, "half_baseline": -3.0}), PLAN)["claims"]["half_width"] is None
    text = markdown(report_payload(runs))
    assert "| half_sila − baseline |  |  | -0.9" in text and "| half_sila − half_baseline |  |  | +2.0" in text


def test_budgets_a_half_width_network_cannot_spend_show_as_no_value_not_nan() -> None:
    runs = grid_runs({"baseline": 0.0, "half_baseline": -3.0, "half_sila": -1.0}, seeds=3)
    for run in runs:  # half width costs a quarter: its whole budgeted curve lies below the full-width grid
        if run["method"].startswith("half_"):
            for point in run["peers"][0]["budgeted"]:
                point["avg_macs"] /= 4
    text = markdown(report_payload(runs))
    budgeted = text.split("## Budgeted")[1].split("\n## ")[0]
    half_row = next(line for line in budgeted.splitlines() if line.startswith("| half_sila |"))
    assert set(half_row.strip("| ").split(" | ")[1:]) == {NO_VALUE}
    secondary = text.split("## Every arm against its references")[1].split("\n## ")[0]
    assert "nan" not in budgeted and "nan" not in secondary
    assert "| baseline | " + NO_VALUE not in budgeted  # the full-width rows keep their numbers


def test_composed_methods_are_also_paired_with_the_same_method_without_sila() -> None:
    runs = grid_runs({"baseline": 0.0, "dml": 3.0, "sila_dml": 2.0, "self_distill": 3.0, "sila_self_distill": 3.5})
    summary = summarise(runs, PLAN)
    found = {(c["method"], c["reference"]): c["area"] for c in summary["comparisons"]}
    assert found[("sila_dml", "dml")]["mean"] == pytest.approx(-1.0, abs=0.4)
    assert found[("sila_self_distill", "self_distill")]["mean"] == pytest.approx(0.5, abs=0.4)
    assert ("dml", "self_distill") not in found
    row = next(line for line in markdown(report_payload(runs)).splitlines() if line.startswith("| sila_dml | dml |"))
    assert row.split(" | ")[2].startswith(("-1.", "-0."))  # the all-pairs table: SiLa + DML against DML


def test_per_exit_differences_find_an_effect_on_one_exit_only() -> None:
    rng = np.random.default_rng(1)
    runs = []
    for seed in range(5):
        level = 60 + 3 * rng.standard_normal()
        for method, first_exit_gain in (("baseline", 0.0), ("self_distill", 3.0)):
            test = [level - 4 + first_exit_gain, level - 2, level] + 0.2 * rng.standard_normal(3)
            runs.append(fake_run(method, seed, test.tolist()))
    (compared,) = summarise(runs, PLAN)["comparisons"]
    first, *later = compared["exits"]
    assert first["mean"] == pytest.approx(3.0, abs=0.4) and first["mean"] > first["ci95"]
    assert all(abs(d["mean"]) < 0.4 and d["n"] == 5 for d in later)


def test_without_a_visible_positive_control_the_report_says_inconclusive() -> None:
    runs = grid_runs({"baseline": 0.0, "self_distill": 0.0}, noise=2.0)
    text = markdown(report_payload(runs))
    assert "not sensitive enough" in text
    assert "**not seen**" in text
    assert "| self_distill | baseline | " in text  # the secondary table pairs it per exit
    assert "## Claim `half_width`\n\nNo run of this claim yet." in text


def test_plan_is_seed_major_and_half_width_arms_get_half_width_overrides(tmp_path) -> None:
    specs = planned_runs(PLAN)
    tier1 = [m for m, arm in PLAN.arms.items() if arm.group == 1]
    assert [s.method for s in specs[: len(tier1)]] == tier1 and {s.seed for s in specs[: len(tier1)]} == {0}
    assert sum(s.method == "baseline" for s in specs) == 5 and sum(s.method == "dml" for s in specs) == 3
    half = run_overrides(PLAN, CPU, RunSpec("half_sila", 1), tmp_path)
    full = run_overrides(PLAN, CPU, RunSpec("sila_joint_only", 1), tmp_path)
    assert set(PLAN.widths["half_width"]) <= set(half) and not set(PLAN.widths["half_width"]) & set(full)
    params = run_overrides(PLAN, CPU, RunSpec("half_params_sila", 0), tmp_path)
    assert set(PLAN.widths["half_params"]) <= set(params)
    assert sum(s.method == "sila_classifier" for s in specs) == 5


def test_grid_trains_what_is_missing_then_reports_from_files_alone(tmp_path: Path, tiny_config) -> None:
    config = tiny_config("grid", train={"epochs": 1, "log_every": 100})
    arms = {"baseline": ["sila.enabled=false"], "sila_features": ["sila.enabled=true"]}
    plan = tiny_plan(tmp_path, config, arms, families={"main": {"comparisons": [["sila_features", "baseline"]]}})
    args = ["--plan", str(plan), "--results-dir", str(tmp_path / "res"), "--runs-root", str(tmp_path / "runs")]
    assert anytime.main(args) == 3  # no committed canary: nothing trains
    assert not (tmp_path / "res" / "anytime_tiny" / "runs").exists()
    assert anytime.main([*args, "--make-canary"]) == 0  # the first machine makes the reference, then trains
    files = sorted((tmp_path / "res" / "anytime_tiny" / "runs").glob("*.json"))
    assert [f.name for f in files] == ["baseline_seed0.json", "sila_features_seed0.json"]
    record = json.loads(files[0].read_text())
    assert len(record["peers"][0]["train_top1_clean"]) == len(record["peers"][0]["test_top1"])
    assert record["admission"]["canary"] == "equal" and len(record["admission"]["machines"]) == 1
    first = json.loads((tmp_path / "res" / "anytime_tiny.json").read_text())["summary"]
    assert first["pairing_groups"] == {f"admitted:{record['admission']['training_path']}": 2}
    assert (tmp_path / "res" / "anytime_tiny.png").exists() and (tmp_path / "res" / "anytime_tiny_forest.png").exists()
    # one epoch: the last epoch is the best one, so the secondary analysis must reproduce the run files' test top-1
    # (the SiLa run's checkpoint holds the wrapped network and its twin heads; the baseline's the bare network)
    for name in ("baseline_seed0", "sila_features_seed0"):
        top1, epoch = last_epoch_test_top1(tmp_path / "runs" / name)
        recorded = json.loads((tmp_path / "res" / "anytime_tiny" / "runs" / f"{name}.json").read_text())
        assert epoch == 1 and top1 == pytest.approx(recorded["peers"][0]["test_top1"], abs=1e-4)
    # the checkpoints are gone (as on another machine): the report comes back from the run files alone
    for path in sorted((tmp_path / "runs").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    assert anytime.main([*args, "--report-only"]) == 0
    assert json.loads((tmp_path / "res" / "anytime_tiny.json").read_text())["summary"] == first


def test_the_half_params_width_has_45_to_55_percent_of_the_deploy_parameters() -> None:
    from dynsila.budget.flops import count_params
    from dynsila.config import load_config
    from dynsila.runs.rundir import build_model

    full = count_params(build_model(load_config(PLAN.config, ["data.num_classes=10"])))
    half = count_params(build_model(load_config(PLAN.config, ["data.num_classes=10", *PLAN.widths["half_params"]])))
    assert 0.45 <= half / full <= 0.55


def test_tier3_family_is_holm_corrected_on_its_own_and_calls_wide_nulls_inconclusive() -> None:
    shifts = {"baseline": 0.0, "baseline_rerun": 0.0, "baseline_x2_rerun": 0.0, "sila_classifier": 3.0, "sila_mlp": 0.0}
    runs = grid_runs(shifts)
    summary = summarise(runs, PLAN)
    verdicts = {(v["method"], v["reference"]): v for v in summary["families"]["tier3"]}
    # tier 3 is paired with the baselines re-run at its revision, never with the first runs' files
    references = ("baseline_rerun", "baseline_x2_rerun")
    assert set(verdicts) == {(m, r) for m in ("sila_classifier", "sila_mlp") for r in references}
    assert verdicts[("sila_classifier", "baseline_rerun")]["verdict"] == "helps"
    assert (
        verdicts[("sila_mlp", "baseline_rerun")]["verdict"] == "no effect seen"
    )  # the MDE here is well under 2 points
    family = [v["p_holm"] for v in summary["families"]["tier3"]]
    assert all(v["p_holm"] >= v["area"]["p_value"] for v in summary["families"]["tier3"]) and len(family) == 4
    noisy = summarise(grid_runs({"baseline_rerun": 0.0, "sila_mlp": 0.0}, noise=4.0), PLAN)["families"]["tier3"]
    assert [v["verdict"] for v in noisy] == ["inconclusive"]

    from benchmarks.sila_experiment.anytime_report import reading_verdict

    nominal = {"mean": 0.9, "p_value": 0.04, "mde": 1.0}  # beyond noise alone, not after Holm over the family
    assert reading_verdict(nominal, p_holm=0.17) == "nominal gain, not after Holm"
    assert reading_verdict({**nominal, "mean": -0.9}, p_holm=0.17) == "nominal loss, not after Holm"
    assert reading_verdict(nominal, p_holm=0.01) == "helps"
    assert reading_verdict({**nominal, "p_value": 0.4}, p_holm=1.0) == "no effect seen"
    assert "## Family `tier3`" in markdown(report_payload(runs))


def test_collapse_needs_a_small_gap_and_full_agreement() -> None:
    from benchmarks.sila_experiment.anytime_report import collapsed

    assert collapsed({"twin_rel_gap_e0": 0.03, "twin_agree_e0": 1.0}) is True
    assert collapsed({"twin_rel_gap_e0": 1.0, "twin_agree_e0": 0.998}) is False  # agrees, but far apart
    assert collapsed({"twin_rel_gap_e0": 0.01, "twin_agree_e0": 0.9}) is False
    assert collapsed({}) is None


@pytest.mark.parametrize(("sila", "small", "supported"), [(-0.2, -3.0, True), (-3.0, -3.0, False), (-3, -6, False)])
def test_half_parameter_claim_needs_both_conditions(sila: float, small: float, supported: bool) -> None:
    runs = grid_runs({"baseline_rerun": 0.0, "half_params_baseline": small, "half_params_sila": sila})
    claim = summarise(runs, PLAN)["claims"]["half_params"]
    assert claim["supported"] is supported
    assert set(claim["area_vs"]) == {"baseline_rerun", "half_params_baseline"}


def test_half_parameter_claim_is_not_judged_on_one_seed() -> None:
    runs = grid_runs({"baseline_rerun": 0.0, "half_params_baseline": -3.0, "half_params_sila": 0.0}, seeds=1)
    assert summarise(runs, PLAN)["claims"]["half_params"]["supported"] is None


def test_the_precision_family_pairs_only_seeds_run_on_the_same_machine():
    """Seeds 0-1 without a fingerprint (older files), seed 3 on two different machines: only seeds 2 and 4 pair, and
    a shift that only the unpaired seeds carry does not reach the verdict."""
    machine_a, machine_b = {"cpu": "A", "torch": "2"}, {"cpu": "B", "torch": "2"}
    runs = []
    for seed in range(5):
        for method, delta in {"baseline": 0.0, "baseline_x2_rerun": 0.0, "sila_mlp": 0.5}.items():
            unpaired = seed in (0, 1, 3)
            level = 60.0 + seed + delta + (10.0 if unpaired and method == "sila_mlp" else 0.0) + 0.1 * (seed % 2)
            run = fake_run(method, seed, [level - 4, level - 2, level])
            if seed >= 2:
                run["fingerprint"] = machine_b if (seed == 3 and method == "sila_mlp") else machine_a
            runs.append(run)
    (verdict,) = summarise(runs, PLAN)["families"]["precision"]
    assert (verdict["method"], verdict["reference"], verdict["seeds"]) == ("sila_mlp", "baseline_x2_rerun", [2, 4])
    assert verdict["area"]["n"] == 2 and verdict["area"]["mean"] == pytest.approx(0.5, abs=0.2)
    assert verdict["any_machine"]["n"] == 5 and verdict["any_machine"]["mean"] > 5  # the unchecked pairs differ
    text = markdown(report_payload(runs))
    assert "one pairing group" in text and "| sila_mlp | baseline_x2_rerun | 2 |" in text


def test_a_run_resumed_on_another_machine_records_no_fingerprint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    anytime.note_machine(run_dir)
    assert anytime.run_fingerprint(run_dir) == anytime.machine_fingerprint()
    monkeypatch.setattr(anytime, "machine_fingerprint", lambda: {"cpu": "elsewhere"})
    anytime.note_machine(run_dir)  # the resumed part
    assert anytime.run_fingerprint(run_dir) is None


def test_two_pairs_get_no_verdict_however_small_their_spread():
    from benchmarks.sila_experiment.anytime_report import reading_verdict

    two = {"mean": 0.1, "n": 2, "ci95": 0.5, "p_value": 0.6, "mde": 0.4}
    assert reading_verdict(two, 1.0).startswith("too few pairs")
    assert reading_verdict({**two, "n": 3}, 1.0) == "no effect seen"


def field_runs(deltas: dict[str, float], seeds: range, machine: dict | None = None) -> list[dict]:
    """The loss-scale control re-run and the field's techniques on ``seeds``, each shifted by its delta."""
    runs = []
    for seed in seeds:
        for method, delta in {"baseline": 0.0, "baseline_x2_rerun": 0.0, **deltas}.items():
            level = 60.0 + seed + delta + 0.05 * (seed % 3)
            run = fake_run(method, seed, [level - 4, level - 2, level])
            run["fingerprint"] = machine or {"cpu": "A"}
            runs.append(run)
    return runs


def test_a_second_stage_starts_from_its_source_run_of_the_same_seed(tmp_path) -> None:
    specs = planned_runs(PLAN, ["baseline", "ztw_cascade", "ztw_ensemble"])
    field = [s for s in specs if s.method.startswith("ztw")]
    assert [s.name for s in field[:4]] == ["ztw_cascade_seed5", "ztw_ensemble_seed5", "ztw_cascade_seed6",
                                           "ztw_ensemble_seed6"]  # fmt: skip
    second, first = RunSpec("ztw_ensemble", 5), RunSpec("ztw_cascade", 5)
    overrides = run_overrides(PLAN, CPU, second, tmp_path)
    assert f"train.init_from={tmp_path / 'ztw_cascade_seed5'}" in overrides and "ztw.stage=ensemble" in overrides
    assert not any(o.startswith("train.init_from") for o in run_overrides(PLAN, CPU, first, tmp_path))
    assert anytime.startable(PLAN, second, [first], [], tmp_path) is None  # waits: its source is still to train
    assert anytime.startable(PLAN, second, [], [], tmp_path) is False  # its source finished elsewhere: never here
    (tmp_path / first.name).mkdir()
    (tmp_path / first.name / anytime.EVAL_FILE).write_text("{}")
    assert anytime.startable(PLAN, second, [], [], tmp_path) is True


def test_sila_joins_the_best_field_technique_only_once_every_technique_has_five_pairs() -> None:
    techniques = PLAN.families["field"].select.candidates
    deltas = {t: 0.2 * i for i, t in enumerate(techniques)} | {"imta": 1.5}
    waiting = summarise(field_runs(deltas, range(5, 9)), PLAN)["selections"]["field"]
    assert waiting["choice"] is None and "waits for 5 matched pairs" in waiting["why"] and "imta 4" in waiting["why"]
    runs = field_runs(deltas, range(5, 10))
    chosen = summarise(runs, PLAN)["selections"]["field"]
    assert chosen["choice"] == "imta" and "imta +1.50" in chosen["why"]
    specs = planned_runs(PLAN, choices={"field": "imta"})
    assert [s.seed for s in specs if s.method == "sila_imta"] == list(range(5, 15))  # the decision's seeds too
    assert not any(s.method in ("sila_ge", "sila_l2w") for s in specs)
    assert planned_runs(PLAN) == specs  # sila_imta's seeds 5-9 are also planned by the decision block
    ensemble = planned_runs(PLAN, choices={"field": "ztw_ensemble"})
    added = [s.name for s in ensemble if s.method.startswith("sila_ztw")]
    assert added[:2] == ["sila_ztw_cascade_seed5", "sila_ztw_ensemble_seed5"] and len(added) == 10
    # a technique whose pairs ran on another machine does not count towards the five
    moved = [dict(r, fingerprint={"cpu": "B"}) if r["method"] == "ge" and r["seed"] == 9 else r for r in runs]
    assert summarise(moved, PLAN)["selections"]["field"]["choice"] is None


def test_sila_with_a_technique_is_paired_with_the_technique_alone_and_the_loss_scale_control() -> None:
    runs = field_runs({"imta": 1.0, "sila_imta": 1.0}, range(5, 10))
    field = summarise(runs, PLAN)["families"]["field"]
    pairs = [(v["method"], v["reference"]) for v in field]
    assert ("sila_imta", "imta") in pairs and ("sila_imta", "baseline_x2_rerun") in pairs
    alone = next(v for v in field if (v["method"], v["reference"]) == ("sila_imta", "imta"))
    assert alone["area"]["mean"] == pytest.approx(0.0, abs=1e-9) and alone["seeds"] == [5, 6, 7, 8, 9]
    control = next(v for v in field if (v["method"], v["reference"]) == ("sila_imta", "baseline_x2_rerun"))
    assert control["budgeted"]["mean"] == pytest.approx(1.0) and control["budgeted"]["n"] == 5  # the curve moved too
    assert "| Δ budgeted mean |" in markdown(report_payload(runs))


def test_the_grid_trains_a_second_stage_after_its_source_with_both_jobs_free(tmp_path, tiny_config):
    config = tiny_config("grid2", train={"epochs": 1, "log_every": 100})
    arms = {"ztw_cascade": ["sila.enabled=false", "ztw.enabled=true"],
            "ztw_ensemble": ["sila.enabled=false", "ztw.enabled=true", "ztw.stage=ensemble"]}  # fmt: skip
    plan = tiny_plan(tmp_path, config, arms, starts_from={"ztw_ensemble": "ztw_cascade"})
    args = ["--plan", str(plan), "--results-dir", str(tmp_path / "res"), "--runs-root", str(tmp_path / "runs")]
    assert anytime.main([*args, "--make-canary"]) == 0
    runs = tmp_path / "res" / "anytime_tiny" / "runs"
    first, second = (json.loads((runs / f"{m}_seed0.json").read_text()) for m in ("ztw_cascade", "ztw_ensemble"))
    assert f"train.init_from={tmp_path / 'runs' / 'ztw_cascade_seed0'}" in second["train"]
    assert second["fingerprint"] == first["fingerprint"] is not None
    assert second["admission"] == first["admission"] and first["admission"]["canary"] == "equal"
    # every internal classifier answers with its ensemble: more deploy MACs at every exit (cumulative)
    before, after = first["peers"][0]["exit_macs"], second["peers"][0]["exit_macs"]
    assert all(b > a for a, b in zip(before, after, strict=True))


def test_a_re_run_is_equal_only_when_every_number_but_the_timings_is():
    from benchmarks.sila_experiment.anytime_report import reproduction_checks

    first = fake_run("ge", 5, [50.0, 52.0, 54.0]) | {"code": "abc", "last_epoch": {"loss": 0.1, "seconds": 20.0}}
    again = json.loads(json.dumps(first)) | {"train_seconds": 99.0, "last_epoch": {"loss": 0.1, "seconds": 31.0}}
    again["code"] = "def"  # a later revision that trains the same numbers bridges the two
    moved = json.loads(json.dumps(again))
    moved["peers"][0]["test_top1"][2] += 1e-6
    checks = reproduction_checks([again, moved, fake_run("imta", 5, [1.0, 2.0, 3.0])], [first])
    assert [(c["equal"], c["found"]) for c in checks] == [(True, True), (False, True), (False, False)]
    text = markdown(report_payload([first]) | {"reproductions": checks})
    assert "| ge_seed5 | abc | def | equal |" in text and "**differs**" in text and "no run file to compare" in text
