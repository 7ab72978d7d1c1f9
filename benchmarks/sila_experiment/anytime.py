"""Trains and reports any plan of the anytime experiment (``benchmarks/plans/*.yaml``), resumable across machines.

    python benchmarks/anytime.py --plan benchmarks/plans/regime1.yaml --max-minutes 120  # trains what is missing
    python benchmarks/anytime.py --plan benchmarks/plans/regime1.yaml --report-only      # from the run files alone
    python benchmarks/anytime.py --plan benchmarks/plans/regime1.yaml --dry-run          # which runs are missing
    python benchmarks/anytime.py --plan benchmarks/plans/regime1.yaml --device cuda      # the plan's CUDA profile

Every (arm, seed) run trains ``python -m dynsila.train`` in a subprocess and, when it finishes, leaves one small
JSON under ``benchmarks/results/<plan name>/runs/`` (per-exit accuracy on val, test and the clean training split,
MACs, parameters, the budgeted curve, the last epoch's metrics and monitors, the code version, the admission).
Those files are the experiment: the aggregate (``<plan name>.{json,md,png}``) is recomputed from them alone, and a
re-invocation trains only the runs that have no file yet (an interrupted run resumes from its ``last.pt`` under
the runs root). Before it trains a plan's run, a machine must reproduce the plan's canary (``admission.py``).
Checkpoints are never committed; the run files are.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python benchmarks/sila_experiment/anytime.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.sila_experiment import admission
from benchmarks.sila_experiment.anytime_figures import plot
from benchmarks.sila_experiment.anytime_markdown import markdown
from benchmarks.sila_experiment.anytime_report import reproduction_checks as reproduction_checks
from benchmarks.sila_experiment.anytime_report import summarise
from benchmarks.sila_experiment.plan import Device, Plan, RunSpec, load_plan, planned_runs, run_overrides
from benchmarks.toolkit import (
    REPO_ROOT,
    RESULTS_DIR,
    budget_points,
    command_line,
    environment,
    machine_fingerprint,
    write_results,
)
from dynsila.cli import OneLineParser, at_least_one, positive
from dynsila.evaluation.evaluate import EVAL_FILE, collect_logits, topk_accuracy
from dynsila.evaluation.report import EvalReport
from dynsila.runs.checkpoint import atomic_write_text
from dynsila.runs.rundir import DEPLOY, LAST, load_deploy_model

PLANS = REPO_ROOT / "benchmarks" / "plans"
DEFAULT_PLAN = PLANS / "regime1.yaml"
PRESETS = {"cpu": "cpu", "gpu": "cuda"}  # the former --preset names: the regime-1 plan on that device profile


@dataclass(frozen=True)
class Experiment:
    """A plan on one device profile: where its run files, checkpoints and canary go."""

    plan: Plan
    device_name: str
    results: Path  # benchmarks/results/<name>: runs/ and reproductions/ below it
    runs_root: Path  # checkpoints

    @property
    def device(self) -> Device:
        return self.plan.devices[self.device_name]

    @property
    def needs(self) -> str:
        return self.device.needs or self.plan.needs

    @property
    def canary_reference(self) -> Path | None:
        if self.plan.canary is None:
            return None
        reference = REPO_ROOT / self.plan.canary.reference
        return reference if self.device_name == "cpu" else reference.with_stem(f"{reference.stem}_{self.device_name}")


def run_file(results: Path, spec: RunSpec) -> Path:
    return results / "runs" / f"{spec.name}.json"


def source_of(plan: Plan, spec: RunSpec) -> RunSpec | None:
    """The run a second stage starts from: its source arm's run of the same seed."""
    source = plan.arms[spec.method].starts_from
    return None if source is None else RunSpec(source, spec.seed)


def shown_path(path: Path) -> str:
    """A path as the recorded command shows it: relative to the repository where it lies inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def overrides_of(exp: Experiment, spec: RunSpec, runs_root: Path, canary: bool = False) -> list[str]:
    extra = list(exp.plan.canary.overrides) if canary and exp.plan.canary else []
    return [*run_overrides(exp.plan, exp.device, spec, runs_root, shown_path), *extra]


def train_command(exp: Experiment, spec: RunSpec, runs_root: Path, canary: bool = False) -> list[str]:
    run_dir = runs_root / spec.name
    overrides = [*overrides_of(exp, spec, runs_root, canary), f"out_dir={runs_root}", f"name={spec.name}"]
    resume = not canary and (run_dir / LAST).exists() and not (run_dir / EVAL_FILE).exists()
    return [sys.executable, "-m", "dynsila.train", exp.plan.config, *overrides, "resume=true" if resume else "--force"]


def clean_train_accuracy(deploy_dir: Path, device: str) -> list[float]:
    """Top-1 per exit on the training images without augmentation (for the generalisation gap)."""
    from dynsila.data import ArrayDataset, build_splits, make_loader

    model, cfg = load_deploy_model(deploy_dir)
    splits = build_splits(cfg.data)
    images, labels = getattr(splits.train, "images", None), getattr(splits.train, "labels", None)
    if images is None or labels is None:
        raise RuntimeError("the generalisation gap needs an in-memory dataset (digits, cifar, npz)")
    loader = make_loader(ArrayDataset(images, labels), 512, False)
    return topk_accuracy(*collect_logits(model.to(device), loader, splits.mean, splits.std, device)).tolist()


def deploy_dirs(run_dir: Path) -> list[Path]:
    """Where a run's deploy models are: the run itself, or peer0, peer1, ... for DML."""
    return [run_dir] if (run_dir / DEPLOY).exists() else sorted(run_dir.glob("peer*"))


def peer_record(deploy_dir: Path, device: str) -> dict[str, Any]:
    report = EvalReport.from_json((deploy_dir / EVAL_FILE).read_text())
    exits = report.exits
    return {
        "exit_macs": [e.macs_cumulative for e in exits],
        "params_cumulative": [e.params_cumulative for e in exits],
        "val_top1": [e.val_top1 for e in exits],
        "test_top1": [e.test_top1 for e in exits],
        "train_top1_clean": clean_train_accuracy(deploy_dir, device),
        "budgeted": [{k: p[k] for k in ("q", "avg_macs", "test_top1")} for p in budget_points(report)],
        "splits": report.splits,
    }


def code_version() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--", "dynsila") else "")


def record_run(exp: Experiment, spec: RunSpec, run_dir: Path, canary: bool = False) -> dict[str, Any]:
    """The small per-run file: everything the aggregate needs, nothing large (no logits, no weights)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {k: v for k, v in rows[-1].items() if k not in ("peers", "networks")}
    overrides = overrides_of(exp, spec, run_dir.parent, canary)
    record = {
        "method": spec.method,
        "seed": spec.seed,
        "tier": exp.plan.arms[spec.method].group,
        "preset": exp.device_name,
        "train": " ".join(["python -m dynsila.train", exp.plan.config, *overrides]),
        "code": code_version(),
        "environment": environment(exp.device.device),
        "fingerprint": run_fingerprint(run_dir),
        "epochs": len(rows),
        "train_seconds": sum(r["seconds"] for r in rows),
        "last_epoch": last,
        "peers": [peer_record(d, exp.device.device) for d in deploy_dirs(run_dir)],
    }
    if not canary:
        record["admission"] = run_admission(run_dir)
    return record


MACHINES = "machines.jsonl"  # in a run's folder: every machine that trained part of it, with its admission


def machine_line(runs_root: Path) -> dict[str, Any]:
    admitted = admission.current_admission(runs_root, admission.training_path_revision()) or {}
    return {"fingerprint": machine_fingerprint(), "machine": admitted.get("machine"),
            "training_path": admitted.get("training_path"), "canary": admitted.get("canary")}  # fmt: skip


def note_machine(run_dir: Path, runs_root: Path | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / MACHINES).open("a") as log:
        log.write(json.dumps(machine_line(runs_root or run_dir.parent), sort_keys=True) + "\n")


def machine_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / MACHINES
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    """The machine fingerprint a run trained on; None when its epochs were split over machines that differ (a
    resume elsewhere, or lines of the former format beside the current one), so the report never pairs it."""
    seen = {json.dumps(line.get("fingerprint", line), sort_keys=True) for line in machine_lines(run_dir)}
    seen.add(json.dumps(machine_fingerprint(), sort_keys=True))
    return json.loads(seen.pop()) if len(seen) == 1 else None


def run_admission(run_dir: Path) -> dict[str, Any]:
    """The admission a run file records: every machine that trained part of it, and whether each had reproduced
    the canary at one revision of the training path (``canary: equal``), else ``canary: mixed``."""
    lines = machine_lines(run_dir)
    revisions = {line.get("training_path") for line in lines}
    equal = bool(lines) and all(line.get("canary") == "equal" for line in lines) and len(revisions) == 1
    return {
        "canary": "equal" if equal else "mixed",
        "machines": sorted({str(line.get("machine")) for line in lines}),
        "training_path": revisions.pop() if len(revisions) == 1 else None,
    }


# --- running the grid ---------------------------------------------------------------------------------------


@dataclass
class Job:
    spec: RunSpec
    process: subprocess.Popen[bytes]
    started: float


def launch(exp: Experiment, spec: RunSpec, runs_root: Path, threads: int, canary: bool = False) -> Job:
    runs_root.mkdir(parents=True, exist_ok=True)
    note_machine(runs_root / spec.name, exp.runs_root)
    source = source_of(exp.plan, spec)
    if source is not None:  # a second stage trained where its source trained, or it records no fingerprint
        inherited = (runs_root / source.name / MACHINES).read_text()
        with (runs_root / spec.name / MACHINES).open("a") as log:
            log.write(inherited)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (runs_root / f"{spec.name}.log").open("ab") as log:
        command = train_command(exp, spec, runs_root, canary)
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Job(spec, process, time.monotonic())


def finish(job: Job, exp: Experiment) -> None:
    """Write the run's file when its training succeeded; otherwise name the log to read."""
    log = exp.runs_root / f"{job.spec.name}.log"
    if job.process.returncode != 0:
        print(f"{job.spec.name}: training failed (exit {job.process.returncode}); see {log}", flush=True)
        return
    record = record_run(exp, job.spec, exp.runs_root / job.spec.name)
    atomic_write_text(run_file(exp.results, job.spec), json.dumps(record, indent=1))
    minutes = (time.monotonic() - job.started) / 60
    print(f"{job.spec.name}: done in {minutes:.1f} min ({record['train_seconds'] / 60:.1f} min training)", flush=True)


def run_grid(exp: Experiment, pending: list[RunSpec], args: argparse.Namespace) -> None:
    """Train ``pending`` with up to ``args.jobs`` processes; at ``--max-minutes`` start nothing new and stop the
    running ones (SIGTERM: each keeps its last epoch's ``last.pt`` and resumes from it next time)."""
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else float("inf")
    queue, running = list(pending), list[Job]()
    while queue or running:
        queue = [s for s in queue if startable(exp.plan, s, queue, running, exp.runs_root) is not False]
        while len(running) < args.jobs and time.monotonic() < deadline:
            ready = next((s for s in queue if startable(exp.plan, s, queue, running, exp.runs_root)), None)
            if ready is None:
                break
            queue.remove(ready)
            running.append(launch(exp, ready, exp.runs_root, args.threads))
        for job in [j for j in running if j.process.poll() is not None]:
            running.remove(job)
            finish(job, exp)
        if time.monotonic() >= deadline:
            stop(running)
            print(f"--max-minutes {args.max_minutes} reached: {len(queue) + len(running)} run(s) left for next time")
            return
        time.sleep(2)


def startable(plan: Plan, spec: RunSpec, queue: list[RunSpec], running: list[Job], runs_root: Path) -> bool | None:
    """True: ``spec`` can start now. None: it waits for its source, which is queued or training. False: it never
    can here (its source finished elsewhere: the checkpoint it starts from is not on this machine)."""
    source = source_of(plan, spec)
    if source is None or (runs_root / source.name / EVAL_FILE).exists():
        return True
    if source in queue or any(job.spec == source for job in running):
        return None
    print(f"{spec.name}: skipped; it starts from {runs_root / source.name}, which has no finished checkpoint here "
          f"(train {source.name} here first, or, if its run file came from another machine, delete that file to "
          "train both here)", flush=True)  # fmt: skip
    return False


def stop(running: list[Job]) -> None:
    for job in running:
        job.process.send_signal(signal.SIGTERM)
    for job in running:
        try:
            job.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            job.process.kill()


# --- admission ----------------------------------------------------------------------------------------------


def train_canary(exp: Experiment, threads: int) -> dict[str, Any] | None:
    """Train the plan's canary from scratch under ``<runs root>/canary``; its run record, or None on failure."""
    assert exp.plan.canary is not None
    spec, root = RunSpec(exp.plan.canary.arm, exp.plan.canary.seed), exp.runs_root / "canary"
    print(f"canary: training {spec.name} with {' '.join(exp.plan.canary.overrides)}", flush=True)
    job = launch(exp, spec, root, threads, canary=True)
    if job.process.wait() != 0:
        print(f"canary: training failed; see {root / f'{spec.name}.log'}", flush=True)
        return None
    return record_run(exp, spec, root / spec.name, canary=True)


def admitted(exp: Experiment, threads: int, make_canary: bool) -> bool:
    """Whether this machine may train the plan's runs: its stored admission at this training-path revision, or a
    canary trained now that reproduces the committed reference. ``make_canary`` writes the reference instead
    (the first machine of a plan) and admits this machine."""
    reference = exp.canary_reference
    if reference is None:
        print("the plan names no canary: every run is trained unadmitted (its report pairs it as legacy)")
        return True
    if not make_canary and admission.current_admission(exp.runs_root, admission.training_path_revision()):
        return True
    if not make_canary and not reference.exists():
        print(f"error: no committed canary {shown_path(reference)}; on the machine whose numbers are to be the "
              "reference, run again with --make-canary and commit that file", file=sys.stderr)  # fmt: skip
        return False
    if make_canary and reference.exists():
        print(f"error: {shown_path(reference)} exists; delete it first to make a new reference", file=sys.stderr)
        return False
    record = train_canary(exp, threads)
    if record is None:
        return False
    if make_canary:
        reference.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(reference, json.dumps(record, indent=1))
    outcome = admission.admit(exp.runs_root, record, json.loads(reference.read_text()), shown_path(reference))
    if outcome["canary"] != "equal":
        print(f"error: this machine did not reproduce the canary ({', '.join(outcome['differences'])} differ): it "
              "trains none of this plan's runs", file=sys.stderr)  # fmt: skip
        return False
    print(f"canary reproduced bit for bit: machine {outcome['machine']} admitted at {outcome['training_path']}")
    return True


# --- the command line ---------------------------------------------------------------------------------------


def load_runs(results: Path, folder: str = "runs") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((results / folder).glob("*.json"))]


def augmentation(plan: Plan) -> str:
    from dynsila.config import load_config

    return str(load_config(REPO_ROOT / plan.config, list(plan.overrides)).data.augment)


def report(exp: Experiment, planned: list[RunSpec], command: str) -> str:
    """Recompute the aggregate from the run files alone; write JSON, Markdown and the figures."""
    runs = [r for r in load_runs(exp.results) if r["method"] in exp.plan.arms]
    if not runs:
        return "no finished run yet: nothing to compare"
    reproductions = load_runs(exp.results, "reproductions")
    plan = exp.plan
    seeds: dict[str, set[int]] = {}
    for spec in planned:
        seeds.setdefault(spec.method, set()).add(spec.seed)
    payload = {
        "command": command, "plan": shown_path(Path(plan.path).resolve()), "name": exp.results.name,
        "title": plan.title, "preset": exp.device_name, "config": plan.config, "overrides": list(plan.overrides),
        "augmentation": augmentation(plan), "notes": list(plan.notes),
        "planned_runs": len(planned), "finished_runs": len(runs),
        "methods": {n: {"group": a.group, "about": a.about, "overrides": list(a.overrides)}
                    for n, a in plan.arms.items()},
        "families": {n: {"title": f.title, "pairing": f.pairing, "holm_scope": f.holm_scope, "target": f.target,
                         "comparisons": [list(c) for c in f.comparisons],
                         "planned_pairs": {f"{a} vs {b}": len(seeds.get(a, set()) & seeds.get(b, set()))
                                           for a, b in f.comparisons}} for n, f in plan.families.items()},
        "summary": summarise(runs, plan, reproductions),
        "reproductions": reproduction_checks(reproductions, runs),
    }  # fmt: skip
    text = markdown(payload)
    out = write_results(exp.results.name, payload, text, exp.results.parent)
    plot(payload, out, plan.design.get("regime_arm", "baseline"))
    return text


def experiment(args: argparse.Namespace) -> Experiment:
    plan = load_plan(args.plan or DEFAULT_PLAN)
    device = args.device or (PRESETS[args.preset] if args.preset else "cpu")
    if device not in plan.devices:
        raise SystemExit(f"error: {plan.path} has no device profile {device!r} (it has {', '.join(plan.devices)})")
    name = plan.devices[device].results or plan.name
    return Experiment(plan, device, args.results_dir / name, args.runs_root or REPO_ROOT / "runs" / name)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python benchmarks/anytime.py", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, help=f"the plan file (default {shown_path(DEFAULT_PLAN)})")
    parser.add_argument("--device", help="the plan's device profile (default cpu)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="former name: cpu / gpu = --device cpu / cuda")
    parser.add_argument("--arms", "--methods", nargs="+", help="train only these arms (default: all)")
    parser.add_argument("--max-minutes", type=positive, help="start nothing new after this; stop running jobs")
    parser.add_argument("--report-only", action="store_true", help="aggregate the existing run files; no training")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--make-canary", action="store_true", help="train the canary and commit it as reference")
    parser.add_argument("--jobs", type=at_least_one, help="concurrent training processes (default: the profile's)")
    parser.add_argument("--threads", type=at_least_one, help="CPU threads per process (default: the profile's)")
    parser.add_argument("--runs-root", type=Path, help="checkpoints go here (default runs/<plan name>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    exp = experiment(args)
    args.jobs, args.threads = args.jobs or exp.device.jobs, args.threads or exp.device.threads
    unknown = sorted(set(args.arms or ()) - set(exp.plan.arms))
    if unknown:
        print(f"error: {exp.plan.path} has no arm {', '.join(unknown)}", file=sys.stderr)
        return 2
    runs = [r for r in load_runs(exp.results) if r["method"] in exp.plan.arms]
    selections = summarise(runs, exp.plan, load_runs(exp.results, "reproductions"))["selections"] if runs else {}
    choices = {name: s["choice"] for name, s in selections.items() if s["choice"]}
    planned = planned_runs(exp.plan, args.arms, choices)
    pending = [s for s in planned if not run_file(exp.results, s).exists()]
    print(f"plan {exp.plan.name} ({exp.device_name}): {len(planned) - len(pending)} of {len(planned)} runs have "
          f"files in {exp.results}/runs")  # fmt: skip
    if args.dry_run:
        print("missing: " + (" ".join(s.name for s in pending) or "none"))
        for name, s in selections.items():
            print(f"selection {name}: {s['why']}")
        return 0
    if (pending or args.make_canary) and not args.report_only:
        if not (REPO_ROOT / exp.needs).exists():
            print(f"error: the plan needs {exp.needs} (see ../shared/data/README.md); --report-only aggregates the "
                  "committed run files without it", file=sys.stderr)  # fmt: skip
            return 2
        if not admitted(exp, args.threads, args.make_canary):
            return 3
        run_grid(exp, pending, args)
    print(report(exp, planned, command_line(__file__, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
