"""Early exit on ONNX Runtime beside PyTorch: wall time of the same exit mixes in both runtimes.

    python benchmarks/speed/onnx_speed.py [--threads 2] [--repeats 7] [--exporter auto] [--out onnx_speed] [--smoke]

MSDNet CIFAR-100 b7 (random weights: only timing matters), the setting of ``benchmarks/speed/early_exit_speed.py``:
thresholds fitted on calibration inputs for exit mixes spending about 25 %, 50 % and 75 % of the full network's
MACs, then other inputs go through ``dynsila.runner.EarlyExitRunner`` (PyTorch, batch-norm folded,
channels-last) and through ``dynsila.export.OnnxEarlyExitRunner`` (ONNX Runtime, CPU, on the graphs
``dynsila.export`` writes). Batch 64 (``run_stream``: survivors regrouped to 64 before each stage) on 1,280
images and batch 1 on 64 images; the full network (every exit evaluated) in both runtimes as well. The two
runtimes are timed back to back, alternating, in one process, with the same number of threads (torch
``set_num_threads``, ONNX Runtime ``intra_op_num_threads``). Both runners' exit decisions are compared too.
Writes benchmarks/results/<out>.{json,md} (``--smoke``: a tiny MSDNet, written under ``--results-dir`` only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import REPO_ROOT, RESULTS_DIR, command_line, environment, header, paired_times, write_results
from dynsila import models
from dynsila.budget.flops import exit_costs
from dynsila.budget.thresholds import thresholds_for_budget
from dynsila.config import load_config
from dynsila.deploy.export import OnnxEarlyExitRunner, ThresholdFit, export_onnx
from dynsila.deploy.runner import EarlyExitRunner, raise_primitive_cache

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


def full_network_row(bench: Bench, batch_size: int, n_images: int) -> dict[str, Any]:
    """Every exit evaluated for every image (no early exit), in both runtimes."""
    batches = bench.images[:n_images].split(batch_size)
    arrays = [x.numpy() for x in batches]
    onnx_runner = OnnxEarlyExitRunner(bench.export_dir, threads=bench.threads)

    def run_torch() -> None:
        with torch.no_grad():
            for x in batches:
                bench.prepared(x.contiguous(memory_format=torch.channels_last))

    def run_onnx() -> None:
        for x in arrays:
            onnx_runner.all_exit_logits(x)

    return {"batch_size": batch_size, "images": n_images, **bench.pair(run_onnx, run_torch)}


def mix_row(bench: Bench, batch_size: int, n_images: int, fraction: float) -> dict[str, Any]:
    """One exit mix at one batch size: ``run_stream`` in both runtimes with the same thresholds."""
    batches = bench.images[:n_images].split(batch_size)
    arrays = [x.numpy() for x in batches]
    thresholds, _ = thresholds_for_budget(bench.cal_logits, bench.costs, fraction * bench.full)
    torch_runner = EarlyExitRunner(bench.model, thresholds, costs=bench.costs)
    onnx_runner = OnnxEarlyExitRunner(bench.export_dir, thresholds.tolist(), threads=bench.threads)
    torch_exits = torch_runner.run_stream(batches).exit_index.numpy()
    onnx_result = onnx_runner.run_stream(arrays)
    timing = bench.pair(lambda: onnx_runner.run_stream(arrays), lambda: torch_runner.run_stream(batches))
    return {
        "batch_size": batch_size,
        "target_fraction": fraction,
        "images": n_images,
        "macs_ratio": float(onnx_result.macs.mean()) / bench.full,
        "exit_histogram": np.bincount(onnx_result.exit_index, minlength=len(bench.costs)).tolist(),
        "decisions_differing": int((torch_exits != onnx_result.exit_index).sum()),
        **timing,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=Sizes.repeats)
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
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
    sizes = SMOKE if args.smoke else Sizes(repeats=args.repeats)
    model = models.build("msdnet", num_classes=100, **kwargs).eval()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(model, sizes, args.threads, Path(tmp) / "onnx", args.exporter)
        full_rows = [full_network_row(bench, b, n) for b, n in (sizes.batched, sizes.single)]
        rows = []
        for batch_size, n_images in (sizes.batched, sizes.single):
            for fraction in MIXES:
                rows.append(mix_row(bench, batch_size, n_images, fraction))
                print(rows[-1], flush=True)
    exporters = sorted({g["exporter"] for g in bench.manifest["stages"] + bench.manifest["exits"]})
    result = {
        "command": command_line(__file__, argv),
        "environment": environment("cpu", args.threads) | {"onnxruntime": _onnxruntime_version()},
        "model": "msdnet CIFAR-100 b7, random weights, 32x32 inputs" if not args.smoke else f"msdnet {kwargs}",
        "exporter": exporters,
        "export_seconds": bench.export_seconds,
        "exit_macs_cumulative": bench.costs,
        "full_network": full_rows,
        "rows": rows,
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
    env = result["environment"]
    lines = [
        *header("Early exit on ONNX Runtime beside PyTorch", result["command"], env),
        f"{result['model']}, full network {full / 1e6:.2f}M MACs (every exit evaluated). PyTorch: "
        "`EarlyExitRunner` (batch-norm folded, channels-last, eager); ONNX Runtime "
        f"{env['onnxruntime']} (CPU execution provider, default graph optimisations): `OnnxEarlyExitRunner` on the "
        f"graphs of `python -m dynsila.export` (exporter: {', '.join(result['exporter'])}; export took "
        f"{result['export_seconds']:.0f} s). {env['threads']} threads in both runtimes (torch `set_num_threads`, "
        f"ONNX Runtime `intra_op_num_threads`). Times: medians of {sizes.repeats} back-to-back pairs in one "
        "process, both runtimes warmed up first; ratio = median of the pairs' ONNX / PyTorch ratios (below 1: "
        "ONNX Runtime faster). The machine was shared with other jobs while this ran: only the ratios, measured "
        "pair by pair, are meant to be compared.",
        "",
        "Full network (no early exit):",
        "",
        "| batch | images | PyTorch s | ONNX Runtime s | ONNX / PyTorch |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["full_network"]:
        lines.append(
            f"| {r['batch_size']} | {r['images']} | {r['torch_seconds']:.3f} | {r['onnx_seconds']:.3f} | "
            f"{r['onnx_over_torch']:.3f} |"
        )
    lines += [
        "",
        "Early exit (`run_stream`; the same thresholds in both runtimes):",
        "",
        "| batch | target MACs share | realised MACs ratio | PyTorch s | ONNX Runtime s | ONNX / PyTorch | "
        "exit histogram | decisions differing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch_size']} | {r['target_fraction']:.2f} | {r['macs_ratio']:.3f} | {r['torch_seconds']:.3f} | "
            f"{r['onnx_seconds']:.3f} | {r['onnx_over_torch']:.3f} | {r['exit_histogram']} | "
            f"{r['decisions_differing']} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
