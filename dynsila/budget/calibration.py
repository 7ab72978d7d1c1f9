"""Per-exit temperature scaling: one temperature per exit, fitted on validation logits, and the calibration error.

Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern Neural Networks", ICML 2017: an exit's logits z are
divided by one scalar T > 0 chosen to minimise the negative log-likelihood of softmax(z / T) on held-out data.
The paper's anchor figure (its Table 1, "ECE (%) (with M=15 bins)", row CIFAR-100 / ResNet 110; read in the
arXiv 1706.04599 HTML rendering): 16.53 % uncalibrated, 1.26 % with temperature scaling. Our measurement on
trained exits is in ``benchmarks/results/calibrated_exits.md``.

Early exit compares confidences across exits, so each exit k gets its own T_k. Dividing by T_k > 0 keeps every
exit's argmax (its accuracy), but it moves the confidences the budgeted thresholds are fitted on, and with them
which exit each sample leaves at. The temperatures are fitted on the validation split alone; test only reads them.

The fit. With beta = 1/T the NLL, mean(logsumexp(beta z) - beta z_y), is convex in beta (a log-sum-exp of functions
linear in beta, minus a linear term), so its derivative mean(E_p[z] - z_y), p = softmax(beta z), never decreases.
Bisecting the sign of that derivative over log beta therefore converges on the unique minimiser inside the bracket
[T_MIN, T_MAX], to float64 precision after ``BISECTIONS`` halvings: no step size, no line search, no starting
point, the same answer on every machine, and no way to step to T <= 0 or overshoot on saturated logits, as a
gradient method on T can. Where the NLL still falls at a bracket's end (validation logits that separate the classes
perfectly want T -> 0), that end is returned. Computed in float64, so distinct float32 logits stay distinct after
the division and the argmax cannot change. Imports torch alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

T_MIN, T_MAX = 1e-2, 1e2  # the bracket of temperatures searched
BISECTIONS = 64  # halvings of the log-bracket: far below float64's resolution of log T at the end
ECE_BINS = 15  # equal-width confidence bins, as Guo et al. report ECE


@dataclass
class ExitCalibration:
    """Temperatures fitted on validation and each exit's ECE (percent, ``bins`` equal-width bins of the
    max-probability confidence) before and after scaling, on both splits; one entry per exit."""

    temperatures: list[float]
    val_ece_before: list[float]
    val_ece_after: list[float]
    test_ece_before: list[float]
    test_ece_after: list[float]
    bins: int = ECE_BINS


def check_split(logits: torch.Tensor, labels: torch.Tensor, split: str) -> None:
    """One clear error line for logits (``N x K x C``) and labels (``N``) calibration cannot use."""
    if logits.ndim != 3 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{split} logits must be N x K x C with N labels, got {tuple(logits.shape)} and {tuple(labels.shape)}; "
            "pass every exit's logits stacked on dim 1"
        )
    if logits.shape[0] == 0:
        raise ValueError(f"the {split} split is empty: temperatures need samples; give the run a validation split")
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(dim=-1).any(dim=0).nonzero()[0, 0]) + 1
        raise ValueError(f"{split} logits of exit {bad} are not finite (NaN or inf); the model diverged, retrain it")


def _nll_slope(logits: torch.Tensor, labels: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """d NLL / d beta per exit (``K``) at inverse temperatures ``beta`` (``K``); logits ``N x K x C`` float64."""
    p = F.softmax(logits * beta[None, :, None], dim=-1)
    true = logits.gather(-1, labels[:, None, None].expand(-1, logits.shape[1], 1)).squeeze(-1)
    return ((p * logits).sum(dim=-1) - true).mean(dim=0)


def fit_temperatures(val_logits: torch.Tensor, val_labels: torch.Tensor) -> torch.Tensor:
    """The NLL-minimising temperature of every exit (``K``, float64) on validation logits ``N x K x C``, labels
    ``N``; bisection on the slope in log(1/T) (see the module docstring)."""
    check_split(val_logits, val_labels, "validation")
    logits, labels = val_logits.double(), val_labels.long()
    k = logits.shape[1]
    lo = torch.full((k,), -math.log(T_MAX), dtype=torch.float64)  # log beta
    hi = torch.full((k,), -math.log(T_MIN), dtype=torch.float64)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        rising = _nll_slope(logits, labels, mid.exp()) > 0  # the minimum lies at smaller beta
        hi, lo = torch.where(rising, mid, hi), torch.where(rising, lo, mid)
    return (-(lo + hi) / 2).exp()


def apply_temperatures(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Logits ``N x K x C`` divided by each exit's temperature (``K``), in float64."""
    return logits.double() / temperatures.double()[None, :, None]


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """ECE in percent of every exit (``K``): confidence = max softmax probability, ``bins`` equal-width bins
    (lo, hi] over [0, 1], sum over bins of (share of samples) x |accuracy - mean confidence|."""
    p = F.softmax(logits.double(), dim=-1)
    confidence, prediction = p.max(dim=-1)  # N x K
    correct = (prediction == labels[:, None]).double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # N x K
    n, k = confidence.shape
    conf_sum = torch.zeros(bins, k, dtype=torch.float64).scatter_add_(0, index, confidence)
    hit_sum = torch.zeros(bins, k, dtype=torch.float64).scatter_add_(0, index, correct)
    return (conf_sum - hit_sum).abs().sum(dim=0) / n * 100  # |sum conf - sum hits| / n = share x |gap| per bin


def calibrate_exits(
    val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor, test_labels: torch.Tensor
) -> ExitCalibration:
    """Temperatures fitted on validation (logits ``N x K x C``, labels ``N``) and the ECE per exit before and after
    scaling on validation and test. Test is checked and measured, never fitted on."""
    check_split(test_logits, test_labels, "test")
    check_split(val_logits, val_labels, "validation")
    if val_logits.shape[1:] != test_logits.shape[1:]:
        (kv, cv), (kt, ct) = val_logits.shape[1:], test_logits.shape[1:]
        raise ValueError(f"validation has {kv} exits x {cv} classes, test {kt} x {ct}; pass one model's logits")
    temperatures = fit_temperatures(val_logits, val_labels)
    ece = expected_calibration_error
    return ExitCalibration(
        temperatures=temperatures.tolist(),
        val_ece_before=ece(val_logits, val_labels).tolist(),
        val_ece_after=ece(apply_temperatures(val_logits, temperatures), val_labels).tolist(),
        test_ece_before=ece(test_logits, test_labels).tolist(),
        test_ece_after=ece(apply_temperatures(test_logits, temperatures), test_labels).tolist(),
    )
