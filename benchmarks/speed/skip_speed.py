"""Does skipping save wall time? SkipNet through ``GatedRunner`` with a quarter, half and three quarters of the gated
blocks' decisions closed, against the same runner with every block executed.

    python benchmarks/speed/skip_speed.py [--gate rnn] [--threads 2] [--onnx] [--smoke]

SkipNet-110 (CIFAR, random weights: only timing matters), batch 64, CPU. For each share the gate threshold is
bisected on calibration batches until that share of the (sample, block) decisions skip; then the runner (batch-norm
folded, channels-last; skipped blocks are not computed: samples are gathered per block) runs for real, paired back
to back in one process with a threshold that executes every block (the cost of the masked formulation of the public
code, which computes every block). Target at half closed: wall-time ratio <= 0.65. ``--onnx`` (needs the deploy
extra) also exports the network (``dynsila.deploy.gated_export``) and times ``OnnxGatedRunner`` the same way at the
same thresholds, beside its time over PyTorch's and whether its gate decisions equal PyTorch's. Writes
benchmarks/results/skip_speed.{json,md} (``--smoke``: SkipNet-38, 2 batches of 8, 1 repeat, written under
``--results-dir`` only, for tests). Each share is measured in ``--processes`` fresh processes (default 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import RESULTS_DIR, command_line, environment, header, paired_times, verdict, write_results
from dynsila import models
from dynsila.budget.flops import gated_costs
from dynsila.deploy.gated_export import export_gated
from dynsila.deploy.gated_runner import GatedRunner
from dynsila.deploy.onnx_gated_runner import OnnxGatedRunner
from dynsila.deploy.runner import raise_primitive_cache

TARGET_WALL_RATIO = 0.65  # skipping half the decisions must cost at most this share of the all-blocks time
SKIP_SHARE = 0.5  # share of (sample, block) decisions the bisected threshold skips
BISECTION_STEPS = 20  # threshold found to 2**-20


SHARES = (0.25, 0.5, 0.75)  # shares of (sample, block) decisions closed


@torch.no_grad()
def threshold_for_skipping(runner: GatedRunner, batches: list[torch.Tensor], share: float, steps: int) -> float:
    """Bisect the gate threshold until ``share`` of the decisions skip, with skipping on (the recurrent gate and
    the features depend on earlier decisions, so the threshold is found in the mode it is used in)."""
    low, high = 0.0, 1.0
    for _ in range(steps):
        runner.set_threshold((low + high) / 2)
        executed = torch.cat([runner(x).executed for x in batches])
        if 1 - float(executed.mean()) < share:
            low = runner.body.threshold
        else:
            high = runner.body.threshold
    return (low + high) / 2


def measure(runner: GatedRunner, batches: list[torch.Tensor], share: float, args: argparse.Namespace) -> dict:
    """One share: threshold, decisions, MACs ratio and the paired wall-time ratio against every block run."""
    threshold = threshold_for_skipping(runner, batches[:4], share, 3 if args.smoke else BISECTION_STEPS)

    def run(t: float) -> torch.Tensor:
        runner.set_threshold(t)
        return torch.cat([runner(x).executed for x in batches])

    run(-1.0)  # warm-up
    executed = run(threshold)
    times_skip, times_all = paired_times(lambda: run(threshold), lambda: run(-1.0), repeats=args.repeats)
    costs = runner.costs
    ratio = statistics.median(a / b for a, b in zip(times_skip, times_all, strict=True))
    return {
        "share_target": share, "threshold": threshold, "skipped_fraction": 1 - float(executed.mean()),
        "blocks_with_mixed_decisions": float(((executed.mean(0) > 0) & (executed.mean(0) < 1)).double().mean()),
        "macs_ratio": float(costs.per_sample(executed).mean()) / costs.full, "wall_ratio": ratio,
        "seconds_skipping": statistics.median(times_skip), "seconds_all_executed": statistics.median(times_all),
    }  # fmt: skip


def measure_onnx(
    onnx: OnnxGatedRunner, runner: GatedRunner, batches: list[torch.Tensor], row: dict, repeats: int
) -> dict:
    """The ONNX runner at a row's threshold: its wall ratio against itself with every block run, its time over the
    PyTorch runner's at that threshold, and whether its decisions equal PyTorch's."""
    arrays = [x.numpy() for x in batches]

    def run_onnx(t: float) -> list:
        onnx.set_threshold(t)
        return [onnx(x).executed for x in arrays]

    def run_torch() -> None:
        runner.set_threshold(row["threshold"])
        for x in batches:
            runner(x)

    run_onnx(-1.0)  # warm-up
    executed = torch.from_numpy(np.concatenate(run_onnx(row["threshold"])))
    runner.set_threshold(row["threshold"])
    reference = torch.cat([runner(x).executed for x in batches])
    times_skip, times_all = paired_times(lambda: run_onnx(row["threshold"]), lambda: run_onnx(-1.0), repeats=repeats)
    times_onnx, times_torch = paired_times(lambda: run_onnx(row["threshold"]), run_torch, repeats=repeats)
    return {
        "onnx_wall_ratio": statistics.median(a / b for a, b in zip(times_skip, times_all, strict=True)),
        "onnx_over_torch": statistics.median(a / b for a, b in zip(times_onnx, times_torch, strict=True)),
        "onnx_seconds_skipping": statistics.median(times_skip),
        "onnx_seconds_all_executed": statistics.median(times_all),
        "onnx_decisions_equal": float((executed == reference).double().mean()),
    }  # fmt: skip


def onnx_rows(model: torch.nn.Module, runner: GatedRunner, batches: list, rows: list[dict], args) -> list[dict]:
    """Export once (the threshold is the runner's to set), then one ONNX measurement per row."""
    with tempfile.TemporaryDirectory() as tmp:
        export_gated(model, Path(tmp) / "onnx", batches[0][:8], 0.5, runner.costs, exporter="torchscript")
        onnx = OnnxGatedRunner(Path(tmp) / "onnx", threads=args.threads)
        return [measure_onnx(onnx, runner, batches, row, args.repeats) for row in rows]


def onnx_table(rows: list[dict]) -> list[str]:
    return [
        "ONNX Runtime (`OnnxGatedRunner`, TorchScript exporter, the same thresholds and batches; wall ratio against "
        "itself with every block run, and its time over the PyTorch runner's at that threshold):",
        "",
        "| closed (target) | ONNX wall ratio | ONNX / PyTorch | ONNX seconds | decisions equal to PyTorch's |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {r['share_target']:.0%} | {r['onnx_wall_ratio']:.3f} | {r['onnx_over_torch']:.3f} | "
            f"{r['onnx_seconds_skipping']:.3f} vs {r['onnx_seconds_all_executed']:.3f} | "
            f"{r['onnx_decisions_equal']:.2%} |"
            for r in rows
        ],
        "",
    ]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", choices=["rnn", "ffgate1", "ffgate2"], default="rnn")
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--processes", type=int, default=3, help="fresh processes to measure in (median taken)")
    parser.add_argument("--onnx", action="store_true", help="also time OnnxGatedRunner (needs the deploy extra)")
    parser.add_argument(
        "--smoke", action="store_true", help="SkipNet-38, 2 batches of 8, 1 repeat, 3 bisection steps (tests)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--rows-to", type=Path, help=argparse.SUPPRESS)  # one measuring process writes its rows here
    args = parser.parse_args(argv)
    if args.smoke:
        # one thread: on a loaded machine two OpenMP threads wait on each other far longer than tiny ops take
        args.depth, args.batches, args.batch_size, args.repeats, args.threads = 38, 2, 8, 1, 1
    return args


def measure_here(args: argparse.Namespace, onnx: bool) -> list[dict]:
    """Every share's row, measured in this process."""
    torch.set_num_threads(args.threads)
    raise_primitive_cache()  # before the first convolution (gated_costs convolves), or oneDNN never reads it
    torch.manual_seed(0)
    model = models.build("skipnet", num_classes=10, depth=args.depth, gate=args.gate).eval()
    costs = gated_costs(model, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, 32, 32, generator=g) for _ in range(args.batches)]
    runner = GatedRunner(model, 0.5, costs)
    rows = [measure(runner, batches, share, args) for share in SHARES]
    if onnx:
        for row, extra in zip(rows, onnx_rows(model, runner, batches, rows, args), strict=True):
            row.update(extra)
    return rows


def measure_in_processes(args: argparse.Namespace) -> list[dict]:
    """Each share measured in ``args.processes`` fresh processes (the ONNX rows in the first only): the same
    all-blocks pass was seen to take 1.0 s in one process and 1.25 s in the next, steady within each, so one
    process's ratio is not the runner's. Each row keeps the first process's fields, the per-process wall ratios
    and their median as ``wall_ratio``."""
    script = Path(__file__).resolve()
    common = ["--gate", args.gate, "--depth", str(args.depth), "--threads", str(args.threads), "--batches",
              str(args.batches), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]  # fmt: skip
    per_process = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"rows{i}.json"
            flags = [*common, *(["--onnx"] if args.onnx and i == 0 else []), "--rows-to", str(out)]
            subprocess.run([sys.executable, str(script), *flags], check=True, stdout=subprocess.DEVNULL)
            per_process.append(json.loads(out.read_text()))
    rows = per_process[0]
    for k, row in enumerate(rows):
        row["wall_ratio_per_process"] = [p[k]["wall_ratio"] for p in per_process]
        row["wall_ratio"] = statistics.median(row["wall_ratio_per_process"])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.rows_to is not None:  # a measuring process of measure_in_processes
        args.rows_to.write_text(json.dumps(measure_here(args, args.onnx)))
        return 0
    load_start = os.getloadavg()[0]
    rows = measure_here(args, args.onnx) if args.processes <= 1 else measure_in_processes(args)
    load = {"start": load_start, "end": os.getloadavg()[0]}
    half = next(r for r in rows if r["share_target"] == SKIP_SHARE)
    command, env = command_line(__file__, argv), environment(threads=args.threads)
    result = {
        "command": command,
        "environment": env,
        "model": f"skipnet depth {args.depth}, gate {args.gate}, CIFAR stem, random weights, batch {args.batch_size}",
        "runner": "GatedRunner (batch-norm folded, channels-last)",
        "processes": max(args.processes, 1),
        "rows": rows,
        "wall_ratio": half["wall_ratio"],
        "macs_ratio": half["macs_ratio"],
        "target_wall_ratio": TARGET_WALL_RATIO,
        "met": half["wall_ratio"] <= TARGET_WALL_RATIO,
        "load_average_1min": load,
    }
    text = "\n".join(report_lines(result, args))
    if not (args.smoke and args.results_dir == RESULTS_DIR):  # a smoke run never overwrites the committed result
        write_results("skip_speed", result, text, args.results_dir)
    print(text)
    return 0


def report_lines(result: dict, args: argparse.Namespace) -> list[str]:
    rows, load = result["rows"], result["load_average_1min"]
    spread = ["" if "wall_ratio_per_process" not in r else
              " (" + ", ".join(f"{v:.3f}" for v in r["wall_ratio_per_process"]) + ")" for r in rows]  # fmt: skip
    return [
        *header(
            "SkipNet: wall time with skipped blocks not computed (GatedRunner)",
            result["command"],
            result["environment"],
        ),
        f"{result['model']}; {args.batches} batches; {result['runner']}. Each row: the gate threshold bisected "
        f"for that share of closed (sample, block) decisions, timed back to back against the same runner with "
        f"every block executed (median of {args.repeats} pairs), in {result['processes']} fresh process(es): the "
        "wall ratio is the median of the processes' ratios (each in brackets); the seconds are the first's.",
        "",
        "| closed (target) | closed (measured) | blocks on part of a batch | MACs ratio | wall ratio | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['share_target']:.0%} | {r['skipped_fraction']:.1%} | {r['blocks_with_mixed_decisions']:.0%} | "
            f"{r['macs_ratio']:.3f} | {r['wall_ratio']:.3f}{extra} | {r['seconds_skipping']:.3f} vs "
            f"{r['seconds_all_executed']:.3f} |"
            for r, extra in zip(rows, spread, strict=True)
        ],  # fmt: skip
        "",
        f"MACs ratio: per-sample MACs (gates and shortcuts included) over every block executed. Target at "
        f"{SKIP_SHARE:.0%} closed, wall ratio <= {TARGET_WALL_RATIO}: {verdict(result['met'])}. Load average "
        f"(1 min) {load['start']:.2f} at the start, {load['end']:.2f} at the end.",
        "",
        *(onnx_table(rows) if args.onnx else []),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
