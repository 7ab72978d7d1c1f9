"""Plan files of the anytime experiment: the regime-1 plan reproduces the committed grid and report, a plan edit adds
an arm, machines are admitted by a canary, matched pairs follow admissions and reproductions, regime 2 is fixed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from benchmarks.sila_experiment import admission, anytime
from benchmarks.sila_experiment.anytime_markdown import markdown
from benchmarks.sila_experiment.anytime_report import summarise
from benchmarks.sila_experiment.families import wilcoxon_exact
from benchmarks.sila_experiment.plan import RunSpec, load_plan, planned_runs
from benchmarks.toolkit import REPO_ROOT, RESULTS_DIR
from dynsila.evaluation.report import json_safe
from tests.test_anytime_experiment import fake_run, report_payload, tiny_plan

REGIME1 = load_plan(anytime.DEFAULT_PLAN)
REGIME2 = load_plan(anytime.PLANS / "regime2.yaml")
COMMITTED = RESULTS_DIR / "anytime_cifar10_dev2"


def committed_runs() -> list[dict]:
    return anytime.load_runs(COMMITTED)


def round_trip(value: object) -> object:
    return json.loads(json.dumps(json_safe(value), allow_nan=False))


def test_the_regime1_plan_regenerates_the_committed_report_numbers() -> None:
    """The committed aggregate came from the committed run files; the plan-driven report gives the same numbers. A
    report written before plans (no ``families`` key) is compared section by section with its counterpart."""
    committed = json.loads((RESULTS_DIR / "anytime_cifar10_dev2.json").read_text())
    new = round_trip(summarise(committed_runs(), REGIME1, anytime.load_runs(COMMITTED, "reproductions")))
    assert isinstance(new, dict)
    old = committed["summary"]
    if "families" in old:  # written by the plan-driven report: all of it
        assert new == old
        return
    for key in ("budget_grid_macs", "methods", "comparisons"):
        assert new[key] == old[key], key
    assert {k: new["design"][k] for k in old["design"]} == old["design"]
    assert new["claims"] == {"half_width": old["half_width"], "half_params": old["half_params"]}
    for key in ("tier3", "precision", "field"):
        assert [{k: e[k] for k in o} for o, e in zip(old[key], new["families"][key], strict=True)] == old[key], key
    assert new["selections"]["field"]["choice"] == old["field_best"]["technique"] == "imta"
    checks = anytime.reproduction_checks(anytime.load_runs(COMMITTED, "reproductions"), committed_runs())
    assert checks == committed["reproductions"]


def test_the_regime1_plan_trains_every_committed_run_with_its_recorded_command() -> None:
    planned = planned_runs(REGIME1, choices={"field": "imta"})
    exp = anytime.Experiment(REGIME1, "cpu", COMMITTED, REPO_ROOT / "runs" / REGIME1.name)
    for run in committed_runs():
        spec = RunSpec(run["method"], run["seed"])
        assert spec in planned, spec.name
        source = run["train"].partition("train.init_from=")[2]  # a second stage names its runs root
        root = Path(source).parent if source else exp.runs_root
        train = " ".join(["python -m dynsila.train", REGIME1.config, *anytime.overrides_of(exp, spec, root)])
        assert train == run["train"], spec.name
    # the SiLa + IMTA decision: imta_x2 on seeds 5-14, SiLa + IMTA and IMTA on 10-14 beside the runs of 5-9
    for arm in ("imta_x2", "sila_imta", "imta"):
        assert [s.seed for s in planned if s.method == arm] == list(range(5, 15))
    command = anytime.train_command(exp, RunSpec("imta_x2", 7), exp.runs_root)
    assert command[3:4] == [REGIME1.config] and command[4:] == [
        "train.eval_test_every_epoch=false", "train.log_every=100000", "sila.enabled=false", "imta.enabled=true",
        "loss.ce_weight=2.0", "seed=7", f"out_dir={exp.runs_root}", "name=imta_x2_seed7", "--force",
    ]  # fmt: skip
    decision = REGIME1.families["sila_imta_decision"]
    assert decision.comparisons == (("sila_imta", "baseline_x2_rerun"), ("sila_imta", "imta_x2"), ("sila_imta", "imta"))
    assert decision.holm_scope == "declared" and decision.pairing == "matched"


def decision_runs(seeds: range, shift: dict[str, float]) -> list[dict]:
    runs = []
    for seed in seeds:
        for arm, delta in {"baseline": 0.0, "baseline_x2_rerun": 0.0, "imta": 0.5, **shift}.items():
            level = 60.0 + seed + delta + 0.1 * (seed % 3) * arm.startswith("sila")
            run = fake_run(arm, seed, [level - 4, level - 2, level])
            run["fingerprint"] = {"cpu": "A"}
            runs.append(run)
    return runs


def test_the_decision_family_counts_every_declared_comparison_and_reports_the_exact_wilcoxon_p() -> None:
    runs = decision_runs(range(5, 10), {"sila_imta": 1.5})  # no imta_x2 run yet
    entries = summarise(runs, REGIME1)["families"]["sila_imta_decision"]
    assert [(e["reference"], e["holm_m"]) for e in entries] == [("baseline_x2_rerun", 3), ("imta", 3)]
    smallest = min(entries, key=lambda e: e["area"]["p_value"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, 3 * smallest["area"]["p_value"]))  # m = 3, not 2
    assert all(e["wilcoxon_p"] == pytest.approx(2 / 32) for e in entries)  # five positive differences: 2 / 2^5
    payload = report_payload(runs)
    declared = [list(c) for c in REGIME1.families["sila_imta_decision"].comparisons]
    planned = {f"{a} vs {b}": 10 for a, b in declared}
    payload["families"]["sila_imta_decision"] |= {"comparisons": declared, "planned_pairs": planned}
    section = markdown(payload).split("## Family `sila_imta_decision`")[1].split("\n## ")[0]
    assert "Wilcoxon exact p" in section and "(m=3)" in section and "| sila_imta | imta | 5 of 10 |" in section
    assert "| sila_imta | imta_x2 | 0 of 10 | no run yet |" in section and "helps (interim)" in section
    assert wilcoxon_exact([1.0, -2.0, 3.0, 4.0, 5.0]) == pytest.approx(6 / 32)  # T- = 2: 2 x #{sums <= 2} / 2^5
    assert math.isnan(wilcoxon_exact([0.0, 0.0]))


def admitted(run: dict, revision: str) -> dict:
    return run | {"admission": {"canary": "equal", "machines": ["m"], "training_path": revision}}


def test_admitted_runs_pair_within_one_revision_and_across_a_bit_exact_reproduction() -> None:
    runs = [admitted(r, "rev1" if r["method"] != "imta" else "rev2") for r in decision_runs(range(5, 10), {})]
    runs += [fake_run("sila_imta", s, [56.0, 58.0, 60.0 + s]) | {"fingerprint": {"cpu": "A"}} for s in range(5, 10)]
    grouped = summarise(runs, REGIME1)["families"]["field"]
    pairs = {(e["method"], e["reference"]): e["seeds"] for e in grouped}
    assert pairs[("imta", "baseline_x2_rerun")] == []  # two training-path revisions: never paired
    assert pairs[("sila_imta", "imta")] == []  # legacy against admitted: never paired
    again = json.loads(json.dumps(next(r for r in runs if r["method"] == "imta" and r["seed"] == 5)))
    again["admission"]["training_path"], again["code"], again["train_seconds"] = "rev1", "other", 1.0
    summary = summarise(runs, REGIME1, [again])  # rev2 reproduced a rev1 run bit for bit: one group
    bridged = {(e["method"], e["reference"]): e["seeds"] for e in summary["families"]["field"]}
    assert bridged[("imta", "baseline_x2_rerun")] == [5, 6, 7, 8, 9]
    assert summary["pairing_groups"] == {"admitted:rev1": 15, 'legacy:{"cpu": "A"}': 5}
    mixed = [r | {"admission": {"canary": "mixed"}} if r["method"] == "sila_imta" else r for r in runs]
    assert summarise(mixed, REGIME1)["pairing_groups"]['legacy:{"cpu": "A"}'] == 5  # partly legacy: legacy rule
    again["peers"][0]["test_top1"][0] += 1e-9  # not bit for bit: no bridge
    assert {(e["method"], e["reference"]): e["seeds"] for e in summarise(runs, REGIME1, [again])["families"]["field"]
            }[("imta", "baseline_x2_rerun")] == []  # fmt: skip


def test_machine_ids_tell_two_runs_roots_apart_and_the_revision_follows_dynsila(tmp_path: Path) -> None:
    one, two = admission.machine_id(tmp_path / "a"), admission.machine_id(tmp_path / "b")
    assert one != two and admission.machine_id(tmp_path / "a") == one  # a token per runs root, kept
    (tmp_path / "dynsila").mkdir()
    (tmp_path / "dynsila" / "train.py").write_text("x = 1\n")
    before = admission.training_path_revision(tmp_path)
    (tmp_path / "README.md").write_text("elsewhere")
    assert admission.training_path_revision(tmp_path) == before
    (tmp_path / "dynsila" / "train.py").write_text("x = 2\n")
    assert admission.training_path_revision(tmp_path) != before
    reference = fake_run("baseline", 0, [1.0, 2.0, 3.0]) | {"code": "a", "environment": {"date": "x"}}
    moved = json.loads(json.dumps(reference)) | {"code": "b", "train_seconds": 7.0}
    assert admission.canary_differences(moved, reference) == []
    moved["peers"][0]["val_top1"][1] = 2.5
    assert admission.canary_differences(moved, reference) == ["peers"]


def test_a_machine_that_does_not_reproduce_the_canary_trains_nothing(tmp_path: Path, tiny_config) -> None:
    config = tiny_config("canary", train={"epochs": 1, "log_every": 100})
    plan = tiny_plan(tmp_path, config, {"baseline": ["sila.enabled=false"]})
    results = ["--plan", str(plan), "--results-dir", str(tmp_path / "res")]
    assert anytime.main([*results, "--runs-root", str(tmp_path / "first"), "--make-canary", "--dry-run"]) == 0
    assert not (tmp_path / "canary.json").exists()  # a dry run trains nothing, not even the canary
    exp = anytime.experiment(anytime.parse([*results, "--runs-root", str(tmp_path / "first")]))
    assert anytime.admitted(exp, 1, make_canary=True)
    reference = json.loads((tmp_path / "canary.json").read_text())
    reference["peers"][0]["test_top1"][0] += 0.01  # as if the reference machine had computed another number
    (tmp_path / "canary.json").write_text(json.dumps(reference))
    assert anytime.main([*results, "--runs-root", str(tmp_path / "second")]) == 3  # a new machine: refused
    stored = json.loads((tmp_path / "second" / admission.ADMISSION).read_text())
    assert stored["canary"] == "differs" and stored["differences"] == ["peers"]
    assert not (tmp_path / "res" / "anytime_tiny" / "runs").exists()


def test_an_arm_added_to_the_plan_file_is_planned_and_reported(tmp_path: Path) -> None:
    raw = yaml.safe_load(anytime.DEFAULT_PLAN.read_text())
    raw["arms"]["sila_imta_x3"] = {"about": "a new arm", "overrides": ["sila.enabled=true", "loss.ce_weight=3.0"],
                                   "compare_with": ["imta"]}  # fmt: skip
    raw["seeds"].append({"arms": ["sila_imta_x3"], "seeds": "5-9"})
    raw["families"]["new"] = {"title": "the new arm", "comparisons": [["sila_imta_x3", "imta"]]}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    plan = load_plan(path)
    assert [s.name for s in planned_runs(plan)][-5:] == [f"sila_imta_x3_seed{s}" for s in range(5, 10)]
    runs = decision_runs(range(5, 10), {"sila_imta_x3": 2.0})
    (entry,) = summarise(runs, plan)["families"]["new"]
    assert entry["area"]["mean"] == pytest.approx(1.6, abs=0.01) and entry["verdict"] == "helps"
    assert "## Family `new`: the new arm" in markdown(report_payload(runs, plan))
    raw["families"]["new"]["comparisons"] = [["sila_imta_x4", "imta"]]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="unknown arm"):
        load_plan(path)


def test_the_cuda_profile_runs_the_same_plan_with_the_data_on_the_device(tmp_path: Path, capsys) -> None:
    args = anytime.parse(["--device", "cuda", "--results-dir", str(tmp_path)])
    exp = anytime.experiment(args)
    assert exp.results.name == "anytime_cifar10_dev2_gpu" and exp.needs == ".gpu/cifar10_dev2.npz"
    assert exp.canary_reference is not None and exp.canary_reference.name == "anytime_cifar10_dev2_cuda.json"
    command = anytime.train_command(exp, RunSpec("sila_imta", 5), exp.runs_root)
    assert {"data.on_device=true", "train.device=cuda", "imta.enabled=true", "seed=5"} <= set(command)
    assert anytime.experiment(anytime.parse(["--preset", "gpu"])).device_name == "cuda"  # the former flag
    assert anytime.main(["--device", "cuda", "--dry-run", "--results-dir", str(tmp_path)]) == 0
    planned = len(anytime.planned_runs(exp.plan, None, {}))  # no run files there: no selection made
    assert f"0 of {planned} runs" in capsys.readouterr().out and planned >= 166


def test_regime2_is_fixed_before_its_runs() -> None:
    from dynsila.config import load_config

    cfg = load_config(REPO_ROOT / REGIME2.config)
    assert cfg.data.augment == "crop_flip" and cfg.train.momentum == 0.9 and cfg.train.weight_decay == 1e-4
    assert "set by the pilot" in (REPO_ROOT / REGIME2.config).read_text()
    assert cfg.model == load_config(REPO_ROOT / REGIME1.config).model  # the network of regime 1
    runs = planned_runs(REGIME2)
    arms = ["baseline", "baseline_x2", "self_distill", "sila_mlp", "ge", "imta", "sila_imta", "l2w"]
    assert list(REGIME2.arms) == arms and all(sum(s.method == a for s in runs) >= 5 for a in arms)
    assert REGIME2.arms["sila_mlp"].overrides == REGIME1.arms["sila_mlp"].overrides
    families = REGIME2.families
    assert {a for a, _ in families["vs_loss_scale"].comparisons} == set(arms) - {"baseline", "baseline_x2"}
    assert {a for a, _ in families["vs_baseline"].comparisons} == set(arms) - {"baseline"}
    assert families["sila_imta_vs_imta"].comparisons == (("sila_imta", "imta"),)
    assert all(f.holm_scope == "declared" and f.pairing == "matched" for f in families.values())
    assert "imta_authors" in anytime.PLANS.joinpath("regime2.yaml").read_text()
    fake = [fake_run(a, s, [50.0, 55.0, 60.0 + s]) for s in range(5) for a in arms]
    text = markdown(report_payload(fake, REGIME2) | {"augmentation": "crop_flip"})
    assert "augmentation `crop_flip`" in text and "clean train top-1 99.0 %" in text and "MDE" in text
