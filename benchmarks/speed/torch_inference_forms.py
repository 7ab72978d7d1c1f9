"""Forms of the PyTorch model for CPU inference: which one makes MSDNet's full network cheaper in time?

    python benchmarks/torch_inference_forms.py [--threads 2] [--repeats 7] [--batch 64] [--compile] [--out ...]
        [--smoke]

MSDNet CIFAR-100 b7 (random weights), batch-norm folded (as ``EarlyExitRunner`` runs it), every exit evaluated,
one batch: the runner's form today (eager, channels-last) against eager NCHW, frozen TorchScript with
``torch.jit.optimize_for_inference`` (oneDNN convolution fusion), and with ``--compile`` ``torch.compile``
(inductor, static shapes: one compiled graph per batch size, so an early-exit runner would have to bucket its
shrinking batches). Only a form that beats eager channels-last on the full network could lower the early-exit
runner's time (its stages are the same modules). Every form's logits are checked against eager; times are
medians of back-to-back pairs with eager channels-last in one process. Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python benchmarks/x.py` puts only benchmarks/ there

from benchmarks.toolkit import REPO_ROOT, RESULTS_DIR, command_line, environment, header, paired_times, write_results
from dynsila import models
from dynsila.config import load_config
from dynsila.deploy.fuse import fold_batchnorm
from dynsila.deploy.runner import raise_primitive_cache
from dynsila.methods.sila import unwrap

PRESET = REPO_ROOT / "configs" / "cifar100" / "msdnet_baseline.yaml"
SMOKE_MODEL = {"n_blocks": 3, "step": 1, "base": 1, "n_channels": 4, "growth_rate": 4, "head_channels": 8}


class AllExits(torch.nn.Module):
    """Every exit's logits as one tensor (TorchScript and inductor want a tensor out)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.model(x), 1)


def forms(model: torch.nn.Module, x: torch.Tensor, compile_too: bool) -> dict[str, tuple[Callable[[], Any], float]]:
    """name: (one forward on ``x``, seconds it took to prepare)."""
    channels_last = AllExits(copy.deepcopy(model).to(memory_format=torch.channels_last)).eval()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    nchw = AllExits(copy.deepcopy(model)).eval()
    made: dict[str, tuple[Callable[[], Any], float]] = {
        "eager, channels-last (the runner today)": (lambda: channels_last(x_cl), 0.0),
        "eager, NCHW": (lambda: nchw(x), 0.0),
    }
    start = time.perf_counter()
    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(channels_last), x_cl)))
    made["TorchScript, frozen + optimize_for_inference (oneDNN fusion)"] = (
        lambda: frozen(x_cl),
        time.perf_counter() - start,
    )
    if compile_too:
        start = time.perf_counter()
        compiled = torch.compile(copy.deepcopy(channels_last), dynamic=False)
        compiled(x_cl)
        made["torch.compile (inductor, static shape)"] = (lambda: compiled(x_cl), time.perf_counter() - start)
    return made


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes of compiling)")
    parser.add_argument("--out", default="torch_inference_forms")
    parser.add_argument("--smoke", action="store_true", help="a tiny MSDNet, batch 4, one pair (tests)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    raise_primitive_cache()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")  # tracing warns about the list of exits; nothing the reader needs
    load_start = os.getloadavg()[0]
    kwargs = load_config(PRESET).model_kwargs() | (SMOKE_MODEL if args.smoke else {})
    if args.smoke:
        args.batch, args.repeats = 4, 1
    model = models.build("msdnet", num_classes=100, **kwargs).eval()
    folded = unwrap(fold_batchnorm(model)).eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = []
    with torch.no_grad():
        made = forms(folded, x, args.compile)
        baseline = next(iter(made.values()))[0]
        reference = baseline()
        for name, (fn, prepare_seconds) in made.items():
            difference = float((fn() - reference).abs().max())
            fn(), baseline()
            times, base = paired_times(fn, baseline, "cpu", args.repeats)
            rows.append(
                {
                    "form": name,
                    "prepare_seconds": prepare_seconds,
                    "seconds": statistics.median(times),
                    "over_eager_channels_last": statistics.median(a / b for a, b in zip(times, base, strict=True)),
                    "max_abs_logit_difference": difference,
                }
            )
            print(rows[-1], flush=True)
    result = {
        "command": command_line(__file__, argv),
        "environment": environment("cpu", args.threads),
        "batch": args.batch,
        "rows": rows,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
    }
    if not (args.smoke and args.results_dir == RESULTS_DIR):  # a smoke run never overwrites the committed result
        write_results(args.out, result, markdown(result), args.results_dir)
    print(markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    env, load = result["environment"], result["load_average_1min"]
    lines = [
        *header("Forms of the PyTorch model for CPU inference", result["command"], env),
        f"MSDNet CIFAR-100 b7, random weights, batch-norm folded, every exit, one batch of {result['batch']}. "
        f"Ratio: median of back-to-back pairs with the runner's form today, in one process. 1-minute load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end, with {env['threads']} threads (above "
        "that, other work shared the cores).",
        "",
        "| form | prepare s | s per batch | over eager channels-last | max abs logit difference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['form']} | {r['prepare_seconds']:.1f} | {r['seconds']:.4f} | {r['over_eager_channels_last']:.3f} | "
            f"{r['max_abs_logit_difference']:.1e} |"
        )
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    raise SystemExit(main())
