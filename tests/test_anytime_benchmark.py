"""benchmarks/anytime.py's statistics on numbers with known answers (the grid itself: test_anytime_experiment.py).

The modules are imported inside the tests (``load_benchmark``), so collecting this file runs no benchmark code.
"""

import math

import numpy as np
import pytest

from tests.conftest import anytime_run_record, load_benchmark


def test_interval_known_values():
    interval = load_benchmark("sila_experiment.paired_stats").interval
    i = interval(np.array([1.0, 2.0, 3.0]))
    assert i["mean"] == 2.0 and i["std"] == 1.0 and i["n"] == 3
    assert i["ci95"] == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)  # t(0.975, 2) * s / sqrt(n), t from tables
    one = interval(np.array([5.0]))
    assert one["mean"] == 5.0 and math.isnan(one["ci95"])  # one seed has no interval, not a zero-width one


def test_difference_to_the_baseline_is_the_paired_difference_of_anytime_areas():
    """The reported difference is computed from each seed's own area, paired by seed: hand-computed here from
    the per-exit accuracies (exits at 1, 2, 3 M MACs: area = (a1 + 2 a2 + a3) / 4 by the trapezoid rule)."""
    anytime, summarise = (
        load_benchmark("sila_experiment.anytime"),
        load_benchmark("sila_experiment.anytime_report").summarise,
    )
    plan = load_benchmark("sila_experiment.plan").load_plan(anytime.DEFAULT_PLAN)
    base = {0: [50.0, 60.0, 70.0], 1: [40.0, 52.0, 61.0], 2: [55.0, 57.0, 75.0]}  # seeds differ a lot ...
    sila = {0: [51.0, 62.0, 70.0], 1: [40.0, 53.0, 64.0], 2: [57.0, 57.0, 76.0]}  # ... the pairs much less
    runs = [anytime_run_record("baseline", s, t) for s, t in base.items()]
    runs += [anytime_run_record("sila_features", s, t) for s, t in sila.items()]
    summary = summarise(runs, plan)

    def area(a):
        return (a[0] + 2 * a[1] + a[2]) / 4

    diffs = [area(sila[s]) - area(base[s]) for s in (0, 1, 2)]  # 1.25, 1.5, 1.25
    (compared,) = [c for c in summary["comparisons"] if c["method"] == "sila_features"]
    assert compared["reference"] == "baseline"
    assert compared["area"]["mean"] == pytest.approx(np.mean(diffs))
    assert compared["area"]["std"] == pytest.approx(np.std(diffs, ddof=1))  # paired: not the spread over seeds
    assert compared["area"]["ci95"] < summary["methods"]["baseline"]["anytime_area"]["ci95"] / 10
    base_area = summary["methods"]["baseline"]["anytime_area"]["mean"]
    assert base_area == pytest.approx(np.mean([area(b) for b in base.values()]))
    assert all(c["method"] != c["reference"] for c in summary["comparisons"])  # no method against itself
