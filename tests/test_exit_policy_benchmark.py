"""The exit-policy benchmark's summary, risk coverage and report on synthetic logits (no model, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynsila.policies.risk import GRID, RiskControl
from tests.conftest import load_benchmark

COSTS = [1.0e6, 2.0e6, 3.0e6, 4.0e6]


def synthetic(n: int, seed: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``N x 4 x C`` whose later exits are sharper and more often right."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, len(COSTS), classes)).astype(np.float32)
    for k in range(len(COSTS)):
        logits[np.arange(n), k, labels] += 1.0 + 1.2 * k
    return logits, labels


def write_cache(cache: Path, name: str, seed: int) -> None:
    (vx, vy), (tx, ty) = synthetic(300, seed), synthetic(700, seed + 100)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache / f"{name}_paper.npz", val_x=vx, val_y=vy, test_x=tx, test_y=ty, costs=np.array(COSTS))


def test_method_seed_and_t_interval() -> None:
    bench = load_benchmark("accuracy.exit_policies")
    assert bench.method_seed(Path("x/sila_imta_seed12")) == ("sila_imta", 12)
    assert bench.method_seed(Path("tiny")) == ("tiny", 0)
    ci = bench.t_interval([1.0, 2.0, 3.0])
    assert ci["mean"] == pytest.approx(2.0) and ci["half_width"] == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)
    assert bench.t_interval([1.0])["half_width"] is None


def test_mean_top1_refuses_a_curve_short_of_the_range() -> None:
    bench = load_benchmark("accuracy.exit_policies")
    points = [bench.PolicyPoint(0, 0, 0, top1, macs, [], {}) for macs, top1 in ((1.0, 50.0), (3.0, 70.0))]
    assert bench.mean_top1(points, 1.0, 3.0) == pytest.approx(60.0)
    assert bench.mean_top1(points, 0.5, 3.0) is None


def test_own_split_risk_is_the_fitted_policy_s() -> None:
    bench = load_benchmark("accuracy.exit_policies")
    (vx, vy), (tx, ty) = synthetic(400, 1), synthetic(600, 2)
    losses = bench.risk_losses(np.concatenate([vx, tx]), np.concatenate([vy, ty]))
    for bound in ("ltt", "crc"):
        spec = RiskControl(bound=bound).fit(vx, vy, COSTS, [0.05])[0]
        i = int(np.searchsorted(GRID, spec["thresholds"][0]))
        assert spec["fit"]["calibration_risk"] == pytest.approx(losses[i, :400].mean())
        own = bench.realised_risk(losses, np.arange(400), bound, 0.05, 0.1)
        assert own == pytest.approx(losses[i, 400:].mean())


def test_main_on_cached_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("accuracy.exit_policies")
    cache, runs = tmp_path / "cache", []
    for method in ("a", "b"):
        for seed in (1, 2, 3):
            write_cache(cache, f"{method}_seed{seed}", seed + (10 if method == "b" else 0))
            runs.append(str(tmp_path / f"{method}_seed{seed}"))  # no run directory: the cache alone is read
    argv = ["--runs", *runs, "--cache", str(cache), "--resplits", "4", "--results-dir", str(tmp_path / "out")]
    assert bench.main([*argv, "--out", "bench"]) == 0
    out = capsys.readouterr().out
    assert "### a (seeds 1, 2, 3" in out and "| ltt | 0.05 |" in out and "| b_seed3 | learned |" in out
    payload = json.loads((tmp_path / "out" / "bench.json").read_text())
    quotas = payload["summary"]["a"]["policies"]["quotas"]
    assert quotas["vs_quotas"]["mean"] == 0.0 and quotas["top1"]["n"] == 3
    assert set(payload["summary"]["b"]["policies"]) == {
        "quotas",
        "calibrated",
        "patience",
        "product",
        "learned",
        "risk",
    }
    coverage = payload["risk_coverage"]["a"]["crc@0.1"]
    assert coverage["resplits"] == 12 and 0.0 <= coverage["resplit_share_over"] <= 1.0
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0
    assert "Command: `python benchmarks/accuracy/exit_policies.py --runs" in (tmp_path / "out" / "bench.md").read_text()
