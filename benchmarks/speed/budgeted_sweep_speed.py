"""Speed of the budgeted sweep: all 39 budgets, 5,000 val / 10,000 test samples, K = 7 exits, 100 classes.

    python benchmarks/speed/budgeted_sweep_speed.py [--smoke]

Times ``dynsila.evaluate.budgeted_sweep`` (vectorised over samples and budgets) against the same algorithm
written as per-sample Python loops, the way the public MSDNet code computes it, in one process on the same
logits, and checks that both give the same thresholds, accuracies and costs. Target: under 0.5 s.
Writes benchmarks/results/budgeted_sweep_speed.{json,md} (``--smoke``: a few hundred samples, written under
``--results-dir`` only, for tests).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import RESULTS_DIR, command_line, environment, header, run_seconds, verdict, write_results
from dynsila.budget.thresholds import DEFAULT_QS, budgeted_sweep, geometric_fractions

TARGET_SECONDS = 0.5  # the vectorised sweep over all budgets must take less than this
# Per-exit costs charged in the sweep: roughly MSDNet CIFAR-100 b7's cumulative exit MACs (dynsila counts
# 14.97 ... 75.49 M conv+linear, README "Costs"). They only scale the reported average MACs, not the timing.
EXIT_MACS = (15.0e6, 25.5e6, 37.1e6, 46.3e6, 57.3e6, 67.0e6, 75.9e6)


@dataclass(frozen=True)
class SweepSize:
    val: int = 5000
    test: int = 10000
    exits: int = 7
    classes: int = 100


SMOKE = SweepSize(val=200, test=200)


def synthetic_logits(n: int, size: SweepSize, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, K, C) whose exits grow more confident and more accurate with depth, like a trained anytime net."""
    labels = torch.randint(0, size.classes, (n,), generator=generator)
    logits = torch.randn(n, size.exits, size.classes, generator=generator)
    signal = torch.linspace(1.0, 4.0, size.exits)[None, :] * torch.rand(n, 1, generator=generator) * 3
    logits[torch.arange(n), :, labels] += signal
    return logits, labels


def loop_sweep(val_logits, val_labels, test_logits, test_labels, costs):
    """The MSDNet procedure with Python loops over samples (softmax computed once, per-item tensor access)."""
    val_conf, val_pred = torch.softmax(val_logits, dim=-1).max(dim=-1)
    test_conf, test_pred = torch.softmax(test_logits, dim=-1).max(dim=-1)
    n_val, n_test, k_exits = len(val_labels), len(test_labels), val_logits.shape[1]
    fractions = geometric_fractions(DEFAULT_QS, k_exits)
    order = val_conf.argsort(dim=0, descending=True)
    rows = []
    for f in fractions:
        exited = torch.zeros(n_val)
        thresholds = torch.full((k_exits,), 1e8)
        for k in range(k_exits - 1):
            quota, count = math.floor(n_val * float(f[k]) + 1e-9), 0
            for i in range(n_val):
                idx = order[i, k]
                if exited[idx] == 0:
                    count += 1
                    if count == quota:
                        thresholds[k] = val_conf[idx, k]
                        break
            exited += (val_conf[:, k] >= thresholds[k]).float()
        thresholds[k_exits - 1] = -1e8
        hits, spent = 0, 0.0
        for i in range(n_test):
            for k in range(k_exits):
                if test_conf[i, k].item() >= thresholds[k]:
                    hits += int(test_pred[i, k].item() == test_labels[i].item())
                    spent += costs[k]
                    break
        rows.append((thresholds.tolist(), 100.0 * hits / n_test, spent / n_test))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few hundred samples (tests); nothing to quote")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    size = SMOKE if args.smoke else SweepSize()
    g = torch.Generator().manual_seed(0)
    val_logits, val_labels = synthetic_logits(size.val, size, g)
    test_logits, test_labels = synthetic_logits(size.test, size, g)
    costs = list(EXIT_MACS[: size.exits])

    def vectorised() -> list:
        return budgeted_sweep(val_logits, val_labels, test_logits, test_labels, costs)

    vectorised_times = [run_seconds(vectorised) for _ in range(5)]
    rows = vectorised()
    reference: list = []

    def loops() -> None:
        reference.extend(loop_sweep(val_logits, val_labels, test_logits, test_labels, costs))

    loop_time = run_seconds(loops)

    # Same results (the loop keeps 1e8 for a threshold never reached; the vectorised code uses inf).
    max_acc_diff = max(abs(r.test_top1 - acc) for r, (_, acc, _) in zip(rows, reference, strict=True))
    max_cost_diff = max(abs(r.avg_macs - cost) for r, (_, _, cost) in zip(rows, reference, strict=True))
    best = min(vectorised_times)
    command, env = command_line(__file__, argv), environment()
    result = {
        "command": command,
        "environment": env,
        "setup": {"budgets": len(DEFAULT_QS), **asdict(size)},
        "vectorised_seconds": vectorised_times,
        "vectorised_best_seconds": best,
        "loop_seconds": loop_time,
        "speedup": loop_time / best,
        "target_seconds": TARGET_SECONDS,
        "meets_target": best < TARGET_SECONDS,
        "max_abs_test_top1_difference": max_acc_diff,
        "max_abs_avg_macs_difference": max_cost_diff,
    }
    md = "\n".join(
        [
            *header("Budgeted sweep speed", command, env),
            f"{len(DEFAULT_QS)} budgets, {size.val} val / {size.test} test samples, K = {size.exits} exits, "
            f"C = {size.classes} classes (synthetic logits).",
            "",
            "| implementation | seconds |",
            "| --- | --- |",
            f"| dynsila `budgeted_sweep` (vectorised), best of 5 | {best:.3f} |",
            f"| per-sample Python loops (the public MSDNet procedure), 1 run | {loop_time:.1f} |",
            "",
            f"Speed-up {loop_time / best:.0f}x in the same process; target < {TARGET_SECONDS} s: "
            f"{verdict(best < TARGET_SECONDS)}. Both give the same results (largest difference in test top-1 "
            f"{max_acc_diff:.2g} points, in average MACs {max_cost_diff:.2g}).",
            "",
        ]
    )
    if args.smoke and args.results_dir == RESULTS_DIR:
        print(md)  # a smoke run never overwrites the committed result
        return 0
    write_results("budgeted_sweep_speed", result, md, args.results_dir)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
