"""Training and evaluation throughput of MSDNet CIFAR-100 b7, batch 64: baseline vs SiLa, eager vs
channels-last vs torch.compile.

    python benchmarks/speed/throughput.py [--threads 2] [--steps 25] [--no-compile] [--smoke]

Each variant runs in a fresh process (so its peak memory is its own): a training step is forward over all 7
exits, the summed loss (exit CE, plus the SiLa terms for SiLa), backward and an SGD step; evaluation is the
deploy model's forward over all exits without gradients. Images/s from the median step time after warm-up;
peak memory is the process's peak resident set growth over its state just before the first step (activations,
gradients, optimizer state; for compiled variants also the compiler's own memory).
Also every SiLa twin kind (linear, MLP, whole classifier) paired against the baseline in one process: step time
and exact training memory. For reference, the public MSDNet code trains this configuration at about 124 img/s and
evaluates at about 400-470 img/s on this machine kind (torch 2.13 CPU, batch 64; reported for the public code, not
measured here).
Writes benchmarks/results/throughput.{json,md} (``--smoke``: a tiny MSDNet, one variant, one step, written
under ``--results-dir`` only, for tests).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    environment,
    header,
    paired_times,
    run_seconds,
    verdict,
    write_results,
)
from dynsila import models
from dynsila.config import load_config
from dynsila.deploy.fuse import fold_batchnorm
from dynsila.methods.losses import exit_cross_entropy
from dynsila.methods.sila import SiLa, SiLaConfig, sila_loss_terms

PRESET = REPO_ROOT / "configs" / "cifar100" / "msdnet_sila.yaml"
BATCH = 64
MAX_STEP_TIME_OVERHEAD = 0.05  # SiLa training step time / baseline <= 1 + this
MAX_MEMORY_OVERHEAD = 0.05  # SiLa training memory / baseline <= 1 + this
VARIANT_TIMEOUT_S = 1800  # one variant's process (the compiled ones compile for minutes)
# --smoke: a 3-exit MSDNet and one variant, small enough for a test (the numbers mean nothing)
SMOKE_MODEL = {"n_blocks": 3, "step": 1, "base": 1, "n_channels": 4, "growth_rate": 4, "head_channels": 8}
SMOKE_VARIANTS = ("train_sila_eager",)
VARIANTS = {
    # name: (kind, sila, layout, compiled)
    "train_baseline_eager": ("train", False, "contiguous", False),
    "train_sila_eager": ("train", True, "contiguous", False),
    "train_baseline_channels_last": ("train", False, "channels_last", False),
    "train_sila_channels_last": ("train", True, "channels_last", False),
    "train_baseline_compile": ("train", False, "contiguous", True),
    "train_sila_compile": ("train", True, "contiguous", True),
    "eval_eager": ("eval", False, "contiguous", False),
    "eval_channels_last": ("eval", False, "channels_last", False),
    "eval_folded_channels_last": ("eval", False, "channels_last+fold", False),
    "eval_compile": ("eval", False, "contiguous", True),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def build_msdnet(smoke: bool) -> models.MultiExitNetwork:
    """MSDNet CIFAR-100 b7 (or the smoke model), random weights."""
    model = models.build(
        "msdnet", num_classes=100, **(load_config(PRESET).model_kwargs() | (SMOKE_MODEL if smoke else {}))
    )
    assert isinstance(model, models.MultiExitNetwork)
    return model


def measure(name: str, steps: int, threads: int, smoke: bool = False) -> dict[str, Any]:
    """One variant, in this process."""
    kind, sila, layout, compiled = VARIANTS[name]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_msdnet(smoke)
    net: torch.nn.Module = SiLa(model, SiLaConfig()) if sila else model
    if kind == "eval":
        net = (fold_batchnorm(model) if "fold" in layout else model).eval()
    memory_format = torch.channels_last if layout.startswith("channels_last") else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=memory_format)
    y = torch.randint(0, 100, (BATCH,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    run = torch.compile(net) if compiled else net
    weights = [1.0] * len(model.exits)

    def step() -> None:
        if kind == "eval":
            with torch.no_grad():
                run(x)
            return
        out = run(x)
        if sila:
            loss = exit_cross_entropy(out.logits, y, weights)
            loss = loss + sum(sila_loss_terms(out, y, SiLaConfig(), weights).values())
        else:
            loss = exit_cross_entropy(out, y, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rss_before = rss_bytes()  # model, optimizer and inputs built; nothing run yet
    first = run_seconds(step)  # first call: compilation for compiled variants
    for _ in range(2):
        step()
    times = [run_seconds(step) for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    median = statistics.median(times)
    return {
        "variant": name,
        "kind": kind,
        "sila": sila,
        "layout": layout,
        "compiled": compiled,
        "images_per_second": BATCH / median,
        "median_step_seconds": median,
        "first_step_seconds": first,
        "peak_rss_growth_bytes": max(0, peak - rss_before),
        "peak_rss_bytes": peak,
    }


def training_bytes(net: torch.nn.Module, step_loss: Any) -> dict[str, int]:
    """Exact memory a training step needs: parameters, gradients and SGD momentum (3 x parameter bytes) plus the
    activations autograd saves for backward (unique storages), counted with saved-tensor hooks."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss()
    loss.backward()
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    return {"parameters_grads_momentum": 3 * params, "saved_activations": sum(storages.values())}


# SiLa twin kinds measured against the baseline: the default linear twin, the MLP twin, the whole-classifier twin
SILA_HEADS = {
    "sila": SiLaConfig(),
    "sila_mlp": SiLaConfig(head="mlp"),
    "sila_classifier": SiLaConfig(head="classifier"),
}


def paired_overhead(steps: int, threads: int, smoke: bool = False) -> dict[str, Any]:
    """Baseline and each SiLa twin kind's training steps alternated in one process (drift cancels), per kind the
    median step-time ratio; exact memory of each. The top-level ratios are the default (linear) twin's."""
    torch.set_num_threads(threads)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 100, (BATCH,))
    nets, losses, optimizers = {}, {}, {}
    for name, cfg in (("baseline", None), *SILA_HEADS.items()):
        torch.manual_seed(0)
        model = build_msdnet(smoke)
        weights = [1.0] * len(model.exits)
        net = SiLa(model, cfg) if cfg else model
        nets[name] = net
        optimizers[name] = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def loss_of(
            net: torch.nn.Module = net, cfg: SiLaConfig | None = cfg, weights: list[float] = weights
        ) -> torch.Tensor:
            out = net(x)
            if cfg is None:
                return exit_cross_entropy(out, y, weights)
            return exit_cross_entropy(out.logits, y, weights) + sum(sila_loss_terms(out, y, cfg, weights).values())

        losses[name] = loss_of

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        losses[name]().backward()
        optimizers[name].step()

    for name in nets:
        step(name)
        step(name)
    memory = {name: training_bytes(nets[name], losses[name]) for name in nets}
    total = {name: sum(m.values()) for name, m in memory.items()}
    heads: dict[str, dict[str, float]] = {}
    for name in SILA_HEADS:
        sila_times, baseline_times = paired_times(partial(step, name), partial(step, "baseline"), repeats=steps)
        heads[name] = {
            "step_time_ratio": statistics.median(a / b for a, b in zip(sila_times, baseline_times, strict=True)),
            "memory_ratio": total[name] / total["baseline"],
            "extra_parameters": sum(p.numel() for p in nets[name].parameters())
            - sum(p.numel() for p in nets["baseline"].parameters()),
        }
    return {
        "step_time_ratio": heads["sila"]["step_time_ratio"],
        "memory_bytes": memory,
        "memory_ratio": heads["sila"]["memory_ratio"],
        "heads": heads,
    }


def run_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each variant in a fresh process (its peak memory is its own); a failure is a row naming the error."""
    rows = []
    for name, (_, _, _, compiled) in VARIANTS.items():
        if (compiled and args.no_compile) or (args.smoke and name not in SMOKE_VARIANTS):
            continue
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--threads", str(args.threads)]
        done = subprocess.run(
            cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True, timeout=VARIANT_TIMEOUT_S
        )
        if done.returncode != 0:
            rows.append({"variant": name, "error": done.stderr.strip().splitlines()[-1][:300]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def markdown(result: dict[str, Any], steps: int) -> str:
    paired = result["paired"]
    step_overhead, memory_overhead = paired["step_time_ratio"], paired["memory_ratio"]
    lines = [
        *header(f"Throughput: {result['model']}, batch {BATCH}", result["command"], result["environment"]),
        "| variant | images/s | median step (s) | first step (s) | peak memory growth (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['images_per_second']:.0f} | {r['median_step_seconds']:.3f} | "
            f"{r['first_step_seconds']:.1f} | {r['peak_rss_growth_bytes'] / 2**20:.0f} |"
        )
    mem = paired["memory_bytes"]
    lines += [
        "",
        f"- SiLa training step time / baseline (eager, steps alternated in one process, median of {steps} "
        f"pairs): {step_overhead:.3f} (target <= {1 + MAX_STEP_TIME_OVERHEAD}: "
        f"{verdict(step_overhead <= 1 + MAX_STEP_TIME_OVERHEAD)}). "
        "The separate-process rows above drift by more than this difference.",
        f"- SiLa training memory / baseline, counted exactly (parameters + gradients + momentum + activations "
        f"saved for backward): {memory_overhead:.4f} ({sum(mem['sila'].values()) / 2**20:.1f} MiB vs "
        f"{sum(mem['baseline'].values()) / 2**20:.1f} MiB; target <= {1 + MAX_MEMORY_OVERHEAD}: "
        f"{verdict(memory_overhead <= 1 + MAX_MEMORY_OVERHEAD)}). The RSS column is the allocator's view and noisy.",
        "- Reference (reported for the public code, not measured here): the public MSDNet code trains this "
        "configuration at about 124 img/s and evaluates at about 400-470 img/s on this machine kind.",
        "",
        "Every SiLa twin kind against the baseline (eager, steps alternated in one process, median of "
        f"{steps} pairs; memory counted exactly as above):",
        "",
        "| twin | extra training parameters | step time / baseline | memory / baseline |",
        "| --- | --- | --- | --- |",
        *[
            f"| {name} | {h['extra_parameters']:,} | {h['step_time_ratio']:.3f} | {h['memory_ratio']:.4f} |"
            for name, h in paired.get("heads", {}).items()
        ],
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny MSDNet, one variant, one step (tests)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # one thread: on a loaded machine two OpenMP threads wait on each other longer than tiny ops take
        args.steps, args.threads = 1, 1
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.threads, args.smoke)))
        return 0
    rows = run_variants(args)
    paired = paired_overhead(args.steps, args.threads, args.smoke)
    command, env = command_line(__file__, argv), environment(threads=args.threads)
    result = {
        "command": command,
        "environment": env,
        "model": "MSDNet CIFAR-100 b7" if not args.smoke else f"MSDNet smoke {SMOKE_MODEL}",
        "rows": rows,
        "sila_step_time_ratio": paired["step_time_ratio"],
        "sila_training_memory_ratio": paired["memory_ratio"],
        "paired": paired,
        "targets": {
            "step_time_overhead_max": MAX_STEP_TIME_OVERHEAD,
            "peak_memory_overhead_max": MAX_MEMORY_OVERHEAD,
        },
    }
    md = markdown(result, args.steps)
    if not (args.smoke and args.results_dir == RESULTS_DIR):  # a smoke run never overwrites the committed result
        write_results("throughput", result, md, args.results_dir)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
