"""Does early exiting save wall time in proportion to MACs?

    python benchmarks/early_exit_speed.py [--device cpu|cuda] [--threads 2] [--out early_exit_speed] [--smoke]

MSDNet CIFAR-100 b7 (random weights: only timing matters). Thresholds are fitted on calibration inputs for exit
mixes spending about 25 %, 50 % and 75 % of the full network's MACs (every exit evaluated, as the public code
does); then other inputs go through ``EarlyExitRunner`` and through the full network, at batch 64 and batch 1.
Batch 64 uses ``run_stream`` (survivors of consecutive batches regrouped to 64 before each stage); the
single-batch call (compaction within each batch only) is reported beside it. Reported per (batch size, mix):
the realised MACs ratio and the wall-time ratio. Plus batch-1 latency to exit 1 against its MACs share.

Targets: 50 % mix, batch 64: wall ratio <= 1.2 x MACs ratio; batch-1 latency to exit 1 <= 1.3 x its MACs share.
Writes benchmarks/results/<out>.{json,md} (``--smoke``: a tiny MSDNet on a few images, written under
``--results-dir`` only, for tests).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/x.py` puts only benchmarks/ there

from benchmarks.toolkit import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    environment,
    header,
    paired_ratio,
    timed,
    verdict,
    write_results,
)
from dynsila import models
from dynsila.config import load_config
from dynsila.flops import exit_costs
from dynsila.runner import EarlyExitRunner
from dynsila.thresholds import thresholds_for_budget

PRESET = REPO_ROOT / "configs" / "cifar100" / "msdnet_baseline.yaml"
MIXES = (0.25, 0.50, 0.75)  # target shares of the full network's MACs
MAX_WALL_PER_MACS_MIX50 = 1.2  # batch 64, 50 % mix: wall-time ratio <= this x realised MACs ratio
MAX_LATENCY_PER_MACS_EXIT1 = 1.3  # batch 1: latency to exit 1 <= this x exit 1's MACs share
# --smoke: a 3-exit MSDNet small enough for a test (the timings mean nothing)
SMOKE_MODEL = {"n_blocks": 3, "step": 1, "base": 1, "n_channels": 4, "growth_rate": 4, "head_channels": 8}


@dataclass(frozen=True)
class Sizes:
    """How much is timed: (batch size, images) pairs (the first batched, the second batch 1), calibration
    images, and the number of back-to-back pairs behind each ratio."""

    batched: tuple[int, int] = (64, 1280)
    single: tuple[int, int] = (1, 64)
    calibration: int = 1024
    repeats: int = 7


SMOKE = Sizes(batched=(8, 16), single=(1, 4), calibration=64, repeats=1)


class Bench:
    """The model, its exit costs, the inputs and the inference form every timing uses."""

    def __init__(self, model: torch.nn.Module, device: torch.device, sizes: Sizes) -> None:
        self.model, self.device, self.sizes = model, device, sizes
        self.costs = [c.macs_cumulative for c in exit_costs(model, (3, 32, 32))]
        self.full = self.costs[-1]
        model.to(device)
        g = torch.Generator().manual_seed(0)
        calibration = torch.randn(sizes.calibration, 3, 32, 32, generator=g).to(device)
        n_images = max(sizes.batched[1], sizes.single[1])
        self.images = torch.randn(n_images, 3, 32, 32, generator=g).to(device)
        with torch.no_grad():
            self.cal_logits = torch.cat([torch.stack(model(x), 1) for x in calibration.split(256)]).cpu()
        # The full network is timed in the runner's own inference form (batch-norm folded, channels-last), so the
        # ratios measure early exiting alone, not the layout; plain eager timing is reported for reference.
        self.prepared = EarlyExitRunner(model, [0.0] * len(self.costs), costs=self.costs).model

    def full_forward(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.prepared(x.contiguous(memory_format=torch.channels_last))

    def ratio(self, fn: Any, baseline: Any, repeats: int) -> float:
        # one untimed run of each before each timed one, as this benchmark has always measured
        return paired_ratio(fn, baseline, self.device, repeats, warmup=1)


def mix_rows(bench: Bench) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Per (batch size, exit mix): realised MACs ratio and wall ratio of ``run_stream`` against the full network;
    the single-batch compaction ratio for the batched size; and the full network's seconds."""
    rows, compaction_only, eager = [], [], {}
    repeats = bench.sizes.repeats
    for batch_size, n_images in (bench.sizes.batched, bench.sizes.single):
        batches = bench.images[:n_images].split(batch_size)

        def run_full(batches: tuple[torch.Tensor, ...] = batches) -> None:
            for x in batches:
                bench.full_forward(x)

        def run_eager(batches: tuple[torch.Tensor, ...] = batches) -> None:
            with torch.no_grad():
                for x in batches:
                    bench.model(x)

        full_seconds = timed(run_full, bench.device, repeats)
        eager[batch_size] = {
            "full_seconds_prepared": full_seconds,
            "full_seconds_plain_eager": timed(run_eager, bench.device, repeats),
            "images": n_images,
        }
        for fraction in MIXES:
            thresholds, _ = thresholds_for_budget(bench.cal_logits, bench.costs, fraction * bench.full)
            runner = EarlyExitRunner(bench.model, thresholds, costs=bench.costs)
            result = runner.run_stream(batches)
            histogram = torch.bincount(result.exit_index.cpu(), minlength=len(bench.costs))

            def run_early(batches: tuple[torch.Tensor, ...] = batches, runner: EarlyExitRunner = runner) -> None:
                runner.run_stream(batches)

            def run_per_batch(batches: tuple[torch.Tensor, ...] = batches, runner: EarlyExitRunner = runner) -> None:
                for x in batches:
                    runner(x)

            early_seconds = timed(run_early, bench.device, repeats)
            wall_ratio = bench.ratio(run_early, run_full, repeats)
            if batch_size > 1:
                per_batch = bench.ratio(run_per_batch, run_full, repeats)
                compaction_only.append({"batch_size": batch_size, "target_fraction": fraction, "wall_ratio": per_batch})
            rows.append(
                {
                    "batch_size": batch_size,
                    "target_fraction": fraction,
                    "macs_ratio": float(result.macs.mean()) / bench.full,
                    "wall_ratio": wall_ratio,
                    "images": n_images,
                    "full_seconds": full_seconds,
                    "early_exit_seconds": early_seconds,
                    "exit_histogram": histogram.tolist(),
                }
            )
            print(rows[-1], flush=True)
    return rows, compaction_only, eager


def exit1_latency_ratio(bench: Bench) -> float:
    """Batch-1 latency when every sample leaves at the first exit, as a share of the full network's."""
    single = bench.images[: bench.sizes.single[1]].split(1)
    to_exit1 = EarlyExitRunner(bench.model, [-float("inf")] * len(bench.costs), costs=bench.costs)

    def run_exit1() -> None:
        for x in single:
            to_exit1(x)

    def run_full_single() -> None:
        for x in single:
            bench.full_forward(x)

    return bench.ratio(run_exit1, run_full_single, bench.sizes.repeats * 2)


def truncated_time_share(bench: Bench) -> dict[int, list[float]]:
    """Why a ratio exceeds 1: the time share of a truncated forward (model(x, upto=k), every exit up to k
    evaluated, no runner involved) per exit and batch size. Early layers work at the finest resolution, where
    elementwise ops and concatenations (0 MACs) weigh most."""
    time_share: dict[int, list[float]] = {}
    for batch_size in (bench.sizes.batched[0], bench.sizes.single[0]):
        x = bench.images[:batch_size].contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            time_share[batch_size] = [
                bench.ratio(
                    lambda x=x, k=k: bench.prepared(x, upto=k), lambda x=x: bench.prepared(x), bench.sizes.repeats * 4
                )
                for k in range(len(bench.costs))
            ]
    return time_share


def targets_of(rows: list[dict[str, Any]], batched: int, exit1_ratio: float, exit1_share: float) -> dict[str, Any]:
    half = next(r for r in rows if r["batch_size"] == batched and r["target_fraction"] == 0.5)
    limit_mix = MAX_WALL_PER_MACS_MIX50 * half["macs_ratio"]
    limit_exit1 = MAX_LATENCY_PER_MACS_EXIT1 * exit1_share
    return {
        f"batch{batched}_mix50": {
            "wall_ratio": half["wall_ratio"],
            "limit": limit_mix,
            "met": half["wall_ratio"] <= limit_mix,
        },
        "batch1_exit1": {
            "latency_ratio": exit1_ratio,
            "macs_share": exit1_share,
            "limit": limit_exit1,
            "met": exit1_ratio <= limit_exit1,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="early_exit_speed")
    parser.add_argument("--repeats", type=int, default=Sizes.repeats)
    parser.add_argument("--smoke", action="store_true", help="a tiny MSDNet on a few images (tests)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:  # one thread: on a loaded machine two OpenMP threads wait on each other longer than tiny ops take
        args.threads = 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    kwargs = load_config(PRESET).model_kwargs() | (SMOKE_MODEL if args.smoke else {})
    sizes = SMOKE if args.smoke else Sizes(repeats=args.repeats)
    bench = Bench(models.build("msdnet", num_classes=100, **kwargs).eval(), device, sizes)

    rows, compaction_only, eager = mix_rows(bench)
    exit1_ratio = exit1_latency_ratio(bench)
    time_share = truncated_time_share(bench)
    for r in rows:  # what a runner with zero overhead would achieve with this exit mix
        share = time_share[r["batch_size"]]
        r["ideal_wall_ratio"] = sum(n * share[k] for k, n in enumerate(r["exit_histogram"])) / r["images"]
    targets = targets_of(rows, sizes.batched[0], exit1_ratio, bench.costs[0] / bench.full)
    command, env = command_line(__file__, argv), environment(device, args.threads)
    result = {
        "command": command,
        "environment": env,
        "model": "msdnet CIFAR-100 b7, random weights, 32x32 inputs" if not args.smoke else f"msdnet {kwargs}",
        "exit_macs_cumulative": bench.costs,
        "rows": rows,
        "rows_single_batch_compaction": compaction_only,
        "full_network_seconds": eager,
        "truncated_forward_time_share": time_share,
        "macs_share": [c / bench.full for c in bench.costs],
        "targets": targets,
    }
    md = markdown(result, sizes)
    if not (args.smoke and args.results_dir == RESULTS_DIR):  # a smoke run never overwrites the committed result
        write_results(args.out, result, md, args.results_dir)
    print(md)
    return 0


def markdown(result: dict[str, Any], sizes: Sizes) -> str:
    costs, rows = result["exit_macs_cumulative"], result["rows"]
    full, batched = costs[-1], sizes.batched[0]
    time_share = result["truncated_forward_time_share"]
    lines = [
        *header("Early-exit wall time versus MACs", result["command"], result["environment"]),
        f"{result['model']}, full network = every exit evaluated for every image "
        f"({full / 1e6:.2f}M MACs). Ratios are early-exit / full, measured in one run "
        f"(median of {sizes.repeats} back-to-back pairs); "
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
        f"Without regrouping (each batch of {batched} compacted on its own, later stages on small batches):",
        "",
        "| batch | target MACs share | wall-time ratio |",
        "| --- | --- | --- |",
    ]
    for r in result["rows_single_batch_compaction"]:
        lines.append(f"| {r['batch_size']} | {r['target_fraction']:.2f} | {r['wall_ratio']:.3f} |")
    lines += [
        "",
        "Time share of a truncated forward `model(x, upto=k)` (no runner; every exit up to k evaluated) against",
        "its MACs share; a mix's ideal wall ratio is the exit fractions times these time shares:",
        "",
        f"| exit | MACs share | time share, batch {batched} | time share, batch 1 |",
        "| --- | --- | --- | --- |",
    ]
    for k, c in enumerate(costs):
        lines.append(f"| {k + 1} | {c / full:.3f} | {time_share[batched][k]:.3f} | {time_share[1][k]:.3f} |")
    t1, t2 = result["targets"][f"batch{batched}_mix50"], result["targets"]["batch1_exit1"]
    full_seconds = "; ".join(
        f"batch {b}: {v['full_seconds_prepared']:.3f} s folded + channels-last, "
        f"{v['full_seconds_plain_eager']:.3f} s plain eager ({v['images']} images)"
        for b, v in result["full_network_seconds"].items()
    )
    lines += [
        "",
        f"Full network, seconds for the whole set: {full_seconds}.",
        "",
        f"- Batch {batched}, 50 % mix: wall ratio {t1['wall_ratio']:.3f} against a limit of {t1['limit']:.3f} "
        f"({MAX_WALL_PER_MACS_MIX50} x MACs ratio): {verdict(t1['met'])}.",
        f"- Batch 1, latency to exit 1: {t2['latency_ratio']:.3f} of the full network against a limit of "
        f"{t2['limit']:.3f} ({MAX_LATENCY_PER_MACS_EXIT1} x its MACs share {t2['macs_share']:.3f}): "
        f"{verdict(t2['met'])}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
