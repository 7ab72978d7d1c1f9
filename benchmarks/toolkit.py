"""What every benchmark shares: where results go, how a run is labelled, how time is measured, the curve maths.

    from benchmarks.toolkit import ...        # works from tests and from ``python benchmarks/x.py`` (see below)

- ``REPO_ROOT``, ``RESULTS_DIR``: the repository root and ``benchmarks/results/``.
- ``command_line(script, argv)``: the exact ``python benchmarks/x.py --flags`` line (``argv=None``: ``sys.argv``).
- ``environment(device, threads)``: date, machine, torch version, threads and device, as a dict.
- ``machine_fingerprint()``: CPU model, logical cores, torch and oneDNN versions: what must match for two runs'
  numbers to be compared as a pair.
- ``header(title, command, env)``: the Markdown title, ``Command:`` and ``Date:`` lines every result file starts with.
- ``write_results(stem, payload, markdown, results_dir)``: atomic ``<stem>.json`` (JSON-safe) and ``<stem>.md``.
- ``save_figure(fig, path)``: atomic PNG of a matplotlib figure.
- ``timed(fn, device, repeats)``: median seconds after a warm-up, CUDA synchronised around each run.
- ``paired_times(fn, baseline, device, repeats)`` / ``paired_ratio(...)``: back-to-back pairs, so drift cancels.
- ``budget_points(report)``, ``accuracy_at(points, macs)``, ``anytime_area(macs, accuracy)``: accuracy-vs-MACs.
- ``verdict(met)``: "met" / "missed"; ``PLOTTED_CRITERION``: the confidence criterion the curves use.

A script run as ``python benchmarks/speed/x.py`` has its own folder (not the repository root) on ``sys.path``;
each script therefore puts the root there before ``from benchmarks.toolkit import ...``, so one import line works
both ways and tests can ``importlib.import_module("benchmarks.speed.x")`` without running anything.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynsila.evaluation.report import EvalReport, json_safe
from dynsila.runs.checkpoint import atomic_write, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# The budgeted curves plotted and compared across runs use the max-probability confidence (the MSDNet default).
PLOTTED_CRITERION = "max_prob"


# --- labelling a result -------------------------------------------------------------------------------------


def command_line(script: str | Path, argv: Sequence[str] | None) -> str:
    """``python benchmarks/<folder>/<script> ARGS`` with shell quoting: the script's path below the benchmarks
    folder (its name alone when it is not in one). ``argv`` is what ``main`` was given; ``None`` means it was called
    from a shell, and the flags are then ``sys.argv[1:]`` (not the empty list ``None`` would give)."""
    args = sys.argv[1:] if argv is None else list(argv)
    parts = Path(script).parts
    below = [i for i, part in enumerate(parts[:-1]) if part == "benchmarks"]
    relative = "/".join(parts[below[-1] + 1 :]) if below else parts[-1]
    return f"python benchmarks/{relative}" + "".join(f" {shlex.quote(str(a))}" for a in args)


def device_name(device: torch.device) -> str:
    """``"cuda: NVIDIA H100 ..."`` or ``"cpu: x86_64"`` (the processor string where the platform knows one)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {platform.processor() or platform.machine()}"


def environment(device: torch.device | str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Date, machine, torch version, CPU threads (the current setting unless given) and device of a run."""
    return {
        "date": datetime.date.today().isoformat(),
        "platform": f"{platform.machine()} {platform.system()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "device": device_name(torch.device(device)),
    }


def cpu_model() -> str:
    """The processor's model name as the kernel reports it (``/proc/cpuinfo``), else what the platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def onednn_version() -> str:
    """The oneDNN (MKL-DNN) version torch was built with, from its build configuration ("none" without it)."""
    match = re.search(r"MKL-DNN v([0-9][0-9.]*)", torch.__config__.show())
    return match.group(1) if match else "none"


def machine_fingerprint() -> dict[str, Any]:
    """What two CPU runs must share for their accuracies to be paired: the same seed trained on another processor
    or another build of the kernels takes other floating-point paths and lands up to about 2 points away."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "onednn": onednn_version()}


def environment_line(env: dict[str, Any]) -> str:
    """One line: ``Date: 2026-01-01; x86_64 Linux, 2 threads; torch 2.x; device cpu: x86_64``."""
    where = f"{env['platform']}, {env['threads']} threads; torch {env['torch']}; device {env['device']}"
    return f"Date: {env['date']}; {where}"


def schedule_text(train: Any) -> str:
    """A run's learning-rate schedule in words: the milestones only where the schedule reads them (multistep)."""
    if train.schedule == "multistep":
        return f"{train.schedule} {train.milestones}"
    return str(train.schedule)


def header(title: str, command: str, env: dict[str, Any]) -> list[str]:
    """The first lines of every result's Markdown: title, the command that made it, and where it ran."""
    return [f"# {title}", "", f"Command: `{command}`  ", environment_line(env), ""]


def verdict(met: bool) -> str:
    return "met" if met else "missed"


# --- writing ------------------------------------------------------------------------------------------------


def write_results(stem: str, payload: dict[str, Any], markdown: str, results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<results_dir>/<stem>.json`` and ``.md`` atomically (a kill leaves the previous files whole);
    returns ``<results_dir>/<stem>`` for further suffixes (``.png``)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / stem
    atomic_write_text(out.with_suffix(".json"), json.dumps(json_safe(payload), indent=1, allow_nan=False))
    atomic_write_text(out.with_suffix(".md"), markdown if markdown.endswith("\n") else markdown + "\n")
    return out


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


# --- timing -------------------------------------------------------------------------------------------------


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_seconds(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds of one call of ``fn``; on CUDA the queue is drained before and after, so the kernels are counted."""
    device = torch.device(device)
    _synchronise(device)
    start = time.perf_counter()
    fn()
    _synchronise(device)
    return time.perf_counter() - start


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(run_seconds(fn, device) for _ in range(repeats))


def paired_times(
    fn: Callable[[], Any],
    baseline: Callable[[], Any],
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 0,
) -> tuple[list[float], list[float]]:
    """Seconds of ``fn`` and of ``baseline`` run back to back ``repeats`` times; ``warmup`` untimed runs of each
    precede each timed one (0: warm both up beforehand yourself)."""
    fn_times, baseline_times = [], []
    for _ in range(repeats):
        for _ in range(warmup):
            fn()
        fn_times.append(run_seconds(fn, device))
        for _ in range(warmup):
            baseline()
        baseline_times.append(run_seconds(baseline, device))
    return fn_times, baseline_times


def paired_ratio(
    fn: Callable[[], Any],
    baseline: Callable[[], Any],
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 0,
) -> float:
    """Median over ``repeats`` of time(fn) / time(baseline), the two run back to back each time, so the machine's
    drifting load cancels in each ratio (the only timing comparison worth quoting on a shared machine)."""
    fn_times, baseline_times = paired_times(fn, baseline, device, repeats, warmup)
    return statistics.median(a / b for a, b in zip(fn_times, baseline_times, strict=True))


# --- accuracy versus MACs -----------------------------------------------------------------------------------


def budget_points(report: EvalReport, criterion: str = PLOTTED_CRITERION) -> list[dict[str, Any]]:
    """The budgeted curve's points of an evaluation for ``criterion``, as dicts (``q``, ``avg_macs``, ``test_top1``,
    ...: the fields of ``BudgetedRow``), the form ``accuracy_at`` and the experiment's run files use."""
    curve = report.budgeted(criterion)
    if curve is None:
        raise ValueError(f"the evaluation of {report.run} has no budgeted curve for {criterion}")
    return [dataclasses.asdict(p) for p in curve.points]


def accuracy_at(points: list[dict[str, Any]], macs: float | np.ndarray) -> np.ndarray:
    """Test top-1 interpolated linearly at average cost ``macs`` (a number or an array); NaN outside the curve's
    MACs range (no extrapolation)."""
    xs = np.array([p["avg_macs"] for p in points], dtype=float)
    ys = np.array([p["test_top1"] for p in points], dtype=float)
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    grid = np.asarray(macs, dtype=float)
    return np.where((grid < xs[0]) | (grid > xs[-1]), np.nan, np.interp(grid, xs, ys))


def anytime_area(macs: np.ndarray, accuracy: np.ndarray) -> float:
    """Mean accuracy over the exits' MACs range: trapezoid area under accuracy vs MACs, divided by the range
    (a single exit: its accuracy)."""
    if len(macs) == 1:
        return float(accuracy[0])
    return float(np.trapezoid(accuracy, macs) / (macs[-1] - macs[0]))
