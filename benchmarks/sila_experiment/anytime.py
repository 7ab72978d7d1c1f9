"""Does SiLa help? A seed-paired experiment with controls that can fail, resumable across machines.

    python benchmarks/anytime.py --preset cpu --max-minutes 120   # trains what is missing, stops cleanly
    python benchmarks/anytime.py --preset cpu --report-only       # the aggregate from the committed run files
    python benchmarks/anytime.py --preset cpu --dry-run           # the plan: which runs exist, which are missing
    python benchmarks/anytime.py --preset gpu                     # the same grid, concurrent processes on one GPU

Every (method, seed) run trains ``python -m dynsila.train`` in a subprocess and, when it finishes, leaves one
small JSON under ``benchmarks/results/anytime_<dataset>/runs/`` (per-exit accuracy on val, test and the clean
training split, MACs, parameters, the budgeted curve, the last epoch's metrics and monitors, the code version).
Those files are the experiment: the aggregate (``anytime_<dataset>.{json,md,png}``) is recomputed from them
alone, and a re-invocation trains only the runs that have no file yet (an interrupted run resumes from its
``last.pt`` under ``runs/``). Checkpoints are never committed; the run files are.

Methods come in three tiers: tier 1 (five seeds) holds the comparisons the experiment was first sized for —
each SiLa reading against the baseline and against the loss-scale control, and the positive control
(self-distillation) against the baseline; tier 2 (three seeds) the other readings, DML and the half-width pair;
tier 3 (five seeds, a family of its own) the twins that are not forced onto the main head (a whole-classifier
twin, an MLP twin) and the 50 % claim at half the deploy parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as ``python benchmarks/anytime.py``: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.sila_experiment.anytime_report import (
    WITH_SILA,
    best_field_technique,
    markdown,
    plot,
    reproduction_checks,
    summarise,
)
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

SILA = ("sila.enabled=true", "sila.head=linear")
SILA_MLP = ("sila.enabled=true", "sila.head=mlp", "sila.attach=features", "sila.softmax=separate")
# the field's techniques trained in one run, by the overrides that switch each on
TECHNIQUE = {
    "ge": ("ge.enabled=true",),
    "imta": ("imta.enabled=true",),
    "l2w": ("l2w.enabled=true",),
    "ztw_cascade": ("ztw.enabled=true",),
}
# ZTW's second stage: only the ensembles train, from the first stage's weights (a short schedule of ours; the
# paper's is not verified here)
ZTW_ENSEMBLE_STAGE = ("ztw.stage=ensemble", "train.epochs=5", "train.lr=0.01")


@dataclass(frozen=True)
class Method:
    tier: int
    overrides: tuple[str, ...]
    about: str
    width: str = "full"  # a key of Preset.widths: which model overrides shrink the network
    # a second stage: the method whose run of the same seed initialises this one (train.init_from), on this machine
    starts_from: str | None = None


METHODS: dict[str, Method] = {
    "baseline": Method(1, ("sila.enabled=false",), "sum_k CE(z_k, y)"),
    "baseline_x2": Method(
        1,
        ("sila.enabled=false", "loss.ce_weight=2.0"),
        "loss-scale control: the baseline with its cross-entropy x (1 + lambda), lambda = 1",
    ),
    "sila_joint_only": Method(
        1, (*SILA, "sila.attach=features", "sila.softmax=joint_only"), "SiLa, SilaNet v1 reading: one 2C softmax"
    ),
    "sila_features": Method(
        1, (*SILA, "sila.attach=features", "sila.softmax=separate"), "SiLa, twin head on features (our default)"
    ),
    "self_distill": Method(
        1, ("sila.enabled=false", "loss.self_distill=1.0"), "positive control: last exit distils into the others"
    ),
    "sila_logits": Method(2, (*SILA, "sila.attach=logits", "sila.softmax=separate"), "SiLa, twin head on logits"),
    "sila_joint": Method(2, (*SILA, "sila.attach=features", "sila.softmax=joint"), "SiLa, 2C softmax + main CE"),
    "dml": Method(2, ("sila.enabled=false", "dml.peers=2"), "Deep Mutual Learning, 2 peers (peer 0 reported)"),
    "sila_dml": Method(2, (*SILA, "sila.attach=features", "sila.softmax=separate", "dml.peers=2"), "SiLa + DML"),
    "sila_self_distill": Method(
        2, (*SILA, "sila.attach=features", "sila.softmax=separate", "loss.self_distill=1.0"), "SiLa + self-distil"
    ),
    "half_sila": Method(
        2, (*SILA, "sila.attach=features", "sila.softmax=joint_only"), "half width, SiLa joint_only", "half_width"
    ),
    "half_baseline": Method(2, ("sila.enabled=false",), "half width, baseline", "half_width"),
    # tier 3: the readings that can carry a signal the main head does not, and the 50 % claim as the abstract
    # states it (a network with half the deploy parameters; SiLa reading: joint_only, tier 1's largest effect)
    "sila_classifier": Method(
        3,
        ("sila.enabled=true", "sila.head=classifier", "sila.attach=features", "sila.softmax=separate"),
        "SiLa, twin = a fresh copy of the exit's whole classifier (own initialisation)",
    ),
    "sila_mlp": Method(3, SILA_MLP, "SiLa, twin = a one-hidden-layer MLP on the exit's features"),
    "baseline_rerun": Method(3, ("sila.enabled=false",), "the baseline re-run at tier 3's revision and machine"),
    "baseline_x2_rerun": Method(
        3, ("sila.enabled=false", "loss.ce_weight=2.0"), "the loss-scale control re-run at tier 3's revision"
    ),
    "half_params_baseline": Method(3, ("sila.enabled=false",), "half the parameters, baseline", "half_params"),
    "half_params_sila": Method(
        3,
        (*SILA, "sila.attach=features", "sila.softmax=joint_only"),
        "half the parameters, SiLa joint_only",
        "half_params",
    ),
    # tier 4: the field's multi-exit training techniques, on the seeds of the precision extension, so that each is
    # paired on one machine with the baseline and the loss-scale control re-run there (baseline_rerun, _x2_rerun)
    "ge": Method(4, ("sila.enabled=false", *TECHNIQUE["ge"]), "gradient equilibrium (IMTA, Li et al. 2019)"),
    "imta": Method(
        4, ("sila.enabled=false", *TECHNIQUE["imta"]), "IMTA: inline subnetwork collaboration + one-for-all KD"
    ),
    "l2w": Method(4, ("sila.enabled=false", *TECHNIQUE["l2w"]), "L2W-DEN: meta-learned per-sample exit weights"),
    "ztw_cascade": Method(
        4, ("sila.enabled=false", *TECHNIQUE["ztw_cascade"]), "Zero Time Waste, its first stage: cascading connections"
    ),
    "ztw_ensemble": Method(
        4,
        ("sila.enabled=false", "ztw.enabled=true", *ZTW_ENSEMBLE_STAGE),
        "Zero Time Waste, both stages: the geometric ensembles fitted on a ztw_cascade run (frozen)",
        starts_from="ztw_cascade",
    ),
    # tier 5: SiLa (the MLP twin, tier 3's reading with the largest estimate) with the best of the field's techniques
    **{f"sila_{name}": Method(5, (*SILA_MLP, *TECHNIQUE[name]), f"SiLa (MLP twin) + {name}") for name in TECHNIQUE},
    # tier 6: the decision on SiLa + IMTA, fixed before its runs: against the loss-scale control, against IMTA
    # with its cross-entropy doubled (the loss-matched reference: SiLa adds a second CE on the same labels) and
    # against IMTA alone, 10 seeds each
    "imta_x2": Method(
        6,
        ("sila.enabled=false", *TECHNIQUE["imta"], "loss.ce_weight=2.0"),
        "IMTA with its cross-entropy x 2: the loss-scale control of SiLa + IMTA",
    ),
    "sila_ztw_ensemble": Method(
        5,
        (*SILA_MLP, "ztw.enabled=true", *ZTW_ENSEMBLE_STAGE),
        "SiLa (MLP twin) + both stages of Zero Time Waste",
        starts_from="sila_ztw_cascade",
    ),
}


@dataclass(frozen=True)
class SeedExtension:
    """More seeds of a few methods than their tiers give, planned seed-major after the tiers, so each seed's runs
    train side by side on one machine and a partial extension stays paired."""

    methods: tuple[str, ...]
    seeds: range


# the two SiLa readings that can carry a signal, and their references, until the paired intervals reach +-1 point
PRECISION = SeedExtension(("sila_mlp", "sila_joint_only", "baseline_rerun", "baseline_x2_rerun"), range(5, 15))
# the field's techniques, on the first five of those seeds (their references are the precision family's re-runs)
FIELD = SeedExtension(("ge", "imta", "l2w", "ztw_cascade", "ztw_ensemble"), range(5, 10))
# the SiLa + IMTA decision: its loss-matched reference on all ten seeds of the precision family, and SiLa + IMTA
# and IMTA on the five that tiers 4 and 5 did not run
DECISION = SeedExtension(("sila_imta", "imta", "imta_x2"), range(5, 15))


@dataclass(frozen=True)
class Preset:
    dataset: str  # names the results: anytime_<dataset>
    config: str
    needs: str  # the data file or folder, relative to the repository root
    overrides: tuple[str, ...]
    widths: dict[str, tuple[str, ...]]  # width name -> the model overrides that make it ("full": none)
    seeds: dict[int, int] = field(default_factory=lambda: {1: 5, 2: 3, 3: 5})  # tier -> number of seeds (0, 1, ...)
    jobs: int = 2  # concurrent training processes
    threads: int = 1  # CPU threads per process
    device: str = "cpu"
    extensions: tuple[SeedExtension, ...] = ()


QUIET = ("train.eval_test_every_epoch=false", "train.log_every=100000")
CPU_HALF = ("model.n_channels=4", "model.growth_rate=2", "model.head_channels=16")  # 25.6 % of the parameters
CPU_HALF_PARAMS = ("model.n_channels=6", "model.growth_rate=3", "model.head_channels=22")  # 69,009: 51.3 %
CPU_WIDTHS = {"full": (), "half_width": CPU_HALF, "half_params": CPU_HALF_PARAMS}
PRESETS: dict[str, Preset] = {
    "cpu": Preset("cifar10_dev2", "configs/cifar10_dev2/msdnet_anytime.yaml", "../shared/data/cifar10_dev2.npz",
                  QUIET, CPU_WIDTHS, extensions=(PRECISION, FIELD, DECISION)),
    "gpu": Preset("cifar10_dev2_gpu", "configs/cifar10_dev2/msdnet_anytime.yaml", ".gpu/cifar10_dev2.npz",
                  (*QUIET, "data.root=.gpu/cifar10_dev2.npz", "data.on_device=true", "train.device=cuda"),
                  CPU_WIDTHS, jobs=12, threads=1, device="cuda"),
    "paper": Preset("cifar100", "configs/cifar100/msdnet_sila.yaml", "data/cifar-100-python", QUIET,
                    {"full": (), "half_width": ("model.n_channels=8", "model.growth_rate=3")},
                    seeds={1: 5, 2: 3}, jobs=1, threads=8,
                    device="cuda"),
}  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_seed{self.seed}"


def plan(preset: Preset, methods: list[str], best: str | None = None) -> list[RunSpec]:
    """Every run of the grid, seed-major within a tier, so partial results stay paired and balanced; with
    ``best`` (the field technique chosen by ``best_field_technique``) also SiLa + it on the field's seeds."""
    specs = []
    for tier in sorted(preset.seeds):
        tier_methods = [m for m in methods if METHODS[m].tier == tier and METHODS[m].width in preset.widths]
        specs += [RunSpec(m, s) for s in range(preset.seeds[tier]) for m in tier_methods]
    seeds = sorted({seed for extension in preset.extensions for seed in extension.seeds})
    for seed in seeds:  # seed-major across the extensions: each seed's runs of every family side by side
        for extension in preset.extensions:
            wanted = [m for m in extension.methods if m in methods and seed in extension.seeds]
            specs += [RunSpec(m, seed) for m in wanted if RunSpec(m, seed) not in specs]
    if best is not None and FIELD in preset.extensions:
        combined = [m for m in (METHODS[WITH_SILA[best]].starts_from, WITH_SILA[best]) if m and m in methods]
        specs += [RunSpec(m, seed) for seed in FIELD.seeds for m in combined]
    return list(dict.fromkeys(specs))  # a run two extensions plan trains once


def run_file(results: Path, spec: RunSpec) -> Path:
    return results / "runs" / f"{spec.name}.json"


def source_of(spec: RunSpec) -> RunSpec | None:
    """The run a second stage starts from: its source method's run of the same seed."""
    source = METHODS[spec.method].starts_from
    return None if source is None else RunSpec(source, spec.seed)


def shown_path(path: Path) -> str:
    """A path as the recorded command shows it: relative to the repository where it lies inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def run_overrides(preset: Preset, spec: RunSpec, runs_root: Path | None = None) -> list[str]:
    """The config overrides that make this run: the preset's, the method's, the seed, and for a second stage the
    run it starts from (under ``runs_root``, default the preset's)."""
    method = METHODS[spec.method]
    source = source_of(spec)
    runs_root = runs_root or default_runs_root(preset)
    return [
        *preset.overrides,
        *method.overrides,
        *preset.widths[method.width],
        f"seed={spec.seed}",
        *([f"train.init_from={shown_path(runs_root / source.name)}"] if source else []),
    ]


def default_runs_root(preset: Preset) -> Path:
    return REPO_ROOT / "runs" / f"anytime_{preset.dataset}"


def train_command(preset: Preset, spec: RunSpec, runs_root: Path) -> list[str]:
    run_dir = runs_root / spec.name
    overrides = [*run_overrides(preset, spec, runs_root), f"out_dir={runs_root}", f"name={spec.name}"]
    resume = (run_dir / LAST).exists() and not (run_dir / EVAL_FILE).exists()
    return [sys.executable, "-m", "dynsila.train", preset.config, *overrides, "resume=true" if resume else "--force"]


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


def record_run(preset_name: str, spec: RunSpec, run_dir: Path, device: str) -> dict[str, Any]:
    """The small per-run file: everything the aggregate needs, nothing large (no logits, no weights)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = {k: v for k, v in rows[-1].items() if k not in ("peers", "networks")}
    return {
        "method": spec.method,
        "seed": spec.seed,
        "tier": METHODS[spec.method].tier,
        "preset": preset_name,
        "train": f"python -m dynsila.train {PRESETS[preset_name].config} "
        + " ".join(run_overrides(PRESETS[preset_name], spec, run_dir.parent)),
        "code": code_version(),
        "environment": environment(device),
        "fingerprint": run_fingerprint(run_dir),
        "epochs": len(rows),
        "train_seconds": sum(r["seconds"] for r in rows),
        "last_epoch": last,
        "peers": [peer_record(d, device) for d in deploy_dirs(run_dir)],
    }


MACHINES = "machines.jsonl"  # in a run's folder: the fingerprint of every machine that trained part of it


def note_machine(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / MACHINES).open("a") as log:
        log.write(json.dumps(machine_fingerprint(), sort_keys=True) + "\n")


def run_fingerprint(run_dir: Path) -> dict[str, Any] | None:
    """The machine a run trained on; None when its epochs were split over machines that differ (a resume
    elsewhere), so the report never pairs it."""
    path = run_dir / MACHINES
    seen = {line for line in path.read_text().splitlines() if line.strip()} if path.exists() else set()
    seen.add(json.dumps(machine_fingerprint(), sort_keys=True))
    return json.loads(seen.pop()) if len(seen) == 1 else None


# --- running the grid ---------------------------------------------------------------------------------------


@dataclass
class Job:
    spec: RunSpec
    process: subprocess.Popen[bytes]
    started: float


def launch(preset: Preset, spec: RunSpec, runs_root: Path, threads: int) -> Job:
    runs_root.mkdir(parents=True, exist_ok=True)
    note_machine(runs_root / spec.name)
    source = source_of(spec)
    if source is not None:  # a second stage trained where its source trained, or it records no fingerprint
        inherited = (runs_root / source.name / MACHINES).read_text()
        with (runs_root / spec.name / MACHINES).open("a") as log:
            log.write(inherited)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with (runs_root / f"{spec.name}.log").open("ab") as log:
        process = subprocess.Popen(
            train_command(preset, spec, runs_root), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return Job(spec, process, time.monotonic())


def finish(job: Job, preset_name: str, runs_root: Path, results: Path, device: str) -> None:
    """Write the run's file when its training succeeded; otherwise name the log to read."""
    log = runs_root / f"{job.spec.name}.log"
    if job.process.returncode != 0:
        print(f"{job.spec.name}: training failed (exit {job.process.returncode}); see {log}", flush=True)
        return
    record = record_run(preset_name, job.spec, runs_root / job.spec.name, device)
    atomic_write_text(run_file(results, job.spec), json.dumps(record, indent=1))
    minutes = (time.monotonic() - job.started) / 60
    print(f"{job.spec.name}: done in {minutes:.1f} min ({record['train_seconds'] / 60:.1f} min training)", flush=True)


def run_grid(preset_name: str, pending: list[RunSpec], args: argparse.Namespace, results: Path) -> None:
    """Train ``pending`` with up to ``args.jobs`` processes; at ``--max-minutes`` start nothing new and stop the
    running ones (SIGTERM: each keeps its last epoch's ``last.pt`` and resumes from it next time)."""
    preset = PRESETS[preset_name]
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else float("inf")
    queue, running = list(pending), list[Job]()
    while queue or running:
        queue = [s for s in queue if startable(s, queue, running, args.runs_root) is not False]
        while len(running) < args.jobs and time.monotonic() < deadline:
            ready = next((s for s in queue if startable(s, queue, running, args.runs_root)), None)
            if ready is None:
                break
            queue.remove(ready)
            running.append(launch(preset, ready, args.runs_root, args.threads))
        for job in [j for j in running if j.process.poll() is not None]:
            running.remove(job)
            finish(job, preset_name, args.runs_root, results, preset.device)
        if time.monotonic() >= deadline:
            stop(running)
            print(f"--max-minutes {args.max_minutes} reached: {len(queue) + len(running)} run(s) left for next time")
            return
        time.sleep(2)


def startable(spec: RunSpec, queue: list[RunSpec], running: list[Job], runs_root: Path) -> bool | None:
    """True: ``spec`` can start now. None: it waits for its source, which is queued or training. False: it never
    can here (its source finished elsewhere: the checkpoint it starts from is not on this machine)."""
    source = source_of(spec)
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


# --- the command line ---------------------------------------------------------------------------------------


def load_runs(results: Path, folder: str = "runs") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((results / folder).glob("*.json"))]


def report(preset_name: str, planned: list[RunSpec], results: Path, command: str) -> str:
    """Recompute the aggregate from the run files alone; write JSON, Markdown and the plot."""
    runs = load_runs(results)
    if not any(r["method"] == "baseline" for r in runs):
        return "no finished baseline run yet: nothing to compare"
    summary = summarise(runs, METHODS)
    preset = PRESETS[preset_name]
    payload = {
        "command": command,
        "preset": preset_name,
        "config": preset.config,
        "overrides": list(preset.overrides),
        "planned_runs": len(planned),
        "finished_runs": len(runs),
        "methods": {name: {"tier": m.tier, "about": m.about, "overrides": list(m.overrides)} for name, m in
                    METHODS.items()},
        "summary": summary,
        "reproductions": reproduction_checks(load_runs(results, "reproductions"), runs),
    }  # fmt: skip
    text = markdown(payload)
    stem = results.name
    out = write_results(stem, payload, text, results.parent)
    plot(payload, out.with_suffix(".png"))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python benchmarks/anytime.py", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--max-minutes", type=positive, help="start nothing new after this; stop running jobs")
    parser.add_argument("--report-only", action="store_true", help="aggregate the existing run files; no training")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--jobs", type=at_least_one, help="concurrent training processes (default: the preset's)")
    parser.add_argument("--threads", type=at_least_one, help="CPU threads per process (default: the preset's)")
    parser.add_argument("--runs-root", type=Path, help="checkpoints go here (default runs/anytime_<dataset>)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.jobs, args.threads = args.jobs or preset.jobs, args.threads or preset.threads
    args.runs_root = args.runs_root or default_runs_root(preset)
    results = args.results_dir / f"anytime_{preset.dataset}"
    best, why = best_field_technique(load_runs(results)) if (results / "runs").is_dir() else (None, "no runs yet")
    planned = plan(preset, ["baseline", *[m for m in args.methods if m != "baseline"]], best)
    pending = [s for s in planned if not run_file(results, s).exists()]
    print(f"preset {args.preset}: {len(planned) - len(pending)} of {len(planned)} runs have files in {results}/runs")
    if args.dry_run:
        print("missing: " + (" ".join(s.name for s in pending) or "none"))
        print(f"SiLa + the best field technique: {why}")
        return 0
    if pending and not args.report_only:
        if not (REPO_ROOT / preset.needs).exists():
            print(f"error: --preset {args.preset} needs {preset.needs} (see ../shared/data/README.md); "
                  "--report-only aggregates the committed run files without it", file=sys.stderr)  # fmt: skip
            return 2
        run_grid(args.preset, pending, args, results)
    print(report(args.preset, planned, results, command_line(__file__, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
