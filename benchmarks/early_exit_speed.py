"""Does early exiting save wall time in proportion to MACs?

    python benchmarks/early_exit_speed.py [--device cpu|cuda] [--threads 2] [--out early_exit_speed]

MSDNet CIFAR-100 b7 (random weights: only timing matters). Thresholds are fitted on calibration inputs for exit
mixes spending about 25 %, 50 % and 75 % of the full network's MACs (every exit evaluated, as the public code
does); then other inputs go through ``EarlyExitRunner`` and through the full network, at batch 64 and batch 1.
Batch 64 uses ``run_stream`` (survivors of consecutive batches regrouped to 64 before each stage); the
single-batch call (compaction within each batch only) is reported beside it. Reported per (batch size, mix):
the realised MACs ratio and the wall-time ratio. Plus batch-1 latency to exit 1 against its MACs share.

Targets: 50 % mix, batch 64: wall ratio <= 1.2 x MACs ratio; batch-1 latency to exit 1 <= 1.3 x its MACs share.
Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynsila import models
from dynsila.checkpoint import atomic_write_text
from dynsila.config import load_config
from dynsila.evaluate import thresholds_for_budget
from dynsila.flops import exit_costs
from dynsila.runner import EarlyExitRunner

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
PRESET = Path(__file__).resolve().parents[1] / "configs" / "cifar100" / "msdnet_baseline.yaml"
MIXES = (0.25, 0.50, 0.75)


def paired_ratio(fn: Callable[[], Any], baseline: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median over ``repeats`` of time(fn) / time(baseline), the two run back to back each time, so that the
    machine's drifting load cancels in each ratio."""
    ratios = []
    for _ in range(repeats):
        ratios.append(timed(fn, device, 1) / timed(baseline, device, 1))
    return statistics.median(ratios)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="early_exit_speed")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = models.build("msdnet", num_classes=100, **load_config(PRESET).model_kwargs()).eval()
    costs = [c.macs_cumulative for c in exit_costs(model, (3, 32, 32))]
    full = costs[-1]
    model.to(device)
    g = torch.Generator().manual_seed(0)
    calibration = torch.randn(1024, 3, 32, 32, generator=g).to(device)
    images = torch.randn(1280, 3, 32, 32, generator=g).to(device)
    with torch.no_grad():
        cal_logits = torch.cat([torch.stack(model(x), 1) for x in calibration.split(256)]).cpu()

    # The full network is timed in the runner's own inference form (batch-norm folded, channels-last), so the
    # ratios measure early exiting alone, not the layout; plain eager timing is reported for reference.
    prepared = EarlyExitRunner(model, [0.0] * len(costs), costs=costs).model
    layout = torch.channels_last

    def full_forward(x: torch.Tensor) -> None:
        with torch.no_grad():
            prepared(x.contiguous(memory_format=layout))

    rows, compaction_only, eager = [], [], {}
    for batch_size, n_images in ((64, 1280), (1, 64)):
        batches = images[:n_images].split(batch_size)

        def run_full(batches: tuple[torch.Tensor, ...] = batches) -> None:
            for x in batches:
                full_forward(x)

        def run_eager(batches: tuple[torch.Tensor, ...] = batches) -> None:
            with torch.no_grad():
                for x in batches:
                    model(x)

        full_seconds = timed(run_full, device, args.repeats)
        eager[batch_size] = {
            "full_seconds_prepared": full_seconds,
            "full_seconds_plain_eager": timed(run_eager, device, args.repeats),
            "images": n_images,
        }
        for fraction in MIXES:
            thresholds, _ = thresholds_for_budget(cal_logits, costs, fraction * full)
            runner = EarlyExitRunner(model, thresholds, costs=costs)
            result = runner.run_stream(batches)
            spent = float(result.macs.mean())
            histogram = torch.bincount(result.exit_index.cpu(), minlength=len(costs))

            def run_early(batches: tuple[torch.Tensor, ...] = batches, runner: EarlyExitRunner = runner) -> None:
                runner.run_stream(batches)

            def run_per_batch(batches: tuple[torch.Tensor, ...] = batches, runner: EarlyExitRunner = runner) -> None:
                for x in batches:
                    runner(x)

            early_seconds = timed(run_early, device, args.repeats)
            wall_ratio = paired_ratio(run_early, run_full, device, args.repeats)
            if batch_size > 1:
                compaction_only.append(
                    {
                        "batch_size": batch_size,
                        "target_fraction": fraction,
                        "wall_ratio": paired_ratio(run_per_batch, run_full, device, args.repeats),
                    }
                )
            rows.append(
                {
                    "batch_size": batch_size,
                    "target_fraction": fraction,
                    "macs_ratio": spent / full,
                    "wall_ratio": wall_ratio,
                    "images": n_images,
                    "full_seconds": full_seconds,
                    "early_exit_seconds": early_seconds,
                    "exit_histogram": histogram.tolist(),
                }
            )
            print(rows[-1], flush=True)

    # batch-1 latency to exit 1: every sample leaves at the first exit
    single = images[:64].split(1)
    to_exit1 = EarlyExitRunner(model, [-float("inf")] * len(costs), costs=costs)

    def run_exit1() -> None:
        for x in single:
            to_exit1(x)

    def run_full_single() -> None:
        for x in single:
            full_forward(x)

    exit1_ratio = paired_ratio(run_exit1, run_full_single, device, args.repeats * 2)
    exit1_share = costs[0] / full

    # Why a ratio exceeds 1: the time share of a truncated forward (model(x, upto=k), every exit up to k
    # evaluated, no runner involved) against its MACs share. Early layers work at the finest resolution, where
    # elementwise ops and concatenations (0 MACs) weigh most.
    time_share: dict[int, list[float]] = {}
    for batch_size, x in ((64, images[:64]), (1, images[:1])):
        x = x.contiguous(memory_format=layout)
        with torch.no_grad():
            time_share[batch_size] = [
                paired_ratio(lambda x=x, k=k: prepared(x, upto=k), lambda x=x: prepared(x), device, args.repeats * 4)
                for k in range(len(costs))
            ]

    for r in rows:  # what a runner with zero overhead would achieve with this exit mix
        share = time_share[r["batch_size"]]
        r["ideal_wall_ratio"] = sum(n * share[k] for k, n in enumerate(r["exit_histogram"])) / r["images"]
    half = next(r for r in rows if r["batch_size"] == 64 and r["target_fraction"] == 0.5)
    targets = {
        "batch64_mix50": {
            "wall_ratio": half["wall_ratio"],
            "limit": 1.2 * half["macs_ratio"],
            "met": half["wall_ratio"] <= 1.2 * half["macs_ratio"],
        },
        "batch1_exit1": {
            "latency_ratio": exit1_ratio,
            "macs_share": exit1_share,
            "limit": 1.3 * exit1_share,
            "met": exit1_ratio <= 1.3 * exit1_share,
        },
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    command = "python benchmarks/early_exit_speed.py" + ("" if argv is None else " " + " ".join(argv))
    result = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "device": f"{device.type}: {device_name}",
        "threads": args.threads,
        "torch": torch.__version__,
        "model": "msdnet CIFAR-100 b7, random weights, 32x32 inputs",
        "exit_macs_cumulative": costs,
        "rows": rows,
        "rows_single_batch_compaction": compaction_only,
        "full_network_seconds": eager,
        "truncated_forward_time_share": time_share,
        "macs_share": [c / full for c in costs],
        "targets": targets,
    }
    lines = [
        "# Early-exit wall time versus MACs",
        "",
        f"Command: `{command}`  ",
        f"Date: {result['date']}; device {result['device']}, {args.threads} threads; torch {torch.__version__}",
        "",
        "MSDNet CIFAR-100 b7 (random weights), full network = every exit evaluated for every image "
        f"({full / 1e6:.2f}M MACs). Ratios are early-exit / full, measured in one run "
        f"(median of {args.repeats} back-to-back pairs); "
        "both sides run the same inference form of the model (batch-norm folded, channels-last).",
        "",
        "| batch | target MACs share | realised MACs ratio | wall-time ratio | wall / MACs | ideal wall ratio | "
        "exit histogram |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['target_fraction']:.2f} | {r['macs_ratio']:.3f} | "
            f"{r['wall_ratio']:.3f} | {r['wall_ratio'] / r['macs_ratio']:.2f} | {r['ideal_wall_ratio']:.3f} | "
            f"{r['exit_histogram']} |"
        )
    lines += [
        "",
        "Without regrouping (each batch of 64 compacted on its own, later stages on small batches):",
        "",
        "| batch | target MACs share | wall-time ratio |",
        "| --- | --- | --- |",
    ]
    for r in compaction_only:
        lines.append(f"| {r['batch_size']} | {r['target_fraction']:.2f} | {r['wall_ratio']:.3f} |")
    lines += [
        "",
        "Time share of a truncated forward `model(x, upto=k)` (no runner; every exit up to k evaluated) against",
        "its MACs share; a mix's ideal wall ratio is the exit fractions times these time shares:",
        "",
        "| exit | MACs share | time share, batch 64 | time share, batch 1 |",
        "| --- | --- | --- | --- |",
    ]
    for k, c in enumerate(costs):
        lines.append(f"| {k + 1} | {c / full:.3f} | {time_share[64][k]:.3f} | {time_share[1][k]:.3f} |")
    t1, t2 = targets["batch64_mix50"], targets["batch1_exit1"]
    lines += [
        "",
        "Full network, seconds for the whole set: "
        + "; ".join(
            f"batch {b}: {v['full_seconds_prepared']:.3f} s folded + channels-last, "
            f"{v['full_seconds_plain_eager']:.3f} s plain eager ({v['images']} images)"
            for b, v in eager.items()
        )
        + ".",
    ]
    lines += [
        "",
        f"- Batch 64, 50 % mix: wall ratio {t1['wall_ratio']:.3f} against a limit of {t1['limit']:.3f} "
        f"(1.2 x MACs ratio): {'met' if t1['met'] else 'missed'}.",
        f"- Batch 1, latency to exit 1: {t2['latency_ratio']:.3f} of the full network against a limit of "
        f"{t2['limit']:.3f} (1.3 x its MACs share {t2['macs_share']:.3f}): {'met' if t2['met'] else 'missed'}.",
        "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.out}.json", json.dumps(result, indent=1))
    atomic_write_text(RESULTS / f"{args.out}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
