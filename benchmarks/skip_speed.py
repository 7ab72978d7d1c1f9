"""Does skipping save wall time? SkipNet evaluation with about half the gated blocks skipped versus all executed.

    python benchmarks/skip_speed.py [--gate rnn] [--threads 2]

SkipNet-110 (CIFAR, random weights: only timing matters), batch 64, CPU. The gate threshold is bisected on
calibration batches until 50 % of the (sample, block) decisions skip; evaluation
then runs for real (skipped blocks are not computed: samples are gathered per block). Compared, in one process,
with a threshold that executes every block (the cost of the masked formulation of the public code, which
computes every block). Target: wall-time ratio <= 0.65. Writes benchmarks/results/skip_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dynsila import models
from dynsila.checkpoint import atomic_write_text
from dynsila.flops import gated_costs

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@torch.no_grad()
def threshold_for_skipping(model: torch.nn.Module, batches: list[torch.Tensor], share: float) -> float:
    """Bisect the gate threshold until ``share`` of the decisions skip, with skipping on (the recurrent gate and
    the features depend on earlier decisions, so the threshold is found in the mode it is used in)."""
    body = models.gated_body(model)
    assert body is not None
    low, high = 0.0, 1.0
    for _ in range(20):
        body.threshold = (low + high) / 2
        executed = torch.cat([torch.stack(model(x).gate_actions, 1) for x in batches])
        if 1 - float(executed.mean()) < share:
            low = body.threshold
        else:
            high = body.threshold
    return (low + high) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", choices=["rnn", "ffgate1", "ffgate2"], default="rnn")
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.build("skipnet", num_classes=10, depth=args.depth, gate=args.gate).eval()
    body = models.gated_body(model)
    assert body is not None
    costs = gated_costs(model, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(args.batches)]
    threshold = threshold_for_skipping(model, batches[:4], 0.5)

    def run(t: float) -> tuple[float, torch.Tensor]:
        body.threshold = t
        start = time.perf_counter()
        with torch.no_grad():
            executed = torch.cat([torch.stack(model(x).gate_actions, 1) for x in batches])
        return time.perf_counter() - start, executed

    run(threshold)  # warm-up, both paths
    run(-1.0)
    ratios, times_skip, times_all = [], [], []
    for _ in range(args.repeats):  # back-to-back pairs, so the machine's drifting load cancels in each ratio
        t_skip, executed = run(threshold)
        t_all, _ = run(-1.0)
        ratios.append(t_skip / t_all)
        times_skip.append(t_skip)
        times_all.append(t_all)
    skipped = 1 - float(executed.mean())
    mixed = float(((executed.mean(0) > 0) & (executed.mean(0) < 1)).double().mean())  # blocks run on part of a batch
    macs_ratio = float(costs.per_sample(executed).mean()) / costs.full
    ratio = statistics.median(ratios)
    command = "python benchmarks/skip_speed.py" + ("" if not argv else " " + " ".join(argv))
    result = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "platform": f"{platform.machine()} {platform.system()}, {args.threads} threads, torch {torch.__version__}",
        "model": f"skipnet depth {args.depth}, gate {args.gate}, CIFAR stem, random weights, batch 64",
        "threshold": threshold,
        "skipped_fraction": skipped,
        "blocks_with_mixed_decisions": mixed,
        "macs_ratio": macs_ratio,
        "wall_ratio": ratio,
        "seconds_skipping": statistics.median(times_skip),
        "seconds_all_executed": statistics.median(times_all),
        "target_wall_ratio": 0.65,
        "met": ratio <= 0.65,
    }
    lines = [
        "# SkipNet: wall time with skipped blocks not computed",
        "",
        f"Command: `{command}`  ",
        f"Date: {result['date']}; {result['platform']}",
        "",
        f"{result['model']}; {args.batches} batches. Gate threshold {threshold:.4f} (bisected for 50 % skips): "
        f"{100 * skipped:.1f} % of (sample, block) decisions skip; {100 * mixed:.0f} % of the gated blocks run on "
        "part of each batch (gathered samples).",
        "",
        "| | seconds (median) | ratio |",
        "| --- | --- | --- |",
        f"| all blocks executed | {result['seconds_all_executed']:.3f} | 1.000 |",
        f"| skipping | {result['seconds_skipping']:.3f} | {ratio:.3f} (median of {args.repeats} back-to-back pairs) |",
        "",
        f"MACs ratio (per-sample, gates included): {macs_ratio:.3f}. Target wall-time ratio <= 0.65: "
        f"{'met' if ratio <= 0.65 else 'missed'}.",
        "",
    ]
    atomic_write_text(RESULTS / "skip_speed.json", json.dumps(result, indent=1))
    atomic_write_text(RESULTS / "skip_speed.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
