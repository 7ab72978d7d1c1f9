"""Exit thresholds for budgeted early exit: confidence criteria, fitting and applying thresholds, the budget sweep.

Pure tensor maths on stored logits; imports torch alone, so the runner and the evaluator share it without either
pulling in the other's dependencies.

Threshold rule (as the MSDNet code): at exit k, among the samples that have not exited yet, the threshold is
the confidence of the ``floor(N * share_k)``-th most confident one; a sample exits at the first exit whose
threshold its confidence reaches (``>=``); the last exit takes everything left. Differences from that code,
on purpose: a quota of zero exits nobody (threshold +inf); where ties at earlier exits left fewer samples
than the quota, all of them exit (the MSDNet code then exits none); ties at a threshold all exit, since no
threshold can split them (the realised fractions show it). Confidences are computed in float64 so saturated
softmax outputs rarely tie.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np

    ArrayLike = torch.Tensor | np.ndarray[Any, Any] | Sequence[float] | Sequence[int]
else:
    ArrayLike = Any

DEFAULT_QS = tuple(p / 20 for p in range(1, 40))  # 0.05, 0.10, ..., 1.95


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


def confidence_of(criterion: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The criterion's function; a clear error naming the choices for an unknown one."""
    if criterion not in CONFIDENCE:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {sorted(CONFIDENCE)}")
    return CONFIDENCE[criterion]


# --- fitting and applying thresholds -----------------------------------------------------------------------


def geometric_fractions(qs: Sequence[float], num_exits: int) -> torch.Tensor:
    """``Q x K`` target exit distributions, share of exit k proportional to q^k (k = 1..K)."""
    q = torch.as_tensor(list(qs), dtype=torch.float64)[:, None]
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)[None]
    w = q**k
    overflow = ~torch.isfinite(w.sum(dim=1, keepdim=True))  # a huge q (1e300 ** 2): those rows in logs
    if overflow.any():
        log_w = k * torch.log(q)
        w = torch.where(overflow, torch.exp(log_w - log_w.max(dim=1, keepdim=True).values), w)
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


def _apply(
    logits: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor, costs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accuracy (Q), average cost (Q) and exit fractions (Q x K) of thresholds applied to one split."""
    exits = exit_indices(confidence, thresholds)
    correct = logits.argmax(dim=-1) == labels[:, None]  # N x K
    hit = correct[torch.arange(len(labels))[None], exits]  # Q x N
    fractions = F.one_hot(exits, confidence.shape[1]).double().mean(dim=1)
    return hit.double().mean(dim=1) * 100, fractions @ costs, fractions


def _tensor(values: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype)


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

    Logits ``N x K x C``, labels ``N`` (numpy or torch); ``costs``: MACs of ending at each exit (length K), in
    whichever convention the caller reports (the evaluator passes the paper's: every exit up to k evaluated)."""
    confidence = confidence_of(criterion)
    vl, vy, tl, ty = (_tensor(a) for a in (val_logits, val_labels, test_logits, test_labels))
    cost = _tensor(costs, torch.float64)
    qs = DEFAULT_QS if qs is None else tuple(qs)
    fractions = geometric_fractions(qs, vl.shape[1])
    val_conf, test_conf = confidence(vl), confidence(tl)
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
    vl = _tensor(val_logits)
    cost = _tensor(costs, torch.float64)
    all_first = torch.full((vl.shape[1],), -math.inf, dtype=torch.float64)
    if budget < cost[0]:
        return all_first, float(cost[0])
    qs = torch.logspace(-3, 3, 601, dtype=torch.float64).tolist()
    conf = confidence_of(criterion)(vl)
    thresholds = fit_thresholds(conf, geometric_fractions(qs, vl.shape[1]))
    exits = exit_indices(conf, thresholds)
    spent = F.one_hot(exits, vl.shape[1]).double().mean(dim=1) @ cost
    spent = torch.where(spent <= budget, spent, -math.inf)
    best = int(spent.argmax())
    if not math.isfinite(float(spent[best])):  # only the all-at-exit-1 mix fits
        return all_first, float(cost[0])
    return thresholds[best], float(spent[best])


def thresholds_for_target(
    val_logits: torch.Tensor, costs: Sequence[float], criterion: str, q: float | None, budget: float | None
) -> tuple[torch.Tensor, float | None]:
    """Thresholds (K) for one target, fitted on validation logits (N x K x C): the exit distribution
    share_k ~ q^k, or (``budget``) the largest average validation cost within that many MACs; with the expected
    average cost for a budget (None for q). The one rule that ``python -m dynsila.infer`` and the ONNX export
    both apply to a run."""
    if (q is None) == (budget is None):
        raise ValueError("give exactly one of q and budget")
    if q is not None:
        return fit_thresholds(CONFIDENCE[criterion](val_logits), geometric_fractions([q], len(costs)))[0], None
    assert budget is not None
    return thresholds_for_budget(val_logits, list(costs), budget, criterion)
