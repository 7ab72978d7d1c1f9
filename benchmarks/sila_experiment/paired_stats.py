"""Statistics for seed-paired comparisons of training methods (used by ``benchmarks/anytime.py``).

Every method is trained on the same seeds (same initial weights, data order and augmentation draws per seed),
so a method is compared with another through the per-seed differences: a paired t-interval and test, and the
minimum detectable effect (MDE) the design achieved — the true difference a paired t-test at the same number
of pairs and the observed spread would detect with 80 % power at a two-sided 5 % level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

POWER = 0.80
ALPHA = 0.05


def interval(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Mean, sample std, n and the 95 % t-interval half-width (nan for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    std = float(np.std(values, ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": float(np.mean(values)) if n else math.nan, "std": std, "n": n, "ci95": half}


def minimum_detectable_effect(std_of_differences: float, pairs: int) -> float:
    """Smallest true mean difference a two-sided paired t-test (ALPHA) detects with POWER, given the spread of
    the per-seed differences: (t_{1-a/2, n-1} + t_{power, n-1}) * sd / sqrt(n) (the usual t approximation)."""
    if pairs < 2 or not math.isfinite(std_of_differences):
        return math.nan
    dof = pairs - 1
    return float((stats.t.ppf(1 - ALPHA / 2, dof) + stats.t.ppf(POWER, dof)) * std_of_differences / math.sqrt(pairs))


def pairs_for_width(std_of_differences: float, half_width: float, limit: int = 1000) -> int | None:
    """Fewest pairs whose 95 % t-interval half-width is below ``half_width`` at this spread of the per-seed
    differences (a planning figure: the spread itself is estimated); None when even ``limit`` pairs do not."""
    if not math.isfinite(std_of_differences):
        return None
    for n in range(2, limit + 1):
        if stats.t.ppf(1 - ALPHA / 2, n - 1) * std_of_differences / math.sqrt(n) < half_width:
            return n
    return None


def paired(values: dict[int, float], reference: dict[int, float]) -> dict[str, float]:
    """Per-seed difference ``values - reference`` over the seeds both have: interval, paired t-test p, MDE."""
    seeds = sorted(set(values) & set(reference))
    diff = np.array([values[s] - reference[s] for s in seeds], dtype=float)
    result = interval(diff)
    spread = result["std"]
    if len(diff) > 1 and spread > 0:
        result["p_value"] = float(stats.ttest_1samp(diff, 0.0).pvalue)
    else:
        result["p_value"] = math.nan
    result["mde"] = minimum_detectable_effect(spread, len(diff))
    return result


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order; NaN stays NaN and is not counted):
    the i-th smallest of m gets max over j <= i of min(1, (m - j + 1) * p_(j)). A comparison holds at level a
    for the whole family when its adjusted p is below a."""
    finite = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


def beyond_noise(difference: dict[str, float]) -> bool:
    """True when the 95 % interval of a paired difference excludes zero."""
    return math.isfinite(difference["ci95"]) and abs(difference["mean"]) > difference["ci95"]
