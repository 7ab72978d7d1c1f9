"""The device check: dynsila's training, evaluation and early-exit speed on one GPU, in one command.

    python benchmarks/speed/gpu_check.py [--device cuda] [--budget-s 420] [--parts train64,runner,...] [--smoke]

Measured in one process, every timing CUDA-synchronised (``benchmarks/toolkit.py``) and after warm-up (the first
epoch or pass, compilation included, is reported apart), on random weights and synthetic data (speed depends on
neither), in this order (``--parts`` picks some):

- ``train64``: MSDNet CIFAR-100 b7 (``configs/cifar100/msdnet_baseline.yaml``) training img/s at batch 64 (the
  paper's): a plain eager loop (CPU DataLoader with CPU augmentation, ``loss.item()`` every step, fp32, NCHW)
  against dynsila's own training loop with every performance option this checkout has (no per-step host sync,
  data on the device, channels-last, bf16 autocast, torch.compile); see ``benchmarks/speed/gpu_training.py``.
- ``runner``: ``EarlyExitRunner`` wall time against MACs at exit mixes spending 25 / 50 / 75 % of the full
  network's MACs, batch 256 (``benchmarks/speed/early_exit_speed.py``'s ``Bench`` and ``mix_rows``).
- ``sila``: SiLa's training step-time overhead, baseline and SiLa epochs alternated, both on the optimised path.
- ``skipnet``: SkipNet-110 (recurrent gates) evaluation with half the gate decisions skipping against every block
  executed (``benchmarks/speed/skip_speed.py``'s threshold bisection), batch 256.
- ``ablation``: dynsila's options switched on one after another at batch 64 (each one's contribution).
- ``eval``: MSDNet evaluation img/s, batch 256: eager fp32 NCHW, channels-last, bf16, batch-norm folded, compiled
  (and compiled with CUDA graphs).
- ``train256``: the two ends of ``train64`` at batch 256.

Targets (on one H100, ratios in one process): optimised training >= 2x the plain loop's img/s at batch
64; SiLa step-time overhead <= 5 %; runner at the 50 % mix, batch 256: wall ratio <= 1.3 x the MACs ratio.

Parts run in that priority order under a time budget (``--budget-s``): a part that would not fit is recorded as
skipped with the reason, and the results are rewritten after every part, so a timeout still leaves what was done;
a second run with ``--parts`` and another ``--out`` fills in what was skipped. MACs are counted with fvcore
(``dynsila.flops``) when it is installed, else with ``torch.utils.flop_counter`` (the output says which); the
parts that need ``dynsila.train``, ``early_exit_speed`` or ``skip_speed`` (all three import fvcore) are skipped
without it, naming the reason. Writes ``benchmarks/results/gpu.{json,md}`` (``--out``, ``--results-dir``);
``--smoke``: tiny models on the CPU in seconds, no compilation (CI), written under ``--results-dir`` only.

Run ``python benchmarks/speed/gpu_check.py`` on a CUDA machine from the repository root, with fvcore installed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.speed import gpu_training as training
from benchmarks.toolkit import (
    RESULTS_DIR,
    command_line,
    environment,
    header,
    paired_times,
    run_seconds,
    timed,
    verdict,
    write_results,
)
from dynsila import models
from dynsila.config import load_config
from dynsila.deploy.fuse import fold_batchnorm
from dynsila.models import MultiExitNetwork

TARGET_TRAIN_SPEEDUP = 2.0  # dynsila's optimised training img/s / the plain eager loop's, batch 64: at least this
MAX_SILA_STEP_OVERHEAD = 0.05  # SiLa training step time / baseline step time, optimised path: at most 1 + this
MAX_WALL_PER_MACS_MIX50 = 1.3  # runner, 50 % mix, batch 256: wall-time ratio at most this x the MACs ratio
DEFAULT_BUDGET_S = 420.0  # seconds: the check ends within 8 minutes (the device command passes less)
COMPILE_GUESS_S = 120.0  # what a compiled training run's first epoch is assumed to take until one is measured
FVCORE_PACKAGES = {"fvcore", "iopath", "yacs", "termcolor"}  # fvcore and what it needs, missing on the device
SMOKE_NOTE = "Smoke run: tiny models on the CPU, a few steps; the numbers mean nothing. "
CUDA_SETTINGS = ("cuda", "cudnn", "cudnn_benchmark", "tf32_convolutions", "tf32_matmul")  # in the environment
# Priority order: the three targets first (the runner's is cheap), then the cheap parts, then those that compile.
PARTS = ("train64", "runner", "sila", "skipnet", "ablation", "eval", "train256")


@dataclass(frozen=True)
class Plan:
    """How much each part measures."""

    batches: tuple[int, int] = (64, 256)  # training: the paper's batch, and a GPU-sized one
    images_per_epoch: int = 6400  # synthetic training images: 100 steps an epoch at 64, 25 at 256
    timed_epochs: int = 1  # after the first epoch (compilation), per training row
    sila_pairs: int = 4  # baseline / SiLa epoch pairs behind the overhead ratio
    eval_batch: int = 256
    eval_batches: int = 10
    repeats: int = 5  # timed runs (or back-to-back pairs) behind each evaluation or runner figure
    runner_batched: tuple[int, int] = (256, 2048)  # (batch size, images) of the early-exit mixes
    runner_single: tuple[int, int] = (1, 8)  # and at batch 1 (Bench measures both; kept small here)
    runner_calibration: int = 2048
    skip_depth: int = 110
    skip_batch: int = 256
    skip_batches: int = 4
    bisection_steps: int = 20
    compile: bool = True


SMOKE = Plan(
    batches=(8, 16),
    images_per_epoch=32,
    sila_pairs=1,
    eval_batch=8,
    eval_batches=2,
    repeats=1,
    runner_batched=(8, 16),
    runner_single=(1, 4),
    runner_calibration=64,
    skip_depth=38,
    skip_batch=8,
    skip_batches=2,
    bisection_steps=3,
    compile=False,  # inductor on a loaded 2-core CPU takes minutes: the smoke run checks everything else
)


class Check:
    """The run's settings, its clock and its results so far (rewritten to disk after every part)."""

    def __init__(self, args: argparse.Namespace, plan: Plan, device: torch.device, workdir: Path) -> None:
        self.args, self.plan, self.device = args, plan, device
        self.start = time.perf_counter()
        self.compile_seconds = COMPILE_GUESS_S
        self.kept: dict[str, training.Epochs] = {}  # runs a later part reuses (the optimised batch-64 run)
        self.optimised_options: tuple[str, ...] | None = None  # what that run was built with
        self.setup = training.Setup(
            data=training.write_synthetic_cifar(workdir / "synthetic.npz", plan.images_per_epoch),
            device=device.type,
            workers=0 if args.smoke else 4,  # the preset's data.num_workers
            out_dir=workdir / "runs",
            smoke=args.smoke,
        )
        self.result: dict[str, Any] = {
            "command": command_line(__file__, args.argv),
            "environment": environment(device) | device_settings(device),
            "plan": asdict(plan),
            "budget_seconds": args.budget_s,
            "smoke": args.smoke,
            "complete": False,
            "parts": {},
        }

    def seconds_left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def too_long(self, need: float) -> str | None:
        """Why a step needing about ``need`` seconds is skipped, or None when it fits the budget."""
        left = self.seconds_left()
        return (
            None if need <= left else f"time budget: {left:.0f} s left of {self.args.budget_s:.0f}, needs ~{need:.0f}"
        )

    def save(self) -> None:
        self.result["elapsed_seconds"] = time.perf_counter() - self.start
        self.result["targets"] = targets_of(self.result["parts"])
        if not (self.args.smoke and self.args.results_dir == RESULTS_DIR):  # a smoke run keeps committed files
            write_results(self.args.out, self.result, markdown(self.result), self.args.results_dir)


def device_settings(device: torch.device) -> dict[str, Any]:
    """What else decides a GPU timing: CUDA and cuDNN versions and the settings every row runs with."""
    if device.type != "cuda":
        return {}
    return {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_convolutions": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:400]


def needs_fvcore(e: ImportError) -> bool:
    return (e.name or "").split(".")[0] in FVCORE_PACKAGES


# --- costs --------------------------------------------------------------------------------------------------


def exit_macs(model: MultiExitNetwork) -> tuple[list[int], str]:
    """Per-exit MACs as evaluated (classifiers 1..k included), conv+linear, batch 1, and the counter used:
    fvcore through ``dynsila.flops`` when installed, else ``torch.utils.flop_counter`` (2 FLOPs per MAC; it
    counts exactly the convolutions and matrix products that run, which is dynsila's conv+linear convention)."""
    try:
        from dynsila.budget.flops import exit_costs
    except ImportError as e:
        if not needs_fvcore(e):
            raise
        return flop_counter_exit_macs(model), "torch.utils.flop_counter (fvcore not installed)"
    return [c.macs_cumulative for c in exit_costs(model, (3, 32, 32))], "fvcore (dynsila.flops.exit_costs)"


def flop_counter_exit_macs(model: MultiExitNetwork) -> list[int]:
    from torch.utils.flop_counter import FlopCounterMode

    x, macs = torch.zeros(1, 3, 32, 32), []
    with torch.no_grad():
        for k in range(model.num_exits):
            with FlopCounterMode(display=False) as counter:
                model(x, upto=k)
            macs.append(counter.get_total_flops() // 2)
    return macs


def msdnet(check: Check) -> MultiExitNetwork:
    """MSDNet CIFAR-100 b7 (the smoke model with ``--smoke``), random weights, on the CPU."""
    torch.manual_seed(0)
    kwargs = load_config(training.PRESETS[False]).model_kwargs()
    kwargs |= training.SMOKE_MODEL if check.args.smoke else {}
    return cast(MultiExitNetwork, models.build("msdnet", num_classes=100, **kwargs))


# --- training -----------------------------------------------------------------------------------------------


def optimised_options(check: Check) -> tuple[tuple[str, ...], list[str]]:
    """Every option of the stack this checkout has (compile only when the plan compiles), and what is left out."""
    options: list[str] = []
    left_out = []
    for label, row in training.STACK:
        if "train.compile=true" in row and not check.plan.compile:
            left_out.append(f"{label}: not in the smoke run")
        elif missing := training.missing_keys(row):
            left_out.append(f"{label}: this checkout's config has no {', '.join(missing)}")
        else:
            options += row
    return tuple(options), left_out


def training_row(
    check: Check, name: str, make: Callable[[], training.Epochs]
) -> tuple[dict[str, Any], training.Epochs | None]:
    """One training row and its run; a failure (a compiler missing on the machine) is a row naming the error."""
    try:
        epochs = make()
        row = {"name": name} | training.throughput(epochs, check.device, check.plan.timed_epochs)
    except Exception as e:  # one broken row must not lose the others (CUDA out-of-memory included)
        if isinstance(e, ImportError) and needs_fvcore(e):
            raise
        print(f"{name}: {error_line(e)}", flush=True)
        return {"name": name, "error": error_line(e)}, None
    print(row, flush=True)
    return row, epochs


def dynsila_row(
    check: Check, name: str, batch: int, options: Sequence[str]
) -> tuple[dict[str, Any], training.Epochs | None]:
    """A dynsila training row with ``options``; a compiled one records its first epoch as the compile time."""
    compiled = "train.compile=true" in options
    if compiled:
        torch._dynamo.reset()  # each compiled run starts clean: no dynamic-shape recompilation across batch sizes
    cfg = training.training_config(check.setup, batch, options)
    row, epochs = training_row(check, name, lambda: training.dynsila_epochs(cfg))
    if compiled and "error" not in row:
        check.compile_seconds = row["first_epoch_seconds"]
    return row | {"options": list(options)}, epochs


def train_ends(check: Check, batch: int) -> dict[str, Any]:
    """The plain eager loop and dynsila's optimised loop at ``batch``."""
    cfg = training.training_config(check.setup, batch, ())
    plain, _ = training_row(check, "plain eager loop", lambda: training.plain_epochs(cfg))
    options, left_out = optimised_options(check)
    optimised, epochs = dynsila_row(check, "dynsila optimised", batch, options)
    if "error" in optimised and "train.compile=true" in options:  # measure the rest of the stack all the same
        left_out.append(f"+ torch.compile: failed ({optimised['error']})")
        options = tuple(o for o in options if o != "train.compile=true")
        optimised, epochs = dynsila_row(check, "dynsila optimised without compile", batch, options)
    if epochs is not None and batch == check.plan.batches[0]:
        check.kept["optimised"] = epochs  # the SiLa part's baseline, with the options that worked
        check.optimised_options = options
    ratio = (
        None
        if "error" in plain or "error" in optimised
        else optimised["images_per_second"] / plain["images_per_second"]
    )
    return {"batch": batch, "rows": [plain, optimised], "left_out": left_out, "speedup": ratio}


def part_sila(check: Check) -> dict[str, Any]:
    """SiLa's training step time against the baseline's, both on the optimised path at the first batch size,
    epochs alternated in one process so the machine's drift cancels in each ratio."""
    batch, device = check.plan.batches[0], check.device
    options = check.optimised_options or optimised_options(check)[0]
    base = check.kept.pop("optimised", None)
    if base is None:  # train64 was not run (or failed): build the baseline here
        base = training.dynsila_epochs(training.training_config(check.setup, batch, options))
    sila = training.dynsila_epochs(training.training_config(check.setup, batch, options, sila=True))
    sila_first = run_seconds(sila.epoch, device)  # SiLa's compilation
    base.epoch()  # warm again, in case SiLa's compilation evicted anything of the baseline's
    sila_times, base_times = paired_times(sila.epoch, base.epoch, device, repeats=check.plan.sila_pairs)
    ratios = [a / b for a, b in zip(sila_times, base_times, strict=True)]
    return {
        "batch": batch,
        "options": list(options),
        "step_time_ratio": statistics.median(ratios),
        "ratios": ratios,
        "sila_epoch_seconds": statistics.median(sila_times),
        "baseline_epoch_seconds": statistics.median(base_times),
        "sila_first_epoch_seconds": sila_first,
        "steps_per_epoch": sila.images // batch,
    }


def part_ablation(check: Check) -> dict[str, Any]:
    """dynsila's options switched on one after another at the first batch size, up to (not including) compile,
    whose row is train64's optimised one: each option's contribution."""
    batch, options, rows = check.plan.batches[0], list[str](), list[dict[str, Any]]()
    for label, row in training.STACK:
        if "train.compile=true" in row:
            break
        if missing := training.missing_keys(row):
            rows.append({"name": label, "unavailable": f"this checkout's config has no {', '.join(missing)}"})
            continue
        options += row
        if reason := check.too_long(15):
            rows.append({"name": label, "skipped": reason})
            continue
        rows.append(dynsila_row(check, label, batch, tuple(options))[0])
    return {"batch": batch, "rows": rows}


# --- evaluation ---------------------------------------------------------------------------------------------


def eval_row(
    check: Check, name: str, net: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], bf16: bool
) -> dict[str, Any]:
    """Images/s of ``net``'s forward over every exit, without gradients, over ``batches`` (already in the
    layout the form uses); the first pass (compilation) reported apart."""
    device = check.device

    def forward_all() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for x in batches:
                net(x)

    try:
        first = run_seconds(forward_all, device)
        seconds = timed(forward_all, device, check.plan.repeats)
    except Exception as e:  # a compiler missing on the machine: the other rows stand
        return {"name": name, "error": error_line(e)}
    images = sum(len(x) for x in batches)
    row = {"name": name, "images_per_second": images / seconds, "seconds": seconds, "first_pass_seconds": first}
    print(row, flush=True)
    return row


def part_eval(check: Check) -> dict[str, Any]:
    """MSDNet evaluation (every exit) in the forms one can deploy it in."""
    plan, device = check.plan, check.device
    model = msdnet(check).eval().to(device)
    g = torch.Generator().manual_seed(0)
    nchw = [torch.randn(plan.eval_batch, 3, 32, 32, generator=g).to(device) for _ in range(plan.eval_batches)]
    nhwc = [x.contiguous(memory_format=torch.channels_last) for x in nchw]
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
    rows = [
        eval_row(check, "eager, fp32, NCHW", model, nchw, bf16=False),
        eval_row(check, "channels-last, fp32", channels_last, nhwc, bf16=False),
        eval_row(check, "channels-last, bf16 autocast", channels_last, nhwc, bf16=True),
        eval_row(check, "batch-norm folded, channels-last, bf16", folded, nhwc, bf16=True),
    ]
    for mode in ("default", "reduce-overhead"):  # reduce-overhead: CUDA graphs on top of the compiled kernels
        name = f"compiled (mode {mode}), batch-norm folded, channels-last, bf16"
        if not plan.compile or (mode == "reduce-overhead" and device.type != "cuda"):
            rows.append({"name": name, "skipped": "not in the smoke run" if not plan.compile else "CUDA only"})
        elif reason := check.too_long(check.compile_seconds / 2 + 10):  # inference compiles faster than training
            rows.append({"name": name, "skipped": reason})
        else:
            torch._dynamo.reset()
            rows.append(eval_row(check, name, torch.compile(folded, mode=mode), nhwc, bf16=True))
    return {"batch": plan.eval_batch, "batches": plan.eval_batches, "rows": rows}


# --- early exit and skipping --------------------------------------------------------------------------------


def part_runner(check: Check) -> dict[str, Any]:
    """EarlyExitRunner against the full network at the 25 / 50 / 75 % MACs mixes (early_exit_speed's
    measurement: thresholds fitted on calibration inputs, ``run_stream`` timed against the full network in the
    runner's own inference form, back-to-back pairs), plus the truncated forwards' time shares."""
    from benchmarks.speed.early_exit_speed import Bench, Sizes, mix_rows, per_exit_time_shares  # imports fvcore

    plan = check.plan
    sizes = Sizes(plan.runner_batched, plan.runner_single, plan.runner_calibration, plan.repeats)
    bench = Bench(msdnet(check).eval(), check.device, sizes)
    rows, full = mix_rows(bench)
    return {
        "batch": plan.runner_batched[0],
        "cost_counter": "fvcore (dynsila.flops.exit_costs, in early_exit_speed.Bench)",
        "exit_macs_cumulative": bench.paper,
        "exit_macs_lazy": bench.lazy,
        "rows": rows,
        "full_network_seconds": full,
        "per_exit_time_share": per_exit_time_shares(bench, plan.runner_batched[0]),
    }


def part_skipnet(check: Check) -> dict[str, Any]:
    """SkipNet-110 (recurrent gates) evaluation with half the (sample, block) decisions skipping, skipped blocks
    not computed, against every block executed (threshold bisected as skip_speed bisects it)."""
    from benchmarks.speed.skip_speed import SKIP_SHARE, threshold_for_skipping  # imports fvcore
    from dynsila.budget.flops import gated_costs
    from dynsila.deploy.gated_runner import GatedRunner

    plan, device = check.plan, check.device
    torch.manual_seed(0)
    model = cast(MultiExitNetwork, models.build("skipnet", num_classes=10, depth=plan.skip_depth, gate="rnn"))
    model.eval()
    costs = gated_costs(model, (3, 32, 32))  # on the CPU, before the model moves
    runner = GatedRunner(model.to(device), 0.5, costs)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(plan.skip_batch, 3, 32, 32, generator=g).to(device) for _ in range(plan.skip_batches)]
    threshold = threshold_for_skipping(runner, batches, SKIP_SHARE, plan.bisection_steps)

    def run(t: float) -> None:
        runner.set_threshold(t)
        for x in batches:
            runner(x)

    runner.set_threshold(threshold)
    executed = torch.cat([runner(x).executed for x in batches]).float().cpu()
    run(-1.0)  # warm-up of the all-executed path (the skipping one ran just above)
    skip_times, all_times = paired_times(lambda: run(threshold), lambda: run(-1.0), device, plan.repeats)
    images = plan.skip_batch * plan.skip_batches
    return {
        "model": f"skipnet depth {plan.skip_depth}, gate rnn, CIFAR stem, random weights",
        "batch": plan.skip_batch,
        "threshold": threshold,
        "skipped_fraction": 1 - float(executed.mean()),
        "macs_ratio": float(costs.per_sample(executed).mean()) / costs.full,
        "wall_ratio": statistics.median(a / b for a, b in zip(skip_times, all_times, strict=True)),
        "images_per_second_skipping": images / statistics.median(skip_times),
        "images_per_second_all_executed": images / statistics.median(all_times),
    }


# --- targets ------------------------------------------------------------------------------------------------


def target(description: str, value: float | None, limit: float, comparison: str, missing: str) -> dict[str, Any]:
    """A target's record: the number, the limit, met / missed (or "not measured" with the reason)."""
    record = {"description": description, "limit": limit, "comparison": comparison, "value": value}
    if value is None:
        return record | {"met": None, "status": f"not measured ({missing})"}
    met = value >= limit if comparison == ">=" else value <= limit
    return record | {"met": met, "status": verdict(met)}


def why_missing(part: dict[str, Any] | None) -> str:
    if part is None:
        return "part not run"
    return str(part.get("skipped") or part.get("error") or "a row failed; see the part")


def mix50_row(runner: dict[str, Any] | None) -> dict[str, Any] | None:
    """The runner's 50 % mix at its batched size, if measured."""
    rows = (runner or {}).get("rows", [])
    return next((r for r in rows if r["batch_size"] == runner["batch"] and r["target_fraction"] == 0.5), None)  # type: ignore[index]


def targets_of(parts: dict[str, Any]) -> dict[str, Any]:
    train, sila, runner = parts.get("train64"), parts.get("sila"), parts.get("runner")
    overhead = sila["step_time_ratio"] - 1 if sila and "step_time_ratio" in sila else None
    half = mix50_row(runner)
    return {
        "training_speedup": target(
            f"dynsila optimised / plain eager training img/s, batch {(train or {}).get('batch', '-')}",
            train.get("speedup") if train else None,
            TARGET_TRAIN_SPEEDUP,
            ">=",
            why_missing(train),
        ),
        "sila_step_overhead": target(
            "SiLa training step time / baseline - 1, optimised path",
            overhead,
            MAX_SILA_STEP_OVERHEAD,
            "<=",
            why_missing(sila),
        ),
        "runner_mix50": target(
            f"runner wall ratio / MACs ratio at the 50 % mix, batch {(runner or {}).get('batch', '-')}",
            half["wall_ratio"] / half["macs_ratio"] if half else None,
            MAX_WALL_PER_MACS_MIX50,
            "<=",
            why_missing(runner),
        )
        | ({"wall_ratio": half["wall_ratio"], "macs_ratio": half["macs_ratio"]} if half else {}),
    }


def has_errors(value: Any) -> bool:
    """Whether any part or row of the results failed."""
    if isinstance(value, dict):
        return "error" in value or any(has_errors(v) for v in value.values())
    return isinstance(value, list) and any(has_errors(v) for v in value)


# --- the report ---------------------------------------------------------------------------------------------


def part_status(part: dict[str, Any] | None) -> list[str]:
    """The line for a part that has no numbers (not run, skipped, failed), else nothing."""
    if part is None:
        return ["Not run (not in --parts, or the run ended before it).", ""]
    if "skipped" in part or "error" in part:
        return [f"{'Skipped' if 'skipped' in part else 'Failed'}: {why_missing(part)}", ""]
    return []


def row_cells(row: dict[str, Any], plain: float | None) -> str:
    if "images_per_second" not in row:
        return f"| {row['name']} | {row.get('error') or row.get('skipped') or row.get('unavailable')} | | | |"
    relative = f"{row['images_per_second'] / plain:.2f}" if plain else "-"
    return (
        f"| {row['name']} | {row['images_per_second']:.0f} | {row['epoch_seconds']:.2f} | "
        f"{row['first_epoch_seconds']:.1f} | {relative} |"
    )


def training_lines(result: dict[str, Any]) -> list[str]:
    parts, plan = result["parts"], result["plan"]
    lines = [
        "## Training: MSDNet CIFAR-100 b7",
        "",
        f"Synthetic CIFAR-shaped data ({plan['images_per_epoch']} images an epoch; every epoch starts its loader), "
        f"SGD lr {training.LEARNING_RATE}, momentum 0.9; img/s over {plan['timed_epochs']} epoch(s) after the "
        "first, whose seconds (compilation, autotuning) are the last column but one.",
        "",
    ]
    for key in ("train64", "train256"):
        part = parts.get(key)
        lines += [f"### Batch {plan['batches'][0 if key == 'train64' else 1]}", "", *part_status(part)]
        if part is None or "rows" not in part:
            continue
        plain = part["rows"][0].get("images_per_second")
        ablation = parts.get("ablation", {}).get("rows", []) if key == "train64" else []
        lines += ["| row | img/s | epoch (s) | first epoch (s) | x plain |", "| --- | --- | --- | --- | --- |"]
        lines += [row_cells(r, plain) for r in (part["rows"][:1] + ablation + part["rows"][1:])]
        lines += ["", f"- optimised row: {', '.join(part['rows'][-1].get('options', [])) or 'no options'}"]
        lines += [*(f"- left out: {why}" for why in part["left_out"]), ""]
    sila = parts.get("sila")
    lines += ["## SiLa step-time overhead", "", *part_status(sila)]
    if sila and "step_time_ratio" in sila:
        lines += [
            f"Optimised path, batch {sila['batch']}, {sila['steps_per_epoch']} steps an epoch, baseline and SiLa "
            f"epochs alternated ({len(sila['ratios'])} pairs): SiLa / baseline = {sila['step_time_ratio']:.3f} "
            f"(epochs {sila['sila_epoch_seconds']:.2f} s vs {sila['baseline_epoch_seconds']:.2f} s; pair ratios "
            f"{', '.join(f'{r:.3f}' for r in sila['ratios'])}).",
            "",
        ]
    return lines


def eval_lines(result: dict[str, Any]) -> list[str]:
    part = result["parts"].get("eval")
    lines = ["## Evaluation: MSDNet CIFAR-100 b7, every exit", "", *part_status(part)]
    if part and "rows" in part:
        lines += [
            f"Batch {part['batch']}, {part['batches']} batches, inputs already on the device in the form's layout.",
            "",
            "| form | img/s | seconds | first pass (s) |",
            "| --- | --- | --- | --- |",
        ]
        for r in part["rows"]:
            if "images_per_second" in r:
                rate, seconds, first = r["images_per_second"], r["seconds"], r["first_pass_seconds"]
                lines.append(f"| {r['name']} | {rate:.0f} | {seconds:.4f} | {first:.2f} |")
            else:
                lines.append(f"| {r['name']} | {r.get('error') or r.get('skipped')} | | |")
        lines.append("")
    return lines


def runner_lines(result: dict[str, Any]) -> list[str]:
    part = result["parts"].get("runner")
    lines = ["## Early-exit runner: wall time against MACs", "", *part_status(part)]
    if part and "rows" in part:
        lines += [
            "Thresholds fitted on calibration inputs for each MACs share; `run_stream` (survivors regrouped) timed "
            "against the full network in the runner's own inference form (batch-norm folded, channels-last), "
            "back-to-back pairs. MACs counted with fvcore.",
            "",
            "| batch | target share | MACs ratio (paper) | lazy MACs ratio | wall ratio | wall / MACs | "
            "wall ratio, no regrouping | exits |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in part["rows"]:
            single = r.get("per_batch_wall_ratio")
            lines.append(
                f"| {r['batch_size']} | {r['target_fraction']:.2f} | {r['macs_ratio']:.3f} | "
                f"{r.get('lazy_macs_ratio', float('nan')):.3f} | {r['wall_ratio']:.3f} | "
                f"{r['wall_ratio'] / r['macs_ratio']:.2f} | {'-' if single is None else f'{single:.3f}'} | "
                f"{r['exit_histogram']} |"
            )
        shares = part["per_exit_time_share"]
        lines += ["", "Time share of the full network to reach exit k and leave there, per exit:", ""]
        lines += [f"- {kind}: {', '.join(f'{v:.3f}' for v in values)}" for kind, values in shares.items()]
        lines.append("")
    return lines


def skipnet_lines(result: dict[str, Any]) -> list[str]:
    part = result["parts"].get("skipnet")
    lines = ["## SkipNet: half the gates closed against all blocks executed", "", *part_status(part)]
    if part and "wall_ratio" in part:
        lines += [
            f"{part['model']}, batch {part['batch']}; threshold {part['threshold']:.4f}: "
            f"{100 * part['skipped_fraction']:.1f} % of the decisions skip. Wall ratio {part['wall_ratio']:.3f} "
            f"against a MACs ratio of {part['macs_ratio']:.3f} ({part['images_per_second_skipping']:.0f} img/s "
            f"skipping, {part['images_per_second_all_executed']:.0f} img/s all executed).",
            "",
        ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    settings = ", ".join(f"{k} {v}" for k, v in env.items() if k in CUDA_SETTINGS)
    macs = ", ".join(f"{m / 1e6:.2f}" for m in result.get("msdnet_exit_macs", []))
    lines = [
        *header("GPU check: training, evaluation and early exit", result["command"], env),
        f"{settings or 'no CUDA settings (CPU run)'}. Time budget {result['budget_seconds']:.0f} s, elapsed "
        f"{result.get('elapsed_seconds', 0):.0f} s, {'complete' if result['complete'] else 'incomplete'}. "
        f"{SMOKE_NOTE if result['smoke'] else ''}Random weights, synthetic inputs. MSDNet per-exit MACs as "
        f"evaluated (M, conv+linear, {result.get('cost_counter', '-')}): {macs}.",
        "",
        "## Targets",
        "",
    ]
    for t in result["targets"].values():
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"- {t['description']}: {value} (target {t['comparison']} {t['limit']}): {t['status']}")
    lines.append("")
    lines += training_lines(result) + eval_lines(result) + runner_lines(result) + skipnet_lines(result)
    return "\n".join(lines)


# --- running it ---------------------------------------------------------------------------------------------

PART_FUNCTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "train64": lambda check: train_ends(check, check.plan.batches[0]),
    "sila": part_sila,
    "runner": part_runner,
    "skipnet": part_skipnet,
    "eval": part_eval,
    "ablation": part_ablation,
    "train256": lambda check: train_ends(check, check.plan.batches[1]),
}


def need_seconds(check: Check, name: str) -> float:
    """About how long a part takes on one GPU (a training compile counted as the last one measured)."""
    compile_s = check.compile_seconds if check.plan.compile else 0.0
    return {"train64": 20, "sila": 15, "train256": 20, "runner": 40, "skipnet": 20}.get(name, 30) + (
        compile_s if name in ("train64", "sila", "train256") else 0.0
    )


def run_part(check: Check, name: str) -> dict[str, Any]:
    if reason := check.too_long(need_seconds(check, name)):
        return {"skipped": reason}
    began = time.perf_counter()
    try:
        outcome = PART_FUNCTIONS[name](check)
    except ImportError as e:
        if not needs_fvcore(e):
            raise
        outcome = {"skipped": f"needs fvcore ({error_line(e)}); install it to run this part"}
    except Exception as e:  # the other parts still run and are written
        traceback.print_exc()
        outcome = {"error": error_line(e)}
    return outcome | {"seconds": time.perf_counter() - began}


def parts_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if unknown := [n for n in names if n not in PARTS]:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown)}; choose from {','.join(PARTS)}")
    return tuple(n for n in PARTS if n in names)  # always in priority order


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default where visible) or cpu")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="parts that would not fit are skipped")
    parser.add_argument("--parts", type=parts_list, default=PARTS, help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--out", default="gpu", help="results file stem")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU in seconds, no compile (tests)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.device is None:
        if not (torch.cuda.is_available() or args.smoke):
            parser.error("no CUDA device is visible; run the check on a GPU machine, or pass --smoke (tiny, CPU)")
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if args.smoke:  # one thread: on a loaded machine two OpenMP threads wait on each other longer than tiny ops take
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every row, the plain loop included
    plan = SMOKE if args.smoke else Plan()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        check = Check(args, plan, device, Path(workdir))
        check.result["msdnet_exit_macs"], check.result["cost_counter"] = exit_macs(msdnet(check).eval())
        for name in args.parts:
            check.result["parts"][name] = run_part(check, name)
            print(f"{name}: {check.result['parts'][name].get('seconds', 0):.1f} s", flush=True)
            check.save()
            if name == "sila":
                check.kept.clear()  # later parts build their own runs
        check.result["complete"] = True
        check.save()
    print(markdown(check.result))
    return 1 if has_errors(check.result["parts"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
