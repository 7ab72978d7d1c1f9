"""Injected faults: SIGKILL at seeded moments (inside checkpoint, deploy-weight and eval.json writes too), a full
disk or an I/O error at each write in turn, and two processes on one run name.

Every trial starts from scratch on a tiny digits run (3 epochs) and is compared with one uninterrupted reference
run: after a kill, the files left are whole (the one being written is its previous version, byte for byte), and
``resume=true`` finishes with exactly the reference's metrics, eval.json and weights. A refused write prints one
line and leaves the previous file. ``DYNSILA_FAULT_TRIALS`` sets the number of kill trials and of write-failure
trials (default 2 each, always run); the long sweep reported in the README used 40.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dynsila.config import load_config
from dynsila.runs import checkpoint as ckpt
from dynsila.runs.checkpoint import load_checkpoint, read_deploy
from dynsila.train import main as train_main
from dynsila.training.train import train
from tests.conftest import TINY_MSDNET

TRIALS = int(os.environ.get("DYNSILA_FAULT_TRIALS", "2"))
SEED = 20261204
PHASES = ("mid-write", "before-rename", "after-rename")
REPO = Path(__file__).resolve().parents[1]

# The child: train, killing itself with SIGKILL at write number FAULT_WRITE in phase FAULT_PHASE (none: no fault).
# Before each write it appends "index name sha256-of-the-current-file" to FAULT_LOG, and "start" when training starts.
CHILD = """
import hashlib, io, os, signal, sys
from pathlib import Path
from dynsila.runs import checkpoint as ckpt
from dynsila.train import main

import torch

torch.set_num_threads(1)  # as the parent: the same arithmetic, so a resumed run can match the reference exactly
target, phase, log = int(os.environ["FAULT_WRITE"]), os.environ["FAULT_PHASE"], os.environ["FAULT_LOG"]
real_write, real_replace, count = ckpt.atomic_write, os.replace, 0

def note(line):
    with open(log, "a") as f:
        f.write(line + "\\n")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def half_then_die(write):
    def partial(f):
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        die()
    return partial

def atomic_write(path, write):
    global count
    count += 1
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "-"
    note(f"{count} {path.name} {digest}")
    if count != target:
        return real_write(path, write)
    if phase == "mid-write":
        return real_write(path, half_then_die(write))
    if phase == "before-rename":
        os.replace = lambda a, b: die()
        return real_write(path, write)
    real_write(path, write)
    die()

ckpt.atomic_write = atomic_write
note("start")
sys.exit(main(sys.argv[1:]))
"""


def write_config(folder: Path) -> Path:
    raw = {
        "name": "run",
        "out_dir": str(folder / "runs"),
        "model": dict(TINY_MSDNET),
        "data": {"name": "digits", "image_size": 8, "val_size": 0.2, "batch_size": 128},
        "train": {"epochs": 3, "lr": 0.05, "log_every": 5},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Outcome:
    """What a finished run leaves, in the terms an interrupted-then-resumed run must match exactly."""

    metrics: list[dict[str, Any]]
    evaluation: dict[str, Any]
    weights: dict[str, torch.Tensor]
    writes: list[str] = field(default_factory=list)  # the file of each atomic write, in order
    seconds: float = 0.0

    @classmethod
    def of(cls, run_dir: Path) -> Outcome:
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evaluation = json.loads((run_dir / "eval.json").read_text())
        evaluation.pop("run_dir")
        return cls(
            [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in rows],
            evaluation,
            load_checkpoint(run_dir / "last.pt")["model"],
        )

    def assert_equal(self, other: Outcome) -> None:
        assert other.metrics == self.metrics
        assert other.evaluation == self.evaluation
        assert other.weights.keys() == self.weights.keys()
        assert all(torch.equal(other.weights[k], self.weights[k]) for k in self.weights)


@contextlib.contextmanager
def one_thread():
    """One torch thread, in the tests and in their children: the same floating-point sums everywhere, and no
    oversubscribed cores (a loaded 2-core machine ran this run 18x slower on 2 threads than on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Outcome:
    """The uninterrupted run, in-process, with its sequence of atomic writes recorded."""
    folder = tmp_path_factory.mktemp("reference")
    writes: list[str] = []
    real = ckpt.atomic_write

    def recording(path, write):
        writes.append(Path(path).name)
        return real(path, write)

    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setattr(ckpt, "atomic_write", recording)
        train(load_config(write_config(folder)))
    outcome = Outcome.of(folder / "runs" / "run")
    outcome.writes, outcome.seconds = writes, time.perf_counter() - start
    return outcome


def whole_files(run_dir: Path) -> list[str]:
    """Load every file a run writes that is there; the names (a damaged file raises). No temporary files."""
    loaders = {
        "last.pt": load_checkpoint,
        "best.pt": load_checkpoint,
        "deploy.safetensors": read_deploy,
        "metrics.jsonl": lambda p: [json.loads(x) for x in p.read_text().splitlines()],
        "eval.json": lambda p: json.loads(p.read_text()),
        "config.yaml": lambda p: load_config(p),
    }
    present = sorted(p.name for p in run_dir.iterdir() if p.name in loaders)
    for name in present:
        loaders[name](run_dir / name)
    return present


def run_child(config: Path, log: Path, write: int = 0, phase: str = "none") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_WRITE": str(write), "FAULT_PHASE": phase, "FAULT_LOG": str(log)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def log_lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def kill_moments(reference: Outcome, trials: int) -> list[tuple[str, int, str, float]]:
    """``trials`` seeded moments, alternating: (``write``, index, phase, 0) inside a write, the writes taken in
    round-robin over the files (checkpoints, deploy weights, eval.json, ...) with a seeded phase; and
    (``time``, 0, "", seconds after training started), uniform over the reference run's duration."""
    rng = np.random.default_rng(SEED)
    by_file: dict[str, list[int]] = {}
    for i, name in enumerate(reference.writes, 1):
        by_file.setdefault(name, []).append(i)
    for indices in by_file.values():
        rng.shuffle(indices)
    order = ("last.pt", "deploy.safetensors", "eval.json", "best.pt", "metrics.jsonl", "config.yaml")
    targeted = []
    while any(by_file.values()):
        for name in order:
            if by_file.get(name):
                targeted.append((by_file[name].pop(), str(rng.choice(PHASES))))
    moments = []
    for t in range(trials):
        if t % 2 == 0 and targeted:
            index, phase = targeted[(t // 2) % len(targeted)]
            moments.append(("write", index, phase, 0.0))
        else:
            moments.append(("time", 0, "", float(rng.uniform(0.0, reference.seconds))))
    return moments


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_at_a_seeded_moment_then_resume_matches_the_uninterrupted_run(trial, reference, tmp_path):
    kind, index, phase, delay = kill_moments(reference, TRIALS)[trial]
    print(f"trial {trial}: ", end="")
    kill_then_resume(reference, tmp_path, kind, index, phase, delay)


def test_sigkill_between_the_two_checkpoints_of_the_last_epoch_then_resume_matches(reference, tmp_path):
    """The moment that once broke exact resume: last.pt written, best.pt not yet, in an epoch that improved, so
    last.pt named a best epoch whose weights best.pt did not hold and the resumed run exported older weights.
    Now best.pt is written first; the kill lands after the first of the two."""
    last_row = max(i for i, name in enumerate(reference.writes, 1) if name == "metrics.jsonl")
    first, second = [name for name in reference.writes[last_row:] if name.endswith(".pt")][:2]
    assert (first, second) == ("best.pt", "last.pt"), "the reference's last epoch must improve for this test"
    kill_then_resume(reference, tmp_path, "write", last_row + 1, "after-rename", 0.0)


def kill_then_resume(reference: Outcome, tmp_path: Path, kind: str, index: int, phase: str, delay: float) -> None:
    """Kill a training child (inside write ``index`` at ``phase``, or ``delay`` s after it starts training),
    check the files it left, resume in-process and compare with the reference."""
    config = write_config(tmp_path)
    run_dir, log = tmp_path / "runs" / "run", tmp_path / "writes.log"
    child = run_child(config, log, index, phase)
    try:
        if kind == "time":
            deadline = time.monotonic() + 300
            while "start" not in log_lines(log) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if kind == "write":
        assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    writes = [line.split() for line in log_lines(log) if line != "start"]
    if kind == "write":  # the file being written when the kill came is its previous version, byte for byte
        _, name, digest = writes[-1]
        path = run_dir / name
        if phase == "after-rename":
            assert path.exists()
        elif digest == "-":
            assert not path.exists()
        else:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    present = whole_files(run_dir) if run_dir.exists() else []
    print(f"{kind} {index} {phase} {delay:.2f}s; killed after {len(writes)} writes; left {present}")
    resumed = train(load_config(config, ["resume=true"]))
    assert resumed.run_dir == run_dir
    reference.assert_equal(Outcome.of(run_dir))
    assert not list(run_dir.glob(".*.tmp")), "a temporary file of an interrupted write was left behind"


@pytest.mark.parametrize("trial", range(TRIALS))
def test_full_disk_or_io_error_at_a_write_is_one_line_and_keeps_the_previous_file(trial, reference, tmp_path):
    """ENOSPC or EIO raised by the file write, the fsync or the rename of write number ``index``: the command
    prints one line, the file keeps its previous bytes, the others are whole; resume=true then finishes exactly."""
    rng = np.random.default_rng(SEED + trial)
    indices = np.random.default_rng(SEED).permutation(len(reference.writes)) + 1
    index = int(indices[trial % len(indices)])
    code, where = (errno.ENOSPC, errno.EIO)[trial % 2], ("write", "fsync", "replace")[int(rng.integers(3))]
    config = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "run"
    real, seen, previous = ckpt.atomic_write, [0], {}

    def failing(path, write):
        seen[0] += 1
        path = Path(path)
        if seen[0] != index:
            return real(path, write)
        previous["name"], previous["bytes"] = path.name, path.read_bytes() if path.exists() else None
        error = OSError(code, os.strerror(code))

        def fail(*args):
            raise error

        with pytest.MonkeyPatch.context() as mp:
            if where == "write":
                return real(path, fail)
            mp.setattr(ckpt.os, where, fail)
            return real(path, write)

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(ckpt, "atomic_write", failing)
        status = train_main([str(config)])
    lines = err.getvalue().splitlines()
    assert status == 2 and len(lines) == 1, err.getvalue()
    assert os.strerror(code) in lines[0] and previous["name"] in lines[0]
    assert ("the previous file is intact" if previous["bytes"] is not None else "nothing was written") in lines[0]
    path = run_dir / previous["name"]
    assert (path.read_bytes() if path.exists() else None) == previous["bytes"]
    present = whole_files(run_dir)
    assert not list(run_dir.glob(".*.tmp"))
    print(f"trial {trial}: {errno.errorcode[code]} at {where} of write {index} ({previous['name']}); left {present}")
    train(load_config(config, ["resume=true"]))
    reference.assert_equal(Outcome.of(run_dir))


def test_a_second_process_on_the_same_run_is_refused_in_one_line(reference, tmp_path, capsys):
    """The first process holds the run directory; a second one (resume=true or --force) stops with one line and
    the first finishes exactly as the reference: nothing interleaved. A killed holder leaves no stuck lock (every
    kill trial above resumes under the lock)."""
    config = write_config(tmp_path)
    run_dir, log = tmp_path / "runs" / "run", tmp_path / "writes.log"
    first = run_child(config, log)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "config.yaml").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # config.yaml is written with the lock held
        capsys.readouterr()
        assert train_main([str(config), "resume=true"]) == 2
        assert train_main([str(config), "--force"]) == 2
        still_running = first.poll() is None
        err = capsys.readouterr().err.splitlines()
        assert first.wait(timeout=600) == 0, first.stderr.read() if first.stderr else ""
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert still_running, "the first process ended before the second was refused: nothing was tested"
    assert len(err) == 2 and all("is in use by another training process" in line for line in err), err
    reference.assert_equal(Outcome.of(run_dir))
