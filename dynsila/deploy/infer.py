"""Early-exit inference on a trained run: ``python -m dynsila.infer RUN_DIR (--q Q | --budget MACS)``.

Thresholds are fitted on the run's validation split (for the exit distribution share_k ~ q^k, or for the
largest average cost within ``--budget`` MACs), then the chosen split goes through ``EarlyExitRunner``:
samples stop being computed at the exit they take (and the parts of a stage only later exits read are computed
only for the samples that go on). Prints accuracy, average MACs (in the paper's convention, where every stage
runs whole, and as spent under lazy evaluation), images/s and the exit histogram.

A gated network (SkipNet) has one exit: its gate threshold is set by ``--gate-threshold`` or fitted on validation
for ``--budget``, and the split goes through ``GatedRunner`` (each sample runs only the blocks its gates open).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dynsila.budget.flops import exit_costs, gated_costs
from dynsila.budget.thresholds import CONFIDENCE, thresholds_for_target
from dynsila.cli import USER_ERRORS, OneLineParser, at_least_one, device_name, fail, positive
from dynsila.config import Config
from dynsila.data import Splits, build_splits, make_loader, normalize
from dynsila.deploy.gated_runner import GatedRunner, threshold_for_budget
from dynsila.deploy.policy_args import add_epsilon_target, add_policy_arguments, describe, fit_policy
from dynsila.deploy.runner import EarlyExitRunner, raise_primitive_cache
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import collect_logits
from dynsila.models import MultiExitNetwork
from dynsila.policies.table import DEFAULT
from dynsila.runs.rundir import input_shape, load_deploy_model


@dataclass
class Tally:
    """What a pass over a split gives: hits, images, MACs spent, seconds in the runner, exit histogram."""

    hits: int
    seen: int
    spent: float  # MACs as evaluated (the paper's convention)
    spent_lazy: float  # MACs the runner really spent (lazy evaluation)
    seconds: float
    histogram: torch.Tensor  # K, images per exit


def add_exit_arguments(parser: argparse.ArgumentParser) -> None:
    """What decides the exits, as ``fitted_runner`` and ``gated_runner`` read it: one target (``--q``,
    ``--budget``, ``--gate-threshold`` or ``--epsilon``) and the exit policy with its parameters."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--q", type=positive, help="exit distribution share_k ~ q^k (MSDNet's budget parameter)")
    target.add_argument("--budget", type=positive, help="average MACs per image to stay within (on validation)")
    target.add_argument("--gate-threshold", type=float, help="gated networks: a gate opens at this probability")
    add_epsilon_target(target)
    add_policy_arguments(parser)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m dynsila.infer", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    add_exit_arguments(parser)
    parser.add_argument("--batch-size", type=at_least_one, default=64)
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--criterion", choices=sorted(CONFIDENCE), default="max_prob")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def _fit(args: argparse.Namespace, val_logits: torch.Tensor, costs: list[int]) -> torch.Tensor:
    """Thresholds (K) for ``--q`` or ``--budget``, fitted on the validation logits ``N x K x C``."""
    thresholds, expected = thresholds_for_target(val_logits, costs, args.criterion, args.q, args.budget)
    if expected is None:
        return thresholds
    if args.budget < costs[0]:
        print(
            f"note: a budget of {args.budget / 1e6:.2f}M MACs is below exit 1's cost ({costs[0] / 1e6:.2f}M): "
            "every sample exits at exit 1"
        )
    print(f"thresholds fitted on val for {expected / 1e6:.2f}M MACs on average (budget {args.budget / 1e6:.2f}M)")
    return thresholds


def _timed_batches(
    runner: Callable[[torch.Tensor], Any], dataset: Dataset, splits: Splits, args: argparse.Namespace
) -> Iterator[tuple[Any, torch.Tensor, float]]:
    """(the runner's result, the labels, seconds in the runner) per batch of ``dataset``, normalised on the device;
    on CUDA the queue is drained inside the timed span, so its kernels are counted."""
    for images, labels in make_loader(dataset, args.batch_size, shuffle=False):
        x = normalize(images.to(args.device), splits.mean, splits.std)
        start = time.perf_counter()
        result = runner(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        yield result, labels, time.perf_counter() - start


def _run(runner: EarlyExitRunner, splits: Splits, args: argparse.Namespace, lazy_costs: list[int]) -> Tally:
    dataset = splits.test if args.split == "test" else splits.val
    num_exits = len(lazy_costs)
    tally = Tally(0, 0, 0.0, 0.0, 0.0, torch.zeros(num_exits, dtype=torch.long))
    for result, labels, seconds in _timed_batches(runner, dataset, splits, args):
        tally.seconds += seconds
        tally.hits += int((result.predictions.cpu() == labels).sum())
        tally.seen += len(labels)
        tally.spent += float(result.macs.sum())
        histogram = torch.bincount(result.exit_index.cpu(), minlength=num_exits)
        tally.spent_lazy += float(histogram.double() @ torch.tensor(lazy_costs, dtype=torch.float64))
        tally.histogram += histogram
    return tally


def _print_summary(
    name: str, args: argparse.Namespace, tally: Tally, thresholds: torch.Tensor, costs: list[int], lazy: list[int]
) -> None:
    seen = tally.seen
    print(f"{name} on {args.split} ({seen} images, batch {args.batch_size}, {args.device}, criterion {args.criterion})")
    print(
        f"top-1 {100 * tally.hits / seen:.2f} %   average {tally.spent / seen / 1e6:.3f}M MACs as evaluated "
        f"({100 * tally.spent / seen / costs[-1]:.1f} % of running every exit), {tally.spent_lazy / seen / 1e6:.3f}M "
        f"spent with lazy evaluation   {seen / tally.seconds:.0f} images/s"
    )
    print("exit  threshold   images  share  MACs (as evaluated)  MACs lazy")
    for k, count in enumerate(tally.histogram.tolist()):
        t = "(rest)" if k == len(costs) - 1 else f"{float(thresholds[k]):.4f}"
        print(f"{k + 1:>4}  {t:>9}  {count:>7}  {count / seen:>5.2f}  {costs[k] / 1e6:>18.2f}M  {lazy[k] / 1e6:>8.2f}M")


def fitted_runner(
    model: MultiExitNetwork, cfg: Config, splits: Splits, args: argparse.Namespace
) -> tuple[EarlyExitRunner, torch.Tensor, list[int], list[int]]:
    """The early-exit runner on ``args.device`` fitted on the run's validation split for ``args.q``, ``args.budget``
    or ``args.epsilon``: the quota thresholds (``args.criterion``), or ``args.policy`` with its parameters; with the
    thresholds, the costs as evaluated and the lazy costs."""
    counted = exit_costs(model, input_shape(cfg))
    costs, lazy = [c.macs_cumulative for c in counted], [c.macs_lazy for c in counted]
    model.to(args.device)
    val = collect_logits(model, make_loader(splits.val, 256, False), splits.mean, splits.std, args.device)
    if getattr(args, "policy", DEFAULT) == DEFAULT and getattr(args, "epsilon", None) is None:
        thresholds = _fit(args, val[0], costs)
        return EarlyExitRunner(model, thresholds, args.criterion, costs=costs), thresholds, costs, lazy
    spec = fit_policy(args, *val, costs)
    print(describe(spec))
    runner = EarlyExitRunner(model, None, costs=costs, policy=spec)
    return runner, runner.thresholds, costs, lazy


def gated_runner(model: MultiExitNetwork, cfg: Config, splits: Splits, args: argparse.Namespace) -> GatedRunner:
    """A gated network's runner on ``args.device`` at ``args.gate_threshold``, or at the threshold fitted on the
    validation split for ``args.budget``."""
    runner = GatedRunner(model.to(args.device), 0.5, gated_costs(model, input_shape(cfg)))
    threshold = args.gate_threshold
    if threshold is None:
        val = [normalize(x.to(args.device), splits.mean, splits.std) for x, _ in make_loader(splits.val, 256, False)]
        threshold = threshold_for_budget(runner, val, args.budget)
        print(f"gate threshold {threshold:.4f} fitted on val for at most {args.budget / 1e6:.2f}M MACs on average")
    runner.set_threshold(threshold)
    return runner


def _load(run_dir: Path) -> tuple[MultiExitNetwork, Config, Splits]:
    model, cfg = load_deploy_model(run_dir)
    return model, cfg, build_splits(cfg.data)


def _run_gated(model: MultiExitNetwork, cfg: Config, splits: Splits, args: argparse.Namespace) -> None:
    """A gated network: the gate threshold (given, or fitted on val for ``--budget``), then the split through
    ``GatedRunner``."""
    if args.policy != "quotas" or args.epsilon is not None:
        raise DynsilaError(
            f"{args.run_dir} holds a gated network (one exit): --policy {args.policy} does not apply; pass --budget "
            "MACS or --gate-threshold T"
        )
    if args.q is not None:
        raise DynsilaError(
            f"{args.run_dir} holds a gated network (one exit, gates): --q sets exit thresholds; pass --budget MACS "
            "or --gate-threshold T"
        )
    runner = gated_runner(model, cfg, splits, args)
    threshold, costs = runner.body.threshold, runner.costs
    dataset = splits.test if args.split == "test" else splits.val
    hits = seen = 0
    spent, seconds, executed = 0.0, 0.0, 0.0
    for result, labels, batch_seconds in _timed_batches(runner, dataset, splits, args):
        seconds += batch_seconds
        hits, seen = hits + int((result.predictions.cpu() == labels).sum()), seen + len(labels)
        spent, executed = spent + float(result.macs.sum()), executed + float(result.executed.sum())
    blocks = len(costs.blocks)
    print(f"{cfg.name} on {args.split} ({seen} images, batch {args.batch_size}, {args.device}, gate threshold "
          f"{threshold:.4f})")  # fmt: skip
    print(
        f"top-1 {100 * hits / seen:.2f} %   average {spent / seen / 1e6:.3f}M MACs "
        f"({100 * spent / seen / costs.full:.1f} % of every block)   "
        f"{100 * executed / (seen * blocks):.1f} % of the gated blocks run   {seen / seconds:.0f} images/s"
    )


def main(argv: list[str] | None = None) -> int:
    raise_primitive_cache()  # first: oneDNN reads it at the process's first convolution
    args = _parse(argv)
    try:
        model, cfg, splits = _load(args.run_dir)
        if model.gated_body() is not None:
            _run_gated(model, cfg, splits, args)
            return 0
        if args.gate_threshold is not None:
            raise DynsilaError(f"{args.run_dir} holds a multi-exit network without gates: pass --q or --budget")
        runner, thresholds, costs, lazy = fitted_runner(model, cfg, splits, args)
        _print_summary(cfg.name, args, _run(runner, splits, args, lazy), thresholds, costs, lazy)
    except USER_ERRORS as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
