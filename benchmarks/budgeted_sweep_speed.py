"""Speed of the budgeted sweep: all 39 budgets, 5,000 val / 10,000 test samples, K = 7 exits, 100 classes.

    python benchmarks/budgeted_sweep_speed.py

Times ``dynsila.evaluate.budgeted_sweep`` (vectorised over samples and budgets) against the same algorithm
written as per-sample Python loops, the way the public MSDNet code computes it, in one process on the same
logits, and checks that both give the same thresholds, accuracies and costs. Target: under 0.5 s.
Writes benchmarks/results/budgeted_sweep_speed.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

from dynsila.checkpoint import atomic_write_text
from dynsila.evaluate import DEFAULT_QS, budgeted_sweep, geometric_fractions

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
N_VAL, N_TEST, K, C = 5000, 10000, 7, 100


def synthetic_logits(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose exits grow more confident and more accurate with depth, like a trained anytime net."""
    labels = torch.randint(0, C, (n,), generator=generator)
    logits = torch.randn(n, K, C, generator=generator)
    signal = torch.linspace(1.0, 4.0, K)[None, :] * torch.rand(n, 1, generator=generator) * 3
    logits[torch.arange(n), :, labels] += signal
    return logits, labels


def loop_sweep(val_logits, val_labels, test_logits, test_labels, costs):
    """The MSDNet procedure with Python loops over samples (softmax computed once, per-item tensor access)."""
    val_conf, val_pred = torch.softmax(val_logits, dim=-1).max(dim=-1)
    test_conf, test_pred = torch.softmax(test_logits, dim=-1).max(dim=-1)
    fractions = geometric_fractions(DEFAULT_QS, K)
    order = val_conf.argsort(dim=0, descending=True)
    rows = []
    for f in fractions:
        exited = torch.zeros(N_VAL)
        thresholds = torch.full((K,), 1e8)
        for k in range(K - 1):
            quota, count = math.floor(N_VAL * float(f[k]) + 1e-9), 0
            for i in range(N_VAL):
                idx = order[i, k]
                if exited[idx] == 0:
                    count += 1
                    if count == quota:
                        thresholds[k] = val_conf[idx, k]
                        break
            exited += (val_conf[:, k] >= thresholds[k]).float()
        thresholds[K - 1] = -1e8
        hits, spent = 0, 0.0
        for i in range(N_TEST):
            for k in range(K):
                if test_conf[i, k].item() >= thresholds[k]:
                    hits += int(test_pred[i, k].item() == test_labels[i].item())
                    spent += costs[k]
                    break
        rows.append((thresholds.tolist(), 100.0 * hits / N_TEST, spent / N_TEST))
    return rows


def main() -> None:
    g = torch.Generator().manual_seed(0)
    val_logits, val_labels = synthetic_logits(N_VAL, g)
    test_logits, test_labels = synthetic_logits(N_TEST, g)
    costs = [15.0e6, 25.5e6, 37.1e6, 46.3e6, 57.3e6, 67.0e6, 75.9e6]

    vectorised_times = []
    for _ in range(5):
        start = time.perf_counter()
        rows = budgeted_sweep(val_logits, val_labels, test_logits, test_labels, costs)
        vectorised_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    reference = loop_sweep(val_logits, val_labels, test_logits, test_labels, costs)
    loop_time = time.perf_counter() - start

    # Same results (the loop keeps 1e8 for a threshold never reached; the vectorised code uses inf).
    max_acc_diff = max(abs(r.test_top1 - acc) for r, (_, acc, _) in zip(rows, reference, strict=True))
    max_cost_diff = max(abs(r.avg_macs - cost) for r, (_, _, cost) in zip(rows, reference, strict=True))
    best = min(vectorised_times)
    result = {
        "command": "python benchmarks/budgeted_sweep_speed.py",
        "date": datetime.date.today().isoformat(),
        "platform": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "setup": {"budgets": len(DEFAULT_QS), "val": N_VAL, "test": N_TEST, "exits": K, "classes": C},
        "vectorised_seconds": vectorised_times,
        "vectorised_best_seconds": best,
        "loop_seconds": loop_time,
        "speedup": loop_time / best,
        "target_seconds": 0.5,
        "meets_target": best < 0.5,
        "max_abs_test_top1_difference": max_acc_diff,
        "max_abs_avg_macs_difference": max_cost_diff,
    }
    md = "\n".join(
        [
            "# Budgeted sweep speed",
            "",
            f"Command: `{result['command']}`  ",
            f"Date: {result['date']}; {result['platform']}",
            "",
            f"39 budgets, {N_VAL} val / {N_TEST} test samples, K = {K} exits, C = {C} classes (synthetic logits).",
            "",
            "| implementation | seconds |",
            "| --- | --- |",
            f"| dynsila `budgeted_sweep` (vectorised), best of 5 | {best:.3f} |",
            f"| per-sample Python loops (the public MSDNet procedure), 1 run | {loop_time:.1f} |",
            "",
            f"Speed-up {loop_time / best:.0f}x in the same process; target < 0.5 s: "
            f"{'met' if best < 0.5 else 'missed'}. Both give the same results (largest difference in test top-1 "
            f"{max_acc_diff:.2g} points, in average MACs {max_cost_diff:.2g}).",
            "",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "budgeted_sweep_speed.json", json.dumps(result, indent=1))
    atomic_write_text(RESULTS / "budgeted_sweep_speed.md", md)
    print(md)


if __name__ == "__main__":
    main()
