"""Does skipping save wall time? SkipNet evaluation with about half the gated blocks skipped versus all executed.

    python benchmarks/speed/skip_speed.py [--gate rnn] [--threads 2] [--smoke]

SkipNet-110 (CIFAR, random weights: only timing matters), batch 64, CPU. The gate threshold is bisected on
calibration batches until 50 % of the (sample, block) decisions skip; evaluation
then runs for real (skipped blocks are not computed: samples are gathered per block). Compared, in one process,
with a threshold that executes every block (the cost of the masked formulation of the public code, which
computes every block). Target: wall-time ratio <= 0.65. Writes benchmarks/results/skip_speed.{json,md}
(``--smoke``: SkipNet-38, 2 batches of 8, 1 repeat, written under ``--results-dir`` only, for tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a script run directly has only its folder there

from benchmarks.toolkit import RESULTS_DIR, command_line, environment, header, paired_times, verdict, write_results
from dynsila import models
from dynsila.budget.flops import gated_costs
from dynsila.models import gated_body

TARGET_WALL_RATIO = 0.65  # skipping half the decisions must cost at most this share of the all-blocks time
SKIP_SHARE = 0.5  # share of (sample, block) decisions the bisected threshold skips
BISECTION_STEPS = 20  # threshold found to 2**-20


@torch.no_grad()
def threshold_for_skipping(
    model: torch.nn.Module, batches: list[torch.Tensor], share: float, steps: int = BISECTION_STEPS
) -> float:
    """Bisect the gate threshold until ``share`` of the decisions skip, with skipping on (the recurrent gate and
    the features depend on earlier decisions, so the threshold is found in the mode it is used in)."""
    body = gated_body(model)
    assert body is not None
    low, high = 0.0, 1.0
    for _ in range(steps):
        body.threshold = (low + high) / 2
        executed = torch.cat([torch.stack(model(x).gate_actions, 1) for x in batches])
        if 1 - float(executed.mean()) < share:
            low = body.threshold
        else:
            high = body.threshold
    return (low + high) / 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", choices=["rnn", "ffgate1", "ffgate2"], default="rnn")
    parser.add_argument("--depth", type=int, default=110)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--smoke", action="store_true", help="SkipNet-38, 2 batches of 8, 1 repeat, 3 bisection steps (tests)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        # one thread: on a loaded machine two OpenMP threads wait on each other far longer than tiny ops take
        args.depth, args.batches, args.batch_size, args.repeats, args.threads = 38, 2, 8, 1, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = models.build("skipnet", num_classes=10, depth=args.depth, gate=args.gate).eval()
    body = gated_body(model)
    assert body is not None
    costs = gated_costs(model, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch_size, 3, 32, 32, generator=g) for _ in range(args.batches)]
    threshold = threshold_for_skipping(model, batches[:4], SKIP_SHARE, 3 if args.smoke else BISECTION_STEPS)
    decisions: list[torch.Tensor] = []

    def run(t: float) -> None:
        body.threshold = t
        with torch.no_grad():
            decisions[:] = [torch.cat([torch.stack(model(x).gate_actions, 1) for x in batches])]

    run(threshold)  # warm-up, both paths
    run(-1.0)
    # back-to-back pairs, so the machine's drifting load cancels in each ratio; the skipping run goes first, so
    # ``decisions`` holds the all-executed run's afterwards: record the skipping run's before the pairs
    run(threshold)
    executed = decisions[0]
    times_skip, times_all = paired_times(lambda: run(threshold), lambda: run(-1.0), repeats=args.repeats)
    ratios = [a / b for a, b in zip(times_skip, times_all, strict=True)]
    skipped = 1 - float(executed.mean())
    mixed = float(((executed.mean(0) > 0) & (executed.mean(0) < 1)).double().mean())  # blocks run on part of a batch
    macs_ratio = float(costs.per_sample(executed).mean()) / costs.full
    ratio = statistics.median(ratios)
    command, env = command_line(__file__, argv), environment(threads=args.threads)
    result = {
        "command": command,
        "environment": env,
        "model": f"skipnet depth {args.depth}, gate {args.gate}, CIFAR stem, random weights, batch {args.batch_size}",
        "threshold": threshold,
        "skipped_fraction": skipped,
        "blocks_with_mixed_decisions": mixed,
        "macs_ratio": macs_ratio,
        "wall_ratio": ratio,
        "seconds_skipping": statistics.median(times_skip),
        "seconds_all_executed": statistics.median(times_all),
        "target_wall_ratio": TARGET_WALL_RATIO,
        "met": ratio <= TARGET_WALL_RATIO,
    }
    lines = [
        *header("SkipNet: wall time with skipped blocks not computed", command, env),
        f"{result['model']}; {args.batches} batches. Gate threshold {threshold:.4f} (bisected for "
        f"{100 * SKIP_SHARE:.0f} % skips): {100 * skipped:.1f} % of (sample, block) decisions skip; "
        f"{100 * mixed:.0f} % of the gated blocks run on part of each batch (gathered samples).",
        "",
        "| | seconds (median) | ratio |",
        "| --- | --- | --- |",
        f"| all blocks executed | {result['seconds_all_executed']:.3f} | 1.000 |",
        f"| skipping | {result['seconds_skipping']:.3f} | {ratio:.3f} (median of {args.repeats} back-to-back pairs) |",
        "",
        f"MACs ratio (per-sample, gates included): {macs_ratio:.3f}. Target wall-time ratio <= {TARGET_WALL_RATIO}: "
        f"{verdict(ratio <= TARGET_WALL_RATIO)}.",
        "",
    ]
    if not (args.smoke and args.results_dir == RESULTS_DIR):  # a smoke run never overwrites the committed result
        write_results("skip_speed", result, "\n".join(lines), args.results_dir)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
