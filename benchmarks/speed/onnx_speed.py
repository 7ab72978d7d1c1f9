"""Early exit on ONNX Runtime beside PyTorch: wall time of the same exit mixes in both runtimes.

    python benchmarks/speed/onnx_speed.py [--threads 2] [--repeats 7] [--images 1280] [--single-images 64]
        [--exporter auto] [--out onnx_speed] [--smoke]

MSDNet CIFAR-100 b7 (random weights: only timing matters), the setting of ``benchmarks/speed/early_exit_speed.py``:
thresholds fitted on calibration inputs for exit mixes spending about 25 %, 50 % and 75 % of the full network's
MACs, then other inputs go through ``dynsila.runner.EarlyExitRunner`` (PyTorch, batch-norm folded,
channels-last) and through ``dynsila.export.OnnxEarlyExitRunner`` (ONNX Runtime, CPU, on the graphs
``dynsila.export`` writes). Batch 64 (``run_stream``: survivors regrouped to 64 before each stage) on 1,280
images and batch 1 on 64 images; the full network (every exit evaluated) in both runtimes as well. The two
runtimes are timed back to back, alternating, in one process, with the same number of threads (torch
``set_num_threads``, ONNX Runtime ``intra_op_num_threads``). Both runners' exit decisions are compared too.
Beside them: the whole network as one ONNX graph (the staged runner's ceiling: what ONNX Runtime does without
stopping between stages), the runner on a ``--lazy`` export against the default one, and the staged runner
under other session settings (``dynsila.onnx_runner.SessionSettings``) against the whole graph.
Writes benchmarks/results/<out>.{json,md} (``--smoke``: a tiny MSDNet, written under ``--results-dir`` only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    environment,
    header,
    paired_times,
    verdict,
    write_results,
)
from dynsila import models
from dynsila.budget.flops import exit_costs
from dynsila.budget.thresholds import thresholds_for_budget
from dynsila.config import load_config
from dynsila.deploy.export import OnnxEarlyExitRunner, ThresholdFit, export_graph, export_onnx
from dynsila.deploy.fuse import fold_batchnorm
from dynsila.deploy.onnx_runner import SessionSettings
from dynsila.deploy.runner import EarlyExitRunner, raise_primitive_cache
from dynsila.methods.sila import unwrap

PRESET = REPO_ROOT / "configs" / "cifar100" / "msdnet_baseline.yaml"
MIXES = (0.25, 0.50, 0.75)  # target shares of the full network's MACs, as in early_exit_speed.py
SMOKE_MODEL = {"n_blocks": 3, "step": 1, "base": 1, "n_channels": 4, "growth_rate": 4, "head_channels": 8}


@dataclass(frozen=True)
class Sizes:
    """(batch size, images) timed batched and at batch 1, calibration images, timed pairs per row."""

    batched: tuple[int, int] = (64, 1280)
    single: tuple[int, int] = (1, 64)
    calibration: int = 1024
    repeats: int = 7


SMOKE = Sizes(batched=(8, 16), single=(1, 4), calibration=64, repeats=1)


class Bench:
    """The model, its export, its exit costs, the inputs, and the timing of one PyTorch / ONNX Runtime pair."""

    def __init__(self, model: torch.nn.Module, sizes: Sizes, threads: int, export_dir: Path, exporter: str) -> None:
        self.model, self.sizes, self.threads, self.export_dir = model, sizes, threads, export_dir
        self.costs = [c.macs_cumulative for c in exit_costs(model, (3, 32, 32))]
        self.full = self.costs[-1]
        g = torch.Generator().manual_seed(0)
        calibration = torch.randn(sizes.calibration, 3, 32, 32, generator=g)
        self.images = torch.randn(max(sizes.batched[1], sizes.single[1]), 3, 32, 32, generator=g)
        with torch.no_grad():
            self.cal_logits = torch.cat([torch.stack(model(x), 1) for x in calibration.split(256)])
        start = time.perf_counter()
        fit = ThresholdFit([0.0] * len(self.costs), "max_prob", 1.0, None, 0, [], 0.0)  # each row sets its own
        per_exit = [{"macs": 0, "macs_cumulative": c} for c in self.costs]
        self.manifest = export_onnx(model, export_dir, calibration[:8], per_exit, fit, exporter=exporter)
        self.export_seconds = time.perf_counter() - start
        self.lazy_dir = export_dir.with_name(f"{export_dir.name}_lazy")
        export_onnx(model, self.lazy_dir, calibration[:8], per_exit, fit, exporter=exporter, lazy=True)
        self.whole_path = export_dir.with_name("whole.onnx")
        self.whole_exporter = export_whole_network(model, calibration[:8], self.whole_path)
        self.prepared = EarlyExitRunner(model, [0.0] * len(self.costs), costs=self.costs).model

    def pair(self, onnx_fn: Callable[[], Any], torch_fn: Callable[[], Any]) -> dict[str, float]:
        """Both warmed up, then ``repeats`` back-to-back pairs: median seconds of each and of their ratio."""
        onnx_fn(), torch_fn()
        onnx_times, torch_times = paired_times(onnx_fn, torch_fn, "cpu", self.sizes.repeats)
        return {
            "torch_seconds": statistics.median(torch_times),
            "onnx_seconds": statistics.median(onnx_times),
            "onnx_over_torch": statistics.median(o / t for o, t in zip(onnx_times, torch_times, strict=True)),
        }


class WholeNetwork(torch.nn.Module):
    """Every exit's logits, ``N x K x C``, from one graph: the network without early exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.model(x), 1)


def export_whole_network(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    """The batch-norm-folded network as one ONNX graph (the staged runner's ceiling), by the TorchScript exporter
    (the dynamo exporter fails on the list of exits); returns the exporter used."""
    whole = WholeNetwork(unwrap(fold_batchnorm(model)).eval())
    with torch.no_grad():
        return export_graph(whole, (example,), path, (["image"], ["logits"]), "torchscript")


def whole_session(bench: Bench, settings: SessionSettings) -> Callable[[np.ndarray], Any]:
    """A session on the whole-network graph, made as the runner makes its own."""
    import onnxruntime

    session = settings.open(onnxruntime, bench.whole_path, settings.pool(onnxruntime))
    return lambda x: session.run(None, {"image": x})


def full_network_row(bench: Bench, batch_size: int, n_images: int) -> dict[str, Any]:
    """Every exit evaluated for every image (no early exit), in both runtimes; the staged runner against the
    whole network as one ONNX graph too (the same session settings)."""
    batches = bench.images[:n_images].split(batch_size)
    arrays = [x.numpy() for x in batches]
    onnx_runner = OnnxEarlyExitRunner(bench.export_dir, threads=bench.threads)
    whole = whole_session(bench, onnx_runner.sessions)

    def run_torch() -> None:
        with torch.no_grad():
            for x in batches:
                bench.prepared(x.contiguous(memory_format=torch.channels_last))

    def run_onnx() -> None:
        for x in arrays:
            onnx_runner.all_exit_logits(x)

    def run_whole() -> None:
        for x in arrays:
            whole(x)

    row = {"batch_size": batch_size, "images": n_images, **bench.pair(run_onnx, run_torch)}
    whole_times, torch_times = paired_times(run_whole, run_torch, "cpu", bench.sizes.repeats)
    staged_times, whole_again = paired_times(run_onnx, run_whole, "cpu", bench.sizes.repeats)
    return row | {
        "whole_onnx_seconds": statistics.median(whole_times + whole_again),
        "whole_onnx_over_torch": _median_ratio(whole_times, torch_times),
        "staged_over_whole_onnx": _median_ratio(staged_times, whole_again),
    }


def _median_ratio(times: list[float], baseline: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(times, baseline, strict=True))


def mix_row(bench: Bench, batch_size: int, n_images: int, fraction: float) -> dict[str, Any]:
    """One exit mix at one batch size: ``run_stream`` in both runtimes with the same thresholds."""
    batches = bench.images[:n_images].split(batch_size)
    arrays = [x.numpy() for x in batches]
    thresholds, _ = thresholds_for_budget(bench.cal_logits, bench.costs, fraction * bench.full)
    torch_runner = EarlyExitRunner(bench.model, thresholds, costs=bench.costs)
    onnx_runner = OnnxEarlyExitRunner(bench.export_dir, thresholds.tolist(), threads=bench.threads)
    lazy_runner = OnnxEarlyExitRunner(bench.lazy_dir, thresholds.tolist(), threads=bench.threads)
    torch_exits = torch_runner.run_stream(batches).exit_index.numpy()
    onnx_result = onnx_runner.run_stream(arrays)
    lazy_exits = lazy_runner.run_stream(arrays).exit_index
    timing = bench.pair(lambda: onnx_runner.run_stream(arrays), lambda: torch_runner.run_stream(batches))
    lazy_times, eager_times = paired_times(
        lambda: lazy_runner.run_stream(arrays), lambda: onnx_runner.run_stream(arrays), "cpu", bench.sizes.repeats
    )
    return {
        "onnx_lazy_over_eager": _median_ratio(lazy_times, eager_times),
        "onnx_lazy_decisions_differing": int((torch_exits != lazy_exits).sum()),
        "batch_size": batch_size,
        "target_fraction": fraction,
        "images": n_images,
        "macs_ratio": float(onnx_result.macs.mean()) / bench.full,
        "exit_histogram": np.bincount(onnx_result.exit_index, minlength=len(bench.costs)).tolist(),
        "decisions_differing": int((torch_exits != onnx_result.exit_index).sum()),
        **timing,
    }


SESSION_VARIANTS = {  # name: runner keyword arguments; "shared" last, as ONNX Runtime then refuses own pools
    "a pool per session, optimisation all (default)": {},
    "a pool per session, optimisation extended": {"optimization": "extended"},
    "a pool per session, optimisation basic": {"optimization": "basic"},
    "process-wide spinning pools, optimisation all": {"thread_pool": "shared"},
}


def run_all(run: Callable[[Any], Any], batches: list[Any]) -> None:
    for x in batches:
        run(x)


def session_rows(
    bench: Bench, sizes: Sequence[tuple[int, int]], variants: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """The staged runner (full network) under each of ``variants`` against the whole-network graph with
    the default settings, paired, at each (batch size, images). Variants outermost: the shared pools come last,
    as once they exist no session may have its own."""
    default = OnnxEarlyExitRunner(bench.export_dir, threads=bench.threads)
    whole = whole_session(bench, default.sessions)
    rows = []
    for name, kwargs in variants.items():
        runner = OnnxEarlyExitRunner(
            bench.export_dir,
            threads=bench.threads,
            thread_pool=kwargs.get("thread_pool"),
            optimization=kwargs.get("optimization"),
        )
        for batch_size, n_images in sizes:
            arrays = [x.numpy() for x in bench.images[:n_images].split(batch_size)]
            runner.all_exit_logits(arrays[0]), whole(arrays[0])
            staged_times, whole_times = paired_times(
                partial(run_all, runner.all_exit_logits, arrays),
                partial(run_all, whole, arrays),
                "cpu",
                bench.sizes.repeats,
            )
            rows.append(
                {
                    "batch_size": batch_size,
                    "settings": name,
                    "staged_seconds": statistics.median(staged_times),
                    "staged_over_whole_onnx": _median_ratio(staged_times, whole_times),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=Sizes.repeats)
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    parser.add_argument("--images", type=int, default=Sizes.batched[1], help="images in the batch-64 rows")
    parser.add_argument("--single-images", type=int, default=Sizes.single[1], help="images in the batch-1 rows")
    parser.add_argument("--out", default="onnx_speed")
    parser.add_argument("--smoke", action="store_true", help="a tiny MSDNet on a few images (tests)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    raise_primitive_cache()  # before the first convolution (exit_costs convolves), or oneDNN never reads it
    if args.smoke:  # one thread: on a loaded machine two OpenMP threads wait on each other longer than tiny ops take
        args.threads = 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = load_config(PRESET).model_kwargs() | (SMOKE_MODEL if args.smoke else {})
    batched, single = (Sizes.batched[0], args.images), (1, args.single_images)
    sizes = SMOKE if args.smoke else Sizes(batched=batched, single=single, repeats=args.repeats)
    model = models.build("msdnet", num_classes=100, **kwargs).eval()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(model, sizes, args.threads, Path(tmp) / "onnx", args.exporter)
        print(f"exported in {bench.export_seconds:.0f} s", flush=True)
        full_rows = [full_network_row(bench, b, n) for b, n in (sizes.batched, sizes.single)]
        print(full_rows, flush=True)
        rows = []
        for batch_size, n_images in (sizes.batched, sizes.single):
            for fraction in MIXES:
                rows.append(mix_row(bench, batch_size, n_images, fraction))
                print(rows[-1], flush=True)
        # a smoke run (in a test process) leaves out the shared pools: once made, the process could not open
        # sessions with pools of their own any more
        variants = {k: v for k, v in SESSION_VARIANTS.items() if not (args.smoke and v.get("thread_pool"))}
        sessions = session_rows(bench, (sizes.batched, sizes.single), variants)
    exporters = sorted({g["exporter"] for g in bench.manifest["stages"] + bench.manifest["exits"]})
    result = {
        "command": command_line(__file__, argv),
        "environment": environment("cpu", args.threads) | {"onnxruntime": _onnxruntime_version()},
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "model": "msdnet CIFAR-100 b7, random weights, 32x32 inputs" if not args.smoke else f"msdnet {kwargs}",
        "exporter": exporters,
        "export_seconds": bench.export_seconds,
        "exit_macs_cumulative": bench.costs,
        "whole_network_exporter": bench.whole_exporter,
        "full_network": full_rows,
        "rows": rows,
        "session_settings": sessions,
    }
    md = markdown(result, sizes)
    if not (args.smoke and args.results_dir == RESULTS_DIR):  # a smoke run never overwrites the committed result
        write_results(args.out, result, md, args.results_dir)
    print(md)
    return 0


def _onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def markdown(result: dict[str, Any], sizes: Sizes) -> str:
    full = result["exit_macs_cumulative"][-1]
    env, load = result["environment"], result["load_average_1min"]
    lines = [
        *header("Early exit on ONNX Runtime beside PyTorch", result["command"], env),
        f"{result['model']}, full network {full / 1e6:.2f}M MACs (every exit evaluated). PyTorch: "
        "`EarlyExitRunner` (batch-norm folded, channels-last, eager); ONNX Runtime "
        f"{env['onnxruntime']} (CPU execution provider): `OnnxEarlyExitRunner` with its default session settings "
        "(a thread pool per session whose threads sleep when idle, graph optimisation `all`) on the graphs of "
        f"`python -m dynsila.export` (exporter: {', '.join(result['exporter'])}; export took "
        f"{result['export_seconds']:.0f} s); *whole graph*: the same network as one ONNX graph (exporter: "
        f"{result['whole_network_exporter']}), the staged runner's ceiling. {env['threads']} threads in both "
        "runtimes (torch `set_num_threads`, ONNX Runtime `intra_op_num_threads`). Times: medians of "
        f"{sizes.repeats} back-to-back pairs in one process, everything warmed up first; ratio = median of the "
        "pairs' ratios (below 1: the first named is faster). 1-minute load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end, with {env['threads']} benchmark threads "
        "(above that, other work shared the cores): only the paired ratios are worth quoting.",
        "",
        "Full network (no early exit):",
        "",
        "| batch | images | PyTorch s | ONNX staged s | whole graph s | staged / PyTorch | whole graph / PyTorch | "
        "staged / whole graph |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["full_network"]:
        lines.append(
            f"| {r['batch_size']} | {r['images']} | {r['torch_seconds']:.3f} | {r['onnx_seconds']:.3f} | "
            f"{r['whole_onnx_seconds']:.3f} | {r['onnx_over_torch']:.3f} | {r['whole_onnx_over_torch']:.3f} | "
            f"{r['staged_over_whole_onnx']:.3f} |"
        )
    lines += [
        "",
        "Early exit (`run_stream`; the same thresholds in both runtimes); *lazy / eager*: the runner on a `--lazy` "
        "export over the default (whole stages) export, paired:",
        "",
        "| batch | target MACs share | realised MACs ratio | PyTorch s | ONNX Runtime s | ONNX / PyTorch | "
        "ONNX lazy / eager | exit histogram | decisions differing (eager, lazy) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch_size']} | {r['target_fraction']:.2f} | {r['macs_ratio']:.3f} | {r['torch_seconds']:.3f} | "
            f"{r['onnx_seconds']:.3f} | {r['onnx_over_torch']:.3f} | {r['onnx_lazy_over_eager']:.3f} | "
            f"{r['exit_histogram']} | {r['decisions_differing']}, {r['onnx_lazy_decisions_differing']} |"
        )
    lines += [
        "",
        "Session settings (full network): the staged runner over the whole graph with the default settings, paired:",
        "",
        "| batch | settings | staged s | staged / whole graph |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["session_settings"]:
        lines.append(
            f"| {r['batch_size']} | {r['settings']} | {r['staged_seconds']:.3f} | {r['staged_over_whole_onnx']:.3f} |"
        )
    if load["start"] > 2 * env["threads"]:
        lines += [
            "",
            f"The load was {load['start']:.0f} on {env['threads']} threads: PyTorch's OpenMP workers then wait for "
            "each "
            "other at every operator's barrier while the other jobs hold the cores, and its times swell far more than "
            "ONNX Runtime's (whose calling thread does work itself). The ONNX / PyTorch ratios of this run flatter "
            "ONNX Runtime; the ratios between ONNX Runtime rows are fairer. Re-run on a quiet machine to decide.",
        ]
    return "\n".join([*lines, "", *verdicts(result, sizes), ""])


def verdicts(result: dict[str, Any], sizes: Sizes) -> list[str]:
    """The targets, met or missed, with the numbers."""
    batched = sizes.batched[0]
    full = {r["batch_size"]: r for r in result["full_network"]}
    rows = result["full_network"] + result["rows"]
    worst = {b: max(r["onnx_over_torch"] for r in rows if r["batch_size"] == b) for b in full}
    lazy = [r["onnx_lazy_over_eager"] for r in result["rows"]]
    differing = sum(r["decisions_differing"] + r["onnx_lazy_decisions_differing"] for r in result["rows"])
    staged = full[batched]["staged_over_whole_onnx"]
    return [
        f"- Staged runner, full network, batch {batched}: {staged:.3f} x the whole graph (limit 1.15): "
        f"{verdict(staged <= 1.15)}.",
        f"- ONNX Runtime / PyTorch, worst batch-{batched} row {worst[batched]:.3f} (limit 0.80): "
        f"{verdict(worst[batched] <= 0.80)}; worst batch-1 row {worst[1]:.3f} (limit 1.0): {verdict(worst[1] <= 1.0)}.",
        f"- Exit decisions differing from PyTorch's, all rows, eager and lazy exports: {differing}.",
        f"- `--lazy` on ONNX Runtime: lazy / eager {min(lazy):.3f}-{max(lazy):.3f} over the exit-mix rows: "
        + ("the lazy export is faster in every row." if max(lazy) < 1 else "not faster in every row.")
        if lazy
        else "- `--lazy`: not measured.",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
