"""Budget-aware evaluation of multi-exit networks: ``python -m dynsila.evaluate RUN_DIR``.

One pass over a split stores every exit's logits (N x K x C); every criterion is computed from that array.

- **anytime**: top-1 (and top-5 when C >= 10) of every exit on test, with its MACs.
- **budgeted** batch classification (MSDNet): for target exit distributions share_k ~ q^k (39 values
  q = 0.05 ... 1.95), fit one confidence threshold per exit on the validation split, apply them to test, and
  report average MACs, accuracy and the realised exit fractions. Confidence criteria are a table
  (``CONFIDENCE``): max softmax probability (default), negative entropy, margin between the top two.

Threshold rule (as the MSDNet code): at exit k, among the samples that have not exited yet, the threshold is
the confidence of the ``floor(N * share_k)``-th most confident one; a sample exits at the first exit whose
threshold its confidence reaches (``>=``); the last exit takes everything left. Differences from that code,
on purpose: a quota of zero exits nobody (threshold +inf); where ties at earlier exits left fewer samples
than the quota, all of them exit (the MSDNet code then exits none); ties at a threshold all exit, since no
threshold can split them (the realised fractions show it). Confidences are computed in float64 so saturated
softmax outputs rarely tie.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dynsila.checkpoint import atomic_write_text
from dynsila.data import build_splits, make_loader, normalize
from dynsila.errors import DynsilaError
from dynsila.flops import ExitCost, GatedCosts, exit_costs, gated_costs
from dynsila.models import exit_logits, gated_body
from dynsila.rundir import input_shape, load_deploy_model

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]
DEFAULT_QS = tuple(p / 20 for p in range(1, 40))  # 0.05, 0.10, ..., 1.95
EVAL_FILE = "eval.json"
MACS_UNITS = "MACs (multiply-accumulates, conv+linear), batch 1, deploy model"


# --- confidence criteria: logits N x K x C -> confidence N x K, higher = more confident -------------------


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.double(), dim=-1).amax(dim=-1)


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * log_p).sum(dim=-1)


def margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = F.softmax(logits.double(), dim=-1).topk(min(2, logits.shape[-1]), dim=-1).values
    return top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0)


CONFIDENCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_prob": max_prob,
    "entropy": negative_entropy,
    "margin": margin,
}


# --- one pass over a split ----------------------------------------------------------------------------------


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: DataLoader,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (bare, in eval mode) over ``loader``: logits ``N x K x C`` (float32, CPU) and labels ``N``."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        x = normalize(images.to(device, non_blocking=True), mean, std)
        all_logits.append(torch.stack(exit_logits(model(x)), dim=1).float().cpu())
        all_labels.append(labels)
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Top-k accuracy in percent of every exit: logits ``N x K x C``, labels ``N`` -> ``K``."""
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[1])
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # N x K x k
    hit = (top == labels[:, None, None]).any(dim=-1).float()
    return hit.mean(dim=0) * 100.0


# --- anytime prediction -------------------------------------------------------------------------------------


@dataclass
class ExitResult:
    exit: int
    macs: int  # exit only
    macs_cumulative: int  # as evaluated: what reaching this exit costs an early-exit run
    fvcore_total: int
    fvcore_total_cumulative: int
    params: int
    params_cumulative: int
    val_top1: float
    test_top1: float
    test_top5: float | None  # None when there are fewer than 10 classes


def anytime(
    val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], costs: list[ExitCost]
) -> list[ExitResult]:
    val_top1, test_top1 = topk_accuracy(*val).tolist(), topk_accuracy(*test).tolist()
    test_top5 = topk_accuracy(*test, k=5).tolist() if test[0].shape[-1] >= 10 else [None] * len(costs)
    return [
        ExitResult(**asdict(c), val_top1=v, test_top1=t, test_top5=t5)
        for c, v, t, t5 in zip(costs, val_top1, test_top1, test_top5, strict=True)
    ]


# --- budgeted batch classification --------------------------------------------------------------------------


@dataclass
class BudgetedRow:
    q: float
    target_fractions: list[float]  # share of samples meant for each exit
    thresholds: list[float]  # per exit, on the criterion's scale (last exit: -inf)
    val_top1: float
    val_avg_macs: float
    val_exit_fractions: list[float]
    test_top1: float
    avg_macs: float  # on test
    exit_fractions: list[float]  # realised on test


def geometric_fractions(qs: Sequence[float], num_exits: int) -> torch.Tensor:
    """``Q x K`` target exit distributions, share of exit k proportional to q^k (k = 1..K)."""
    q = torch.as_tensor(list(qs), dtype=torch.float64)[:, None]
    w = q ** torch.arange(1, num_exits + 1, dtype=torch.float64)[None]
    return w / w.sum(dim=1, keepdim=True)


def fit_thresholds(confidence: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Thresholds ``Q x K`` that send ``floor(N * fractions[:, k])`` samples to exit k (ties aside).

    confidence: ``N x K`` (validation split); fractions: ``Q x K``, rows summing to 1."""
    n, k_exits = confidence.shape
    q = fractions.shape[0]
    confidence = confidence.double()
    thresholds = torch.full((q, k_exits), math.inf, dtype=torch.float64)
    thresholds[:, -1] = -math.inf
    remaining = torch.ones(q, n, dtype=torch.bool)
    for k in range(k_exits - 1):
        quota = torch.floor(n * fractions[:, k] + 1e-9).long()  # 1e-9: 0.3 * 10 must give 3, not 2
        ranked = confidence[:, k].expand(q, n).masked_fill(~remaining, -math.inf).sort(dim=1, descending=True).values
        t = ranked.gather(1, (quota - 1).clamp(0, n - 1)[:, None]).squeeze(1)
        t = torch.where(quota == 0, math.inf, t)
        t = torch.where(quota > remaining.sum(dim=1), -math.inf, t)
        thresholds[:, k] = t
        remaining &= ~(confidence[None, :, k] >= t[:, None])
    return thresholds


def exit_indices(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``Q x N`` index of the first exit whose threshold each sample's confidence reaches (last exit always)."""
    passes = confidence.double()[None] >= thresholds[:, None, :]  # Q x N x K
    passes[..., -1] = True
    return passes.to(torch.uint8).argmax(dim=-1)  # argmax returns the first maximal index


def _apply(
    logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor, costs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accuracy (Q), average cost (Q) and exit fractions (Q x K) of thresholds applied to one split."""
    exits = exit_indices(confidence, thresholds)
    correct = logits.argmax(dim=-1) == labels[:, None]  # N x K
    hit = correct[torch.arange(len(labels))[None], exits]  # Q x N
    fractions = F.one_hot(exits, confidence.shape[1]).double().mean(dim=1)
    return hit.double().mean(dim=1) * 100, fractions @ costs, fractions


def budgeted_sweep(
    val_logits: ArrayLike,
    val_labels: ArrayLike,
    test_logits: ArrayLike,
    test_labels: ArrayLike,
    costs: ArrayLike,
    criterion: str = "max_prob",
    qs: Sequence[float] | None = None,
) -> list[BudgetedRow]:
    """MSDNet's budgeted batch classification: thresholds fitted on val, applied to test, one row per q.

    Logits ``N x K x C``, labels ``N`` (numpy or torch); ``costs``: MACs of reaching each exit as evaluated
    (earlier classifiers included), length K."""
    if criterion not in CONFIDENCE:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CONFIDENCE)}")
    vl, vy, tl, ty = (torch.as_tensor(np.asarray(a)) for a in (val_logits, val_labels, test_logits, test_labels))
    cost = torch.as_tensor(np.asarray(costs, dtype=np.float64))
    qs = DEFAULT_QS if qs is None else tuple(qs)
    fractions = geometric_fractions(qs, vl.shape[1])
    val_conf, test_conf = CONFIDENCE[criterion](vl), CONFIDENCE[criterion](tl)
    thresholds = fit_thresholds(val_conf, fractions)
    val_acc, val_cost, val_frac = _apply(vl, vy, val_conf, thresholds, cost)
    test_acc, test_cost, test_frac = _apply(tl, ty, test_conf, thresholds, cost)
    return [
        BudgetedRow(
            q=float(qs[i]),
            target_fractions=fractions[i].tolist(),
            thresholds=thresholds[i].tolist(),
            val_top1=float(val_acc[i]),
            val_avg_macs=float(val_cost[i]),
            val_exit_fractions=val_frac[i].tolist(),
            test_top1=float(test_acc[i]),
            avg_macs=float(test_cost[i]),
            exit_fractions=test_frac[i].tolist(),
        )
        for i in range(len(qs))
    ]


def thresholds_for_budget(
    val_logits: ArrayLike, costs: ArrayLike, budget: float, criterion: str = "max_prob"
) -> tuple[torch.Tensor, float]:
    """Thresholds (K) whose average validation cost is the largest not above ``budget`` MACs, over a fine grid
    of geometric exit distributions; with it the expected cost. A budget below exit 1's cost cannot be met:
    every sample then exits at exit 1 (the cheapest possible run)."""
    vl = torch.as_tensor(np.asarray(val_logits))
    cost = torch.as_tensor(np.asarray(costs, dtype=np.float64))
    if budget < cost[0]:
        all_first = torch.full((vl.shape[1],), -math.inf, dtype=torch.float64)
        return all_first, float(cost[0])
    qs = torch.logspace(-3, 3, 601, dtype=torch.float64).tolist()
    conf = CONFIDENCE[criterion](vl)
    thresholds = fit_thresholds(conf, geometric_fractions(qs, vl.shape[1]))
    exits = exit_indices(conf, thresholds)
    spent = F.one_hot(exits, vl.shape[1]).double().mean(dim=1) @ cost
    spent = torch.where(spent <= budget, spent, -math.inf)
    best = int(spent.argmax())
    if not math.isfinite(float(spent[best])):  # only the all-at-exit-1 mix fits
        return torch.full((vl.shape[1],), -math.inf, dtype=torch.float64), float(cost[0])
    return thresholds[best], float(spent[best])


# --- gated networks: accuracy versus average per-sample MACs ------------------------------------------------

GATE_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1 ... 0.9


@dataclass
class GatedPass:
    logits: torch.Tensor  # N x C
    labels: torch.Tensor  # N
    executed: torch.Tensor  # N x G, 1 where the gated block ran
    macs: torch.Tensor  # N, per-sample MACs


@torch.no_grad()
def gated_pass(
    model: nn.Module,
    loader: DataLoader,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str,
    costs: GatedCosts,
) -> GatedPass:
    """One pass of a gated network (eval mode: skipped blocks are not computed) at its current threshold."""
    model.eval()
    logits, labels, executed = [], [], []
    for images, y in loader:
        out = model(normalize(images.to(device), mean, std))
        logits.append(out.logits[-1].float().cpu())
        executed.append(torch.stack(out.gate_actions, dim=1).cpu())
        labels.append(y)
    run = torch.cat(executed)
    return GatedPass(torch.cat(logits), torch.cat(labels), run, costs.per_sample(run))


def gated_results(
    model: nn.Module,
    val: GatedPass,
    test: GatedPass,
    loaders: tuple[DataLoader, DataLoader],
    splits: Any,
    device: str,
    costs: GatedCosts,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The exit entry (at the model's threshold) and the threshold-sweep curve, in the evaluator's schema."""
    body = gated_body(model)
    assert body is not None
    params = sum(p.numel() for p in model.parameters())
    n_classes = test.logits.shape[-1]
    exit_row = {
        "exit": 1,
        "macs": float(test.macs.mean()),
        "macs_cumulative": float(test.macs.mean()),
        "fvcore_total": None,
        "fvcore_total_cumulative": None,
        "params": params,
        "params_cumulative": params,
        "val_top1": _top1(val),
        "test_top1": _top1(test),
        "test_top5": float(topk_accuracy(test.logits[:, None], test.labels, 5)[0]) if n_classes >= 10 else None,
        "macs_all_blocks": costs.full,
        "macs_plain_resnet": costs.plain,
        "executed_fraction": float(test.executed.mean()),
    }
    points = []
    default = body.threshold
    try:
        for t in GATE_THRESHOLDS:
            body.threshold = t
            v, s = (gated_pass(model, loader, splits.mean, splits.std, device, costs) for loader in loaders)
            points.append(
                {
                    "threshold": t,
                    "avg_macs": float(s.macs.mean()),
                    "test_top1": _top1(s),
                    "val_top1": _top1(v),
                    "val_avg_macs": float(v.macs.mean()),
                    "executed_fraction": float(s.executed.mean()),  # SkipNet's "computation %": blocks run
                    "macs_fraction": float(s.macs.mean()) / costs.plain,  # true MACs against the plain ResNet
                }
            )
    finally:
        body.threshold = default
    curve = {"name": "gated (threshold sweep)", "kind": "gated", "criterion": "gate_threshold", "points": points}
    return [exit_row], [curve]


def _top1(p: GatedPass) -> float:
    return float(topk_accuracy(p.logits[:, None], p.labels)[0])


# --- a run directory ----------------------------------------------------------------------------------------


def evaluate_run(
    run_dir: Path, criteria: Sequence[str] = tuple(CONFIDENCE), device: str = "cpu", batch_size: int = 256
) -> dict[str, Any]:
    """Evaluate a finished run's deploy model: costs, anytime and budgeted results; writes ``eval.json``."""
    run_dir = Path(run_dir)
    model, cfg = load_deploy_model(run_dir)
    splits = build_splits(cfg.data)
    val_loader = make_loader(splits.val, batch_size, False)
    test_loader = make_loader(splits.test, batch_size, False)
    if gated_body(model) is not None:  # gated network: one exit, cost per sample
        gated = gated_costs(model, input_shape(cfg))
        model.to(device)
        val_pass = gated_pass(model, val_loader, splits.mean, splits.std, device, gated)
        test_pass = gated_pass(model, test_loader, splits.mean, splits.std, device, gated)
        sizes = {"val": len(val_pass.labels), "test": len(test_pass.labels)}
        exits, curves = gated_results(model, val_pass, test_pass, (val_loader, test_loader), splits, device, gated)
    else:
        costs = exit_costs(model, input_shape(cfg))
        model.to(device)
        val = collect_logits(model, val_loader, splits.mean, splits.std, device)
        test = collect_logits(model, test_loader, splits.mean, splits.std, device)
        sizes = {"val": len(val[1]), "test": len(test[1])}
        exits = [asdict(e) for e in anytime(val, test, costs)]
        cumulative = [c.macs_cumulative for c in costs]
        curves = []
        for criterion in criteria:
            rows = budgeted_sweep(*val, *test, cumulative, criterion=criterion)
            curves.append(
                {
                    "name": f"budgeted ({criterion})",
                    "kind": "budgeted",
                    "criterion": criterion,
                    "points": [asdict(r) for r in rows],
                }
            )
    report = {
        "run": cfg.name,
        "run_dir": str(run_dir),
        "model": cfg.model["name"],
        "dataset": cfg.data.name,
        "sila": cfg.sila.enabled,
        "seed": cfg.seed,
        "units": MACS_UNITS,
        "splits": sizes,
        "exits": exits,
        "curves": curves,
    }
    atomic_write_text(run_dir / EVAL_FILE, json.dumps(json_safe(report), indent=1, allow_nan=False))
    return report


def json_safe(value: Any) -> Any:
    """Strict JSON has no infinities: write them as the strings "inf" / "-inf" (``float()`` reads them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def format_report(report: dict[str, Any], criteria: Sequence[str] | None = None) -> str:
    """Anytime table and one budgeted table per criterion (every fourth q, to stay readable)."""
    lines = [
        f"{report['run']}: {report['model']} on {report['dataset']} (val {report['splits']['val']}, "
        f"test {report['splits']['test']}); {report['units']}",
        "",
        "anytime prediction",
        f"{'exit':>4}  {'MACs (as evaluated)':>19}  {'params':>9}  {'val top-1':>9}  {'test top-1':>10}  "
        f"{'test top-5':>10}",
    ]
    for e in report["exits"]:
        top5 = f"{e['test_top5']:>10.2f}" if e["test_top5"] is not None else f"{'-':>10}"
        lines.append(
            f"{e['exit']:>4}  {e['macs_cumulative'] / 1e6:>18.2f}M  {e['params_cumulative'] / 1e6:>8.3f}M  "
            f"{e['val_top1']:>9.2f}  {e['test_top1']:>10.2f}  {top5}"
        )
    for curve in report["curves"]:
        if curve["kind"] == "gated":
            lines += [
                "",
                f"{curve['name']}: per-sample MACs, skipped blocks not computed",
                f"{'threshold':>9}  {'avg MACs':>10}  {'test top-1':>10}  {'blocks run':>10}  {'MACs vs ResNet':>14}",
            ]
            lines += [
                f"{p['threshold']:>9.1f}  {p['avg_macs'] / 1e6:>9.2f}M  {p['test_top1']:>10.2f}  "
                f"{p['executed_fraction']:>10.2f}  {p['macs_fraction']:>14.2f}"
                for p in curve["points"]
            ]
            continue
        if criteria is not None and curve.get("criterion") not in criteria:
            continue
        lines += [
            "",
            f"{curve['name']}: thresholds fitted on val, applied to test",
            f"{'q':>5}  {'avg MACs':>10}  {'test top-1':>10}  {'val top-1':>9}  exit fractions (test)",
        ]
        for p in curve["points"][::4]:
            fractions = " ".join(f"{f:.2f}" for f in p["exit_fractions"])
            lines.append(
                f"{p['q']:>5.2f}  {p['avg_macs'] / 1e6:>9.2f}M  {p['test_top1']:>10.2f}  "
                f"{p['val_top1']:>9.2f}  {fractions}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynsila.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--criteria", nargs="+", default=list(CONFIDENCE), choices=sorted(CONFIDENCE))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        report = evaluate_run(args.run_dir, args.criteria, args.device)
    except DynsilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"\nwrote {args.run_dir / EVAL_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
