"""Early-exit inference on a trained run: ``python -m dynsila.infer RUN_DIR (--q Q | --budget MACS)``.

Thresholds are fitted on the run's validation split (for the exit distribution share_k ~ q^k, or for the
largest average cost within ``--budget`` MACs), then the chosen split goes through ``EarlyExitRunner``:
samples stop being computed at the exit they take. Prints accuracy, average MACs, images/s and the exit
histogram.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dynsila.data import build_splits, make_loader, normalize
from dynsila.errors import DynsilaError
from dynsila.evaluate import CONFIDENCE, collect_logits, fit_thresholds, geometric_fractions, thresholds_for_budget
from dynsila.flops import exit_costs
from dynsila.models import gated_body
from dynsila.rundir import input_shape, load_deploy_model
from dynsila.runner import EarlyExitRunner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynsila.infer", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--q", type=float, help="exit distribution share_k ~ q^k (MSDNet's budget parameter)")
    target.add_argument("--budget", type=float, help="average MACs per image to stay within (on validation)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--criterion", choices=sorted(CONFIDENCE), default="max_prob")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        model, cfg = load_deploy_model(args.run_dir)
        if gated_body(model) is not None:
            raise DynsilaError(
                f"{args.run_dir} holds a gated network (one exit); early-exit thresholds do not apply: "
                f"use python -m dynsila.evaluate {args.run_dir} (it sweeps the gate threshold)"
            )
        splits = build_splits(cfg.data)
    except DynsilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    costs = [c.macs_cumulative for c in exit_costs(model, input_shape(cfg))]
    model.to(args.device)
    val_logits, _ = collect_logits(model, make_loader(splits.val, 256, False), splits.mean, splits.std, args.device)
    if args.q is not None:
        conf = CONFIDENCE[args.criterion](val_logits)
        thresholds = fit_thresholds(conf, geometric_fractions([args.q], len(costs)))[0]
    else:
        thresholds, expected = thresholds_for_budget(val_logits, costs, args.budget, args.criterion)
        if args.budget < costs[0]:
            print(
                f"note: a budget of {args.budget / 1e6:.2f}M MACs is below exit 1's cost ({costs[0] / 1e6:.2f}M): "
                "every sample exits at exit 1"
            )
        print(f"thresholds fitted on val for {expected / 1e6:.2f}M MACs on average (budget {args.budget / 1e6:.2f}M)")
    runner = EarlyExitRunner(model, thresholds, args.criterion, costs=costs)

    dataset = splits.test if args.split == "test" else splits.val
    hits, seen, spent, seconds = 0, 0, 0.0, 0.0
    histogram = torch.zeros(len(costs), dtype=torch.long)
    for images, labels in make_loader(dataset, args.batch_size, shuffle=False):
        x = normalize(images.to(args.device), splits.mean, splits.std)
        start = time.perf_counter()
        result = runner(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        hits += int((result.predictions.cpu() == labels).sum())
        seen += len(labels)
        spent += float(result.macs.sum())
        histogram += torch.bincount(result.exit_index.cpu(), minlength=len(costs))
    print(
        f"{cfg.name} on {args.split} ({seen} images, batch {args.batch_size}, {args.device}, "
        f"criterion {args.criterion})"
    )
    print(
        f"top-1 {100 * hits / seen:.2f} %   average {spent / seen / 1e6:.3f}M MACs "
        f"({100 * spent / seen / costs[-1]:.1f} % of running every exit)   {seen / seconds:.0f} images/s"
    )
    print("exit  threshold   images  share  MACs (as evaluated)")
    for k, count in enumerate(histogram.tolist()):
        t = "(rest)" if k == len(costs) - 1 else f"{float(thresholds[k]):.4f}"
        print(f"{k + 1:>4}  {t:>9}  {count:>7}  {count / seen:>5.2f}  {costs[k] / 1e6:>8.2f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
