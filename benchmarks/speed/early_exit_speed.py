"""Does early exiting save wall time in proportion to MACs, and what does lazy evaluation save?

    python benchmarks/speed/early_exit_speed.py [--device cpu|cuda] [--threads 2] [--out early_exit_speed] [--smoke]
                                          [--no-imagenet] [--run RUN_DIR] [--mix50-only] [--compile]

MSDNet CIFAR-100 b7 (random weights: only timing matters). Thresholds are fitted on calibration inputs for exit
mixes spending about 25 %, 50 % and 75 % of the full network's MACs in the paper's convention (every stage whole,
every exit up to the one taken: what the public code computes); then other inputs go through ``EarlyExitRunner``
and through the full network, at batch 64 and batch 1. Batch 64 uses ``run_stream`` (survivors of consecutive
batches regrouped to 64 before each stage); the single-batch call (compaction within each batch only) is
reported beside it. The runner evaluates lazily: the finer scales an exit does not read are computed only for the
samples that go on (``MultiExitNetwork.deferred_split``), so each row has two MACs ratios, the paper's and the
lazy one (what the samples really cost), and the eager runner (``deferred=False``) is timed beside it.

Also: per exit, what lazy evaluation saves against the eager truncated forward (MACs and wall time, CIFAR-100 b7
at batch 64 and 1, ImageNet step 4 at batch 1); and the cost of the runner's compaction copies, the old way
(boolean mask on every tensor of the stage's output) against the new (one index, whole rows, the pending state
only), on the states of a real run.

Targets: 50 % mix, batch 64: wall ratio <= 1.15 x the lazy MACs ratio and <= 1.02 x the ratio of a runner
with no overhead (the exit fractions times the measured per-exit lazy time shares), and below the paper's MACs
ratio (time that follows MACs); batch-1 latency to exit 1 <= 1.2 x its lazy MACs share. Every ratio is a median
of back-to-back pairs in one process, so that the load of a shared machine cancels as far as it can.
``--run RUN_DIR``: a trained run's deploy model instead (any family, e.g. a ViT), thresholds fitted on its
validation images and its test images timed (repeated where the stream needs more). ``--compile``: also the
batched 50 % mix with the runner's pieces and the full network compiled (``EarlyExitRunner(compile=True)``).
``--mix50-only``: only the batched 50 % mix (its wall ratio against its MACs ratios), for a short measurement
window on a busy machine.
Writes benchmarks/results/<out>.{json,md} (``--smoke``: a tiny MSDNet on a few images, written under
``--results-dir`` only, for tests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

import dynsila.deploy.runner as runner_module
from benchmarks.toolkit import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    environment,
    header,
    paired_ratio,
    paired_times,
    run_seconds,
    timed,
    verdict,
    write_results,
)
from dynsila import models
from dynsila.budget.flops import ExitCost, exit_costs
from dynsila.budget.thresholds import thresholds_for_budget
from dynsila.config import load_config
from dynsila.data import build_splits, dataset_size, make_loader, normalize
from dynsila.deploy.runner import EarlyExitRunner, raise_primitive_cache
from dynsila.runs.rundir import input_shape, load_deploy_model

PRESET = REPO_ROOT / "configs" / "cifar100" / "msdnet_baseline.yaml"
IMAGENET_PRESET = REPO_ROOT / "configs" / "imagenet" / "msdnet_baseline.yaml"
MIXES = (0.25, 0.50, 0.75)  # target shares of the full network's MACs (paper convention)
MAX_WALL_PER_LAZY_MACS_MIX50 = 1.15  # batch 64, 50 % mix: wall-time ratio <= this x realised lazy MACs ratio
MAX_WALL_PER_IDEAL_MIX50 = 1.02  # batch 64, 50 % mix: wall-time ratio <= this x a runner with zero overhead
MAX_LATENCY_PER_LAZY_MACS_EXIT1 = 1.2  # batch 1: latency to exit 1 <= this x exit 1's lazy MACs share
# --smoke: a 3-exit MSDNet small enough for a test (the timings mean nothing)
SMOKE_MODEL = {"n_blocks": 3, "step": 2, "base": 2, "n_channels": 4, "growth_rate": 4, "head_channels": 8}


@dataclass(frozen=True)
class Sizes:
    """How much is timed: (batch size, images) pairs (the first batched, the second batch 1), calibration
    images, the number of back-to-back pairs behind each ratio, and ImageNet images (batch 1; 0: skipped)."""

    batched: tuple[int, int] = (64, 640)
    single: tuple[int, int] = (1, 64)
    calibration: int = 1024
    repeats: int = 7
    imagenet_images: int = 4
    long_stream: int = 2560  # images of the batched 50 % mix timed again as a longer stream (0: skipped)


SMOKE = Sizes(batched=(8, 16), single=(1, 4), calibration=64, repeats=1, imagenet_images=0, long_stream=32)


class Bench:
    """The model, its exit costs, the inputs and the inference form every timing uses."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        sizes: Sizes,
        size: int = 32,
        inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``inputs``: (calibration, timed) images; random ones when not given."""
        self.model, self.device, self.sizes = model, device, sizes
        self.exit_costs: list[ExitCost] = exit_costs(model, (3, size, size))
        self.paper = [c.macs_cumulative for c in self.exit_costs]
        self.lazy = [c.macs_lazy for c in self.exit_costs]
        self.full = self.paper[-1]
        model.to(device)
        g = torch.Generator().manual_seed(0)
        n_images = max(sizes.batched[1], sizes.single[1], sizes.long_stream)
        calibration = torch.randn(sizes.calibration, 3, size, size, generator=g)
        self.images = torch.randn(n_images, 3, size, size, generator=g)
        if inputs is not None:
            calibration, timed = inputs
            self.images = timed.repeat(-(-n_images // len(timed)), 1, 1, 1)[:n_images]
        calibration, self.images = calibration.to(device), self.images.to(device)
        with torch.no_grad():
            self.cal_logits = torch.cat([torch.stack(model(x), 1) for x in calibration.split(256)]).cpu()
        # The full network is timed in the runner's own inference form (batch-norm folded, channels-last), so the
        # ratios measure early exiting alone, not the layout; plain eager timing is reported for reference.
        self.prepared = self.runner([0.0] * len(self.paper)).model

    def runner(self, thresholds: Sequence[float] | torch.Tensor, deferred: bool = True) -> EarlyExitRunner:
        return EarlyExitRunner(self.model, thresholds, costs=self.paper, deferred=deferred)

    def to_exit(self, k: int, deferred: bool = True) -> EarlyExitRunner:
        """A runner that sends every sample to exit ``k``: no compaction, exits 1..k evaluated."""
        k_exits = len(self.paper)
        return self.runner([float("inf")] * k + [-float("inf")] * (k_exits - k), deferred)

    def full_forward(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.prepared(x.contiguous(memory_format=torch.channels_last))

    def ratio(self, fn: Callable[[], Any], baseline: Callable[[], Any], repeats: int) -> float:
        """Median of ``repeats`` back-to-back (fn, baseline) pairs, after one untimed run of each."""
        fn(), baseline()
        return paired_ratio(fn, baseline, self.device, repeats)


def each(batches: tuple[torch.Tensor, ...], fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
    def run() -> None:
        for x in batches:
            fn(x)

    return run


def mix_row(bench: Bench, batches: tuple[torch.Tensor, ...], fraction: float, run_full: Any) -> dict[str, Any]:
    """One exit mix at one batch size: MACs ratios (paper, lazy) and wall ratios (lazy runner, eager runner)."""
    thresholds, _ = thresholds_for_budget(bench.cal_logits, bench.paper, fraction * bench.full)
    lazy, eager = bench.runner(thresholds), bench.runner(thresholds, deferred=False)
    result = lazy.run_stream(batches)
    histogram = torch.bincount(result.exit_index.cpu(), minlength=len(bench.paper))
    n_images = int(histogram.sum())
    repeats = bench.sizes.repeats
    row = {
        "batch_size": batches[0].shape[0],
        "target_fraction": fraction,
        "macs_ratio": float(result.macs.mean()) / bench.full,  # the paper's convention
        "lazy_macs_ratio": float(histogram.double() @ torch.tensor(bench.lazy).double()) / n_images / bench.full,
        **spread(bench, lambda: lazy.run_stream(batches), run_full, repeats * (3 if fraction == 0.5 else 1)),
        "eager_runner_wall_ratio": bench.ratio(lambda: eager.run_stream(batches), run_full, repeats),
        "images": n_images,
        "exit_histogram": histogram.tolist(),
    }
    if batches[0].shape[0] > 1:  # without regrouping: each batch compacted on its own
        row["per_batch_wall_ratio"] = bench.ratio(each(batches, lazy), run_full, repeats)
    print(row, flush=True)
    return row


def spread(bench: Bench, fn: Callable[[], Any], baseline: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """The paired wall ratio (median of ``repeats`` back-to-back pairs) and its quartiles over the pairs: on this
    machine the median of 5 pairs moves by several per cent from one call to the next, so a target row gets more
    pairs and shows its spread."""
    fn(), baseline()
    fn_times, baseline_times = paired_times(fn, baseline, bench.device, repeats)
    ratios = [a / b for a, b in zip(fn_times, baseline_times, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"wall_ratio": statistics.median(ratios), "wall_ratio_quartiles": [quartiles[0], quartiles[2]],
            "pairs": len(ratios)}  # fmt: skip


def mix_rows(bench: Bench) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Every (batch size, exit mix), and the full network's seconds per batch size."""
    rows, full_seconds = [], {}
    for batch_size, n_images in (bench.sizes.batched, bench.sizes.single):
        batches = bench.images[:n_images].split(batch_size)
        run_full = each(batches, bench.full_forward)
        full_seconds[batch_size] = {
            "full_seconds_prepared": timed(run_full, bench.device, bench.sizes.repeats),
            "full_seconds_plain_eager": timed(each(batches, bench.model), bench.device, bench.sizes.repeats),
            "images": n_images,
        }
        rows += [mix_row(bench, batches, fraction, run_full) for fraction in MIXES]
    return rows, full_seconds


def long_stream_row(bench: Bench) -> dict[str, Any] | None:
    """The batched 50 % mix again on a longer stream (``Sizes.long_stream`` images): the lazy runner's wall ratio.
    At the end of a stream every stage runs its last, partial group at a smaller batch, where an image costs more;
    a longer stream (a test set is thousands of images) shows how much of the short stream's ratio that is."""
    batch_size, n_images = bench.sizes.batched[0], bench.sizes.long_stream
    if n_images <= bench.sizes.batched[1]:
        return None
    batches = bench.images[:n_images].split(batch_size)
    thresholds, _ = thresholds_for_budget(bench.cal_logits, bench.paper, 0.5 * bench.full)
    lazy = bench.runner(thresholds)
    histogram = torch.bincount(lazy.run_stream(batches).exit_index.cpu(), minlength=len(bench.paper)).double()
    row = {
        "batch_size": batch_size,
        "images": n_images,
        "macs_ratio": float(histogram @ torch.tensor(bench.paper).double()) / n_images / bench.full,
        "lazy_macs_ratio": float(histogram @ torch.tensor(bench.lazy).double()) / n_images / bench.full,
        "wall_ratio": bench.ratio(lambda: lazy.run_stream(batches), each(batches, bench.full_forward), 5),
        "exit_histogram": histogram.long().tolist(),
    }
    print(row, flush=True)
    return row


def exit1_latency(bench: Bench) -> dict[str, float]:
    """Batch-1 latency when every sample leaves at the first exit, as a share of the full network's: lazy and
    eager runner."""
    single = bench.images[: bench.sizes.single[1]].split(1)
    run_full = each(single, bench.full_forward)
    repeats = bench.sizes.repeats * 2
    return {
        "latency_ratio": bench.ratio(each(single, bench.to_exit(0)), run_full, repeats),
        "eager_runner_latency_ratio": bench.ratio(each(single, bench.to_exit(0, deferred=False)), run_full, repeats),
    }


def per_exit_time_shares(bench: Bench, batch_size: int) -> dict[str, list[float]]:
    """Per exit k, the time share (of the full network) of reaching exit k and leaving there: eagerly (a
    truncated forward ``model(x, upto=k)``, every stage whole, no runner) and lazily (the runner with every sample
    leaving at k: the exit's stage computes only what its exit reads)."""
    x = bench.images[:batch_size].contiguous(memory_format=torch.channels_last)
    repeats = bench.sizes.repeats * 2

    def full() -> None:
        bench.full_forward(x)

    shares: dict[str, list[float]] = {"eager": [], "lazy": []}
    for k in range(len(bench.paper)):
        with torch.no_grad():
            shares["eager"].append(bench.ratio(lambda k=k: bench.prepared(x, upto=k), full, repeats))
        to_k = bench.to_exit(k)
        shares["lazy"].append(bench.ratio(lambda r=to_k: r(x), full, repeats))
    return shares


def lazy_vs_eager_per_exit(bench: Bench, batch_size: int, n_images: int) -> list[float]:
    """Per exit k: wall time of the lazy path to exit k over the eager runner's path to it (paired)."""
    batches = bench.images[:n_images].split(batch_size)
    ratios = []
    for k in range(len(bench.paper)):
        lazy, eager = bench.to_exit(k), bench.to_exit(k, deferred=False)
        ratios.append(bench.ratio(each(batches, lazy), each(batches, eager), bench.sizes.repeats * 2))
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    raise_primitive_cache()  # before the first convolution (oneDNN reads it then)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="early_exit_speed")
    parser.add_argument("--repeats", type=int, default=Sizes.repeats)
    parser.add_argument("--smoke", action="store_true", help="a tiny MSDNet on a few images (tests)")
    parser.add_argument("--no-imagenet", action="store_true", help="skip the ImageNet step-4 per-exit timings")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--run", type=Path, help="time this trained run's deploy model on its own images")
    parser.add_argument("--mix50-only", action="store_true", help="time only the batched 50 %% mix")
    parser.add_argument("--compile", action="store_true", help="also the 50 %% mix with compiled pieces (minutes)")
    args = parser.parse_args(argv)
    if args.smoke:  # one thread: on a loaded machine two OpenMP threads wait on each other longer than tiny ops take
        args.threads = 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    kwargs = load_config(PRESET).model_kwargs() | (SMOKE_MODEL if args.smoke else {})
    sizes = SMOKE if args.smoke else Sizes(repeats=args.repeats, imagenet_images=0 if args.no_imagenet else 4)
    if args.run is not None:
        bench, described = run_bench(args.run, device, sizes)
    else:
        bench = Bench(models.build("msdnet", num_classes=100, **kwargs).eval(), device, sizes)
        described = "msdnet CIFAR-100 b7, random weights, 32x32 inputs" if not args.smoke else f"msdnet {kwargs}"
    result = mix50(bench) if args.mix50_only else measure(bench, sizes)
    if not args.mix50_only:
        result["imagenet"] = imagenet_per_exit(device, sizes) if sizes.imagenet_images else None
        result["compiled"] = compiled_mix50(bench) if args.compile else None
    result |= {
        "command": command_line(__file__, argv),
        "environment": environment(device, args.threads),
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "model": described,
    }
    md = mix50_markdown(result, sizes) if args.mix50_only else markdown(result, sizes)
    if not (args.smoke and args.results_dir == RESULTS_DIR):  # a smoke run never overwrites the committed result
        write_results(args.out, result, md, args.results_dir)
    print(md)
    return 0


def run_bench(run_dir: Path, device: torch.device, sizes: Sizes) -> tuple[Bench, str]:
    """A trained run's deploy model with its validation images (calibration) and test images (timed)."""
    model, cfg = load_deploy_model(run_dir)
    splits = build_splits(cfg.data)
    val, test = (next(iter(make_loader(s, dataset_size(s), shuffle=False)))[0] for s in (splits.val, splits.test))
    inputs = (normalize(val, splits.mean, splits.std), normalize(test, splits.mean, splits.std))
    size = input_shape(cfg)[1]
    bench = Bench(model, device, replace(sizes, calibration=len(val)), size, inputs)
    described = (
        f"{cfg.model['name']} from the run {run_dir} (trained weights, {size}x{size} inputs); thresholds fitted on "
        f"its {len(val)} validation images, its {len(test)} test images timed"
    )
    return bench, described


def mix50(bench: Bench) -> dict[str, Any]:
    """Only the batched 50 % mix: its MACs ratios (paper, lazy) and wall ratios, against the full network."""
    batch_size, n_images = bench.sizes.batched
    batches = bench.images[:n_images].split(batch_size)
    row = mix_row(bench, batches, 0.5, each(batches, bench.full_forward))
    return {"exit_macs_cumulative": bench.paper, "exit_macs_lazy": bench.lazy, "rows": [row]}


def mix50_markdown(result: dict[str, Any], sizes: Sizes) -> str:
    r = result["rows"][0]
    load = result["load_average_1min"]
    lines = [
        *header("Early-exit wall time versus MACs: the 50 % mix", result["command"], result["environment"]),
        f"{result['model']}. Exit MACs as evaluated: "
        f"{', '.join(f'{m / 1e6:.2f}M' for m in result['exit_macs_cumulative'])}. Thresholds fitted for about 50 % "
        f"of the full network's MACs; batch {r['batch_size']} (`run_stream`), {r['images']} images; ratios are "
        f"early-exit / full network (every exit evaluated), medians of back-to-back pairs in one process "
        f"({sizes.repeats} pairs, the wall ratio {r['pairs']}). 1-minute load average {load['start']:.1f} at the "
        f"start, {load['end']:.1f} at the end.",
        "",
        "| MACs ratio, paper | MACs ratio, lazy | wall ratio (quartiles) | wall / lazy MACs | eager runner "
        "| per batch | exit histogram |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['macs_ratio']:.3f} | {r['lazy_macs_ratio']:.3f} | {r['wall_ratio']:.3f} "
        f"({r['wall_ratio_quartiles'][0]:.3f}–{r['wall_ratio_quartiles'][1]:.3f}) | "
        f"{r['wall_ratio'] / r['lazy_macs_ratio']:.2f} | {r['eager_runner_wall_ratio']:.3f} | "
        f"{r.get('per_batch_wall_ratio', float('nan')):.3f} | {r['exit_histogram']} |",
        "",
    ]
    return "\n".join(lines)


def measure(bench: Bench, sizes: Sizes) -> dict[str, Any]:
    """Everything timed on the CIFAR model."""
    rows, full_seconds = mix_rows(bench)
    exit1 = exit1_latency(bench)
    shares = {b: per_exit_time_shares(bench, b) for b in (sizes.batched[0], sizes.single[0])}
    long_row = long_stream_row(bench)
    for r in [*rows, *([long_row] if long_row else [])]:  # what a runner with zero overhead would achieve
        lazy_share = shares[r["batch_size"]]["lazy"]
        r["ideal_wall_ratio"] = sum(n * lazy_share[k] for k, n in enumerate(r["exit_histogram"])) / r["images"]
    return {
        "exit_macs_cumulative": bench.paper,
        "exit_macs_lazy": bench.lazy,
        "rows": rows,
        "long_stream": long_row,
        "full_network_seconds": full_seconds,
        "time_shares": shares,
        "lazy_over_eager_per_exit": {  # one batch of the batched size; a quarter of the batch-1 images
            b: lazy_vs_eager_per_exit(bench, b, n)
            for b, n in ((sizes.batched[0], sizes.batched[0]), (sizes.single[0], max(1, sizes.single[1] // 4)))
        },
        "compaction": compaction_costs(bench, sizes.batched),
        "macs_share": [c / bench.full for c in bench.paper],
        "lazy_macs_share": [c / bench.full for c in bench.lazy],
        "targets": targets_of(rows, sizes.batched[0], exit1, bench.lazy[0] / bench.full, bench.paper[0] / bench.full),
    }


def compiled_mix50(bench: Bench) -> dict[str, Any]:
    """The batched 50 % mix with every piece the runner calls compiled (``EarlyExitRunner(compile=True)``),
    against the full network compiled the same way (inductor, dynamic batch size, frozen weights) and against the
    eager forms; the first stream's seconds include the compiling."""
    batch_size, n_images = bench.sizes.batched
    batches = bench.images[:n_images].split(batch_size)
    thresholds, _ = thresholds_for_budget(bench.cal_logits, bench.paper, 0.5 * bench.full)
    eager = bench.runner(thresholds)
    compiled = EarlyExitRunner(bench.model, thresholds, costs=bench.paper, compile=True)
    full = torch.compile(bench.prepared, dynamic=True, options={"freezing": True})
    channels_last = [x.contiguous(memory_format=torch.channels_last) for x in batches]

    def full_compiled() -> None:
        with torch.no_grad():
            for x in channels_last:
                full(x)

    def first_calls() -> None:  # every piece compiles on its first call
        first = compiled.run_stream(batches).exit_index
        same.append(torch.equal(first, eager.run_stream(batches).exit_index))
        full_compiled()

    same: list[bool] = []
    compile_seconds = run_seconds(first_calls, bench.device)
    run_full, repeats = each(batches, bench.full_forward), bench.sizes.repeats
    row = {
        "batch_size": batch_size,
        "compile_seconds": compile_seconds,
        "decisions_equal_eager_runner": same[0],
        "compiled_runner_over_compiled_full": bench.ratio(lambda: compiled.run_stream(batches), full_compiled, repeats),
        "eager_runner_over_eager_full": bench.ratio(lambda: eager.run_stream(batches), run_full, repeats),
        "compiled_runner_over_eager_runner": bench.ratio(
            lambda: compiled.run_stream(batches), lambda: eager.run_stream(batches), repeats
        ),
        "compiled_full_over_eager_full": bench.ratio(full_compiled, run_full, repeats),
    }
    print(row, flush=True)
    return row


def _compiled_lines(row: dict[str, Any] | None) -> list[str]:
    if row is None:
        return []
    return [
        f"Compiled (`EarlyExitRunner(compile=True)`: stem, stage halves and exit heads each through inductor with a "
        f"dynamic batch size and frozen weights; the full network compiled the same way), batch {row['batch_size']}, "
        f"50 % mix, paired medians: compiled runner / compiled full network "
        f"{row['compiled_runner_over_compiled_full']:.3f} (eager forms: "
        f"{row['eager_runner_over_eager_full']:.3f}); compiled runner / eager runner "
        f"{row['compiled_runner_over_eager_runner']:.3f}; compiled full network / eager full network "
        f"{row['compiled_full_over_eager_full']:.3f}. Compiling took {row['compile_seconds']:.0f} s; exit decisions "
        f"equal the eager runner's: {row['decisions_equal_eager_runner']}.",
        "",
    ]


def targets_of(
    rows: list[dict[str, Any]], batched: int, exit1: dict[str, float], lazy_share: float, paper_share: float
) -> dict[str, Any]:
    half = next(r for r in rows if r["batch_size"] == batched and r["target_fraction"] == 0.5)
    limit_mix = MAX_WALL_PER_LAZY_MACS_MIX50 * half["lazy_macs_ratio"]
    limit_exit1 = MAX_LATENCY_PER_LAZY_MACS_EXIT1 * lazy_share
    return {
        f"batch{batched}_mix50": {
            "wall_ratio": half["wall_ratio"],
            "quartiles": half["wall_ratio_quartiles"],
            "pairs": half["pairs"],
            "lazy_macs_ratio": half["lazy_macs_ratio"],
            "paper_macs_ratio": half["macs_ratio"],
            "limit": limit_mix,
            "met": half["wall_ratio"] <= limit_mix,
            "ideal_wall_ratio": half["ideal_wall_ratio"],
            "ideal_limit": MAX_WALL_PER_IDEAL_MIX50 * half["ideal_wall_ratio"],
            "ideal_met": half["wall_ratio"] <= MAX_WALL_PER_IDEAL_MIX50 * half["ideal_wall_ratio"],
            "stretch_met": half["wall_ratio"] < half["macs_ratio"],
        },
        "batch1_exit1": {
            **exit1,
            "macs_share": paper_share,
            "lazy_macs_share": lazy_share,
            "limit": limit_exit1,
            "met": exit1["latency_ratio"] <= limit_exit1,
        },
    }


# --- the runner's compaction copies, old and new ----------------------------------------------------------------


def compaction_costs(bench: Bench, batched: tuple[int, int]) -> dict[str, Any]:
    """The compaction copies of a real run (50 % mix, each batch compacted on its own), in three forms, timed on
    the captured states (seconds summed over the run, median of paired repeats):

    - old: the eager runner's states (each stage's whole output) indexed with a boolean mask per tensor, as the
      runner did before (each index computes its own nonzero);
    - rows: the same states, gathered as whole rows with one index tensor (``dynsila.runner._rows``);
    - lazy: what the runner does now, rows of the lazy runner's pending states (only what a later computation
      reads: the deferred part's inputs, or the next stage's)."""
    thresholds, _ = thresholds_for_budget(bench.cal_logits, bench.paper, 0.5 * bench.full)
    batches = bench.images[: batched[1]].split(batched[0])
    eager, lazy = (_captured(bench.runner(thresholds, deferred), batches) for deferred in (False, True))
    masks = [(tree, _mask(tree, index)) for tree, index in eager]

    def old() -> None:
        for tree, mask in masks:
            tree_map(lambda t, m=mask: t[m], tree)

    def rows(captured: list[tuple[Any, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:  # each copy dropped at once, as in `old` and in the runner (no heap growth to time)
            for tree, index in captured:
                runner_module._select(tree, index)

        return run

    t_old, t_rows = paired_times(old, rows(eager), bench.device, 7, warmup=1)
    t_rows2, t_lazy = paired_times(rows(eager), rows(lazy), bench.device, 7, warmup=1)
    runner = bench.runner(thresholds)
    with_rows, with_indexing = (
        _with_gather(gather, lambda: runner.run_stream(batches)) for gather in (runner_module._rows, _advanced)
    )
    end_to_end = bench.ratio(with_rows, with_indexing, bench.sizes.repeats * 2)
    return {
        "batch_size": batched[0],
        "end_to_end_rows_over_advanced_indexing": end_to_end,
        "compactions": len(eager),
        "old_seconds": statistics.median(t_old),
        "rows_seconds": statistics.median(t_rows),
        "lazy_rows_seconds": statistics.median(t_lazy),
        "rows_over_old": statistics.median(r / o for r, o in zip(t_rows, t_old, strict=True)),
        "lazy_over_rows": statistics.median(z / r for z, r in zip(t_lazy, t_rows2, strict=True)),
        "old_megabytes": sum(_bytes(tree) for tree, _ in eager) / 1e6,
        "lazy_megabytes": sum(_bytes(tree) for tree, _ in lazy) / 1e6,
    }


def _captured(runner: EarlyExitRunner, batches: tuple[torch.Tensor, ...]) -> list[tuple[Any, torch.Tensor]]:
    """Every (state, index of the samples that stay) the runner compacts while running ``batches``."""
    captured: list[tuple[Any, torch.Tensor]] = []
    original, depth = runner_module._select, [0]

    def capture(tree: Any, index: torch.Tensor) -> Any:
        if depth[0] == 0:
            captured.append((tree, index))
        depth[0] += 1
        try:
            return original(tree, index)
        finally:
            depth[0] -= 1

    runner_module._select = capture
    try:
        for x in batches:
            runner(x)
    finally:
        runner_module._select = original
    return captured


def _advanced(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return t[index]


def _with_gather(gather: Callable[..., torch.Tensor], run: Callable[[], Any]) -> Callable[[], None]:
    """``run`` with the runner's row gather replaced by ``gather`` for its duration."""

    def go() -> None:
        original = runner_module._rows
        runner_module._rows = gather
        try:
            run()
        finally:
            runner_module._rows = original

    return go


def _mask(tree: Any, index: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(int(tree_leaves(tree)[0].shape[0]), dtype=torch.bool)
    mask[index] = True
    return mask


def _bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


# --- ImageNet step 4 --------------------------------------------------------------------------------------------


def imagenet_per_exit(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """ImageNet step 4 (random weights, 224 x 224): per exit, MACs as evaluated and lazy, and the wall time of
    the lazy path to the exit over the eager runner's (batch 1, paired)."""
    torch.manual_seed(0)
    model = models.build("msdnet", num_classes=1000, **load_config(IMAGENET_PRESET).model_kwargs()).eval()
    bench = Bench(model, device, Sizes(batched=(1, 1), single=(1, sizes.imagenet_images), calibration=8), 224)
    ratios = lazy_vs_eager_per_exit(bench, 1, sizes.imagenet_images)
    return {"exit_macs_cumulative": bench.paper, "exit_macs_lazy": bench.lazy, "lazy_over_eager_batch1": ratios}


# --- the report -------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any], sizes: Sizes) -> str:
    batched = sizes.batched[0]
    lines = [
        *header("Early-exit wall time versus MACs", result["command"], result["environment"]),
        *_setup_lines(result, sizes),
        *_mix_table(result, batched),
        *_long_stream_lines(result.get("long_stream")),
        *_per_exit_table(result, batched),
        *_compaction_lines(result["compaction"]),
        *_imagenet_lines(result["imagenet"]),
        *_compiled_lines(result.get("compiled")),
        *_target_lines(result["targets"], batched),
    ]
    return "\n".join(lines)


def _setup_lines(result: dict[str, Any], sizes: Sizes) -> list[str]:
    full = result["exit_macs_cumulative"][-1]
    load, threads = result["load_average_1min"], result["environment"].get("threads", "?")
    seconds = "; ".join(
        f"batch {b}: {v['full_seconds_prepared']:.3f} s folded + channels-last, "
        f"{v['full_seconds_plain_eager']:.3f} s plain eager ({v['images']} images)"
        for b, v in result["full_network_seconds"].items()
    )
    return [
        f"{result['model']}; the full network evaluates every exit for every image ({full / 1e6:.2f}M MACs). Ratios "
        f"are early-exit / full, medians of {sizes.repeats} back-to-back pairs in one process; both sides run the "
        "same inference form of the model (batch-norm folded, channels-last). MACs ratios: *paper* = as evaluated "
        "(every stage whole, every exit up to the one taken), *lazy* = what the samples really cost with the "
        "finer scales an exit does not read computed only for the samples that go on (what the runner does).",
        "",
        f"1-minute load average of the machine: {load['start']:.1f} at the start, {load['end']:.1f} at the end, "
        f"with {threads} benchmark thread(s) (a load above that means other work shared the cores). Only the paired "
        "ratios are worth quoting; absolute seconds drift with the load. Full network, seconds for the whole "
        f"set: {seconds}.",
        "",
    ]


def _mix_table(result: dict[str, Any], batched: int) -> list[str]:
    lines = [
        f"Exit mixes (batch {batched}: `run_stream`, survivors regrouped to {batched}; batch 1: one image at a "
        "time). *eager runner*: the same runner without lazy evaluation; *per batch*: each batch compacted on its "
        "own; *ideal*: the exit fractions times the lazy per-exit time shares below (a runner with no overhead).",
        "",
        "| batch | target | MACs ratio, paper | MACs ratio, lazy | wall ratio | wall / lazy MACs | eager runner "
        "| per batch | ideal | exit histogram |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        per_batch = f"{r['per_batch_wall_ratio']:.3f}" if "per_batch_wall_ratio" in r else "-"
        lines.append(
            f"| {r['batch_size']} | {r['target_fraction']:.2f} | {r['macs_ratio']:.3f} | {r['lazy_macs_ratio']:.3f} "
            f"| {r['wall_ratio']:.3f} | {r['wall_ratio'] / r['lazy_macs_ratio']:.2f} | "
            f"{r['eager_runner_wall_ratio']:.3f} | {per_batch} | {r['ideal_wall_ratio']:.3f} | {r['exit_histogram']} |"
        )
    return [*lines, ""]


def _long_stream_lines(r: dict[str, Any] | None) -> list[str]:
    if r is None:
        return []
    return [
        f"The batch-{r['batch_size']} 50 % mix on a longer stream ({r['images']} images, median of 5 pairs; the "
        "end-of-stream partial groups, run at smaller batches, weigh less): MACs ratio paper "
        f"{r['macs_ratio']:.3f}, lazy {r['lazy_macs_ratio']:.3f}; wall ratio {r['wall_ratio']:.3f} "
        f"({r['wall_ratio'] / r['lazy_macs_ratio']:.2f} x the lazy MACs ratio; ideal {r['ideal_wall_ratio']:.3f}); "
        f"exit histogram {r['exit_histogram']}.",
        "",
    ]


def _per_exit_table(result: dict[str, Any], batched: int) -> list[str]:
    paper, lazy = result["exit_macs_cumulative"], result["exit_macs_lazy"]
    shares, saved = result["time_shares"], result["lazy_over_eager_per_exit"]
    lines = [
        "Per exit: MACs of a sample leaving there (paper, lazy), and the time share of the full network of reaching "
        "the exit and leaving there, eagerly (a truncated forward `model(x, upto=k)`, no runner) and lazily (the "
        "runner with every sample leaving at k); *lazy / eager*: the lazy path's wall time over the eager runner's "
        "path to the same exit (paired; what lazy evaluation saves in time).",
        "",
        f"| exit | MACs paper | MACs lazy | lazy / paper | share eager, b{batched} | share lazy, b{batched} "
        f"| lazy / eager, b{batched} | share eager, b1 | share lazy, b1 | lazy / eager, b1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    big, one = shares[batched], shares[1]
    for k, (p, z) in enumerate(zip(paper, lazy, strict=True)):
        lines.append(
            f"| {k + 1} | {p / 1e6:.2f}M | {z / 1e6:.2f}M | {z / p:.3f} | {big['eager'][k]:.3f} | "
            f"{big['lazy'][k]:.3f} | {saved[batched][k]:.3f} | {one['eager'][k]:.3f} | {one['lazy'][k]:.3f} | "
            f"{saved[1][k]:.3f} |"
        )
    return [*lines, ""]


def _compaction_lines(c: dict[str, Any]) -> list[str]:
    return [
        f"Compaction copies of one run (50 % mix, batch by batch, {c['compactions']} compactions): the old way "
        f"(boolean mask on every tensor of each stage's whole output, {c['old_megabytes']:.0f} MB) "
        f"{c['old_seconds'] * 1e3:.1f} ms; whole rows by one index on the same states {c['rows_seconds'] * 1e3:.1f} "
        f"ms (paired ratio {c['rows_over_old']:.2f}); whole rows of the lazy runner's pending states only "
        f"({c['lazy_megabytes']:.0f} MB) {c['lazy_rows_seconds'] * 1e3:.1f} ms (ratio to the previous "
        f"{c['lazy_over_rows']:.2f}). End to end (batch {c['batch_size']}, 50 % mix, `run_stream`), the runner with "
        f"the row gather over the same runner with advanced indexing `t[index]`: "
        f"{c['end_to_end_rows_over_advanced_indexing']:.3f} (paired).",
        "",
    ]


def _imagenet_lines(imagenet: dict[str, Any] | None) -> list[str]:
    if imagenet is None:
        return ["ImageNet step 4: not measured in this run.", ""]
    lines = [
        "ImageNet step 4 (random weights, 224 x 224, batch 1): per exit, MACs of a sample leaving there and the "
        "lazy path's wall time over the eager runner's (paired).",
        "",
        "| exit | MACs paper | MACs lazy | lazy / paper | wall lazy / eager |",
        "| --- | --- | --- | --- | --- |",
    ]
    columns = ("exit_macs_cumulative", "exit_macs_lazy", "lazy_over_eager_batch1")
    rows = zip(*(imagenet[c] for c in columns), strict=True)
    for k, (p, z, t) in enumerate(rows):
        lines.append(f"| {k + 1} | {p / 1e6:.1f}M | {z / 1e6:.1f}M | {z / p:.3f} | {t:.3f} |")
    return [*lines, ""]


def _target_lines(targets: dict[str, Any], batched: int) -> list[str]:
    t1, t2 = targets[f"batch{batched}_mix50"], targets["batch1_exit1"]
    return [
        f"- Batch {batched}, 50 % mix: wall ratio {t1['wall_ratio']:.3f} (quartiles {t1['quartiles'][0]:.3f}–"
        f"{t1['quartiles'][1]:.3f} over {t1['pairs']} pairs) against a limit of {t1['limit']:.3f} "
        f"({MAX_WALL_PER_LAZY_MACS_MIX50} x the lazy MACs ratio {t1['lazy_macs_ratio']:.3f}): "
        f"{verdict(t1['met'])}. Against a runner with no overhead (ideal {t1['ideal_wall_ratio']:.3f}): limit "
        f"{t1['ideal_limit']:.3f} ({MAX_WALL_PER_IDEAL_MIX50} x), {verdict(t1['ideal_met'])}. Below the paper's MACs "
        f"ratio {t1['paper_macs_ratio']:.3f} (time that follows MACs): {verdict(t1['stretch_met'])}.",
        f"- Batch 1, latency to exit 1: {t2['latency_ratio']:.3f} of the full network (eager runner "
        f"{t2['eager_runner_latency_ratio']:.3f}) against a limit of {t2['limit']:.3f} "
        f"({MAX_LATENCY_PER_LAZY_MACS_EXIT1} x its lazy MACs share {t2['lazy_macs_share']:.3f}; paper share "
        f"{t2['macs_share']:.3f}): {verdict(t2['met'])}.",
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
