"""The aggregate of ``benchmarks/anytime.py``: statistics and the verdicts of a plan, from run files alone.

A run file holds one (arm, seed) training: per exit its MACs, parameters, val / test / clean-train top-1, the
budgeted curve, and its last epoch's metrics (with the SiLa twin monitors). ``summarise(runs, plan)`` is a pure
function of the run files and the plan (``plan.py``): per arm its scores, every arm against the references it
names, each family's verdicts (``families.py``), the design check and the size claims the plan declares. The
Markdown is ``anytime_markdown.py``, the figures ``anytime_figures.py``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from benchmarks.sila_experiment.families import TIMINGS, bridges, family_verdicts, numbers, raw_group, select
from benchmarks.sila_experiment.paired_stats import ALPHA, beyond_noise, interval, paired, pairs_for_width
from benchmarks.sila_experiment.plan import Plan
from benchmarks.toolkit import accuracy_at, anytime_area

MIN_PAIRS = 3  # below this the spread (and so the MDE) is not estimated well enough for any verdict
INCONCLUSIVE_MDE = 2.0  # points: a null whose minimum detectable effect is larger than this is inconclusive
# a twin has collapsed onto its exit when, at the last epoch, its logits sit this close (mean |z' - z| / mean |z|,
# averaged over exits) and it agrees with the exit's argmax on at least this share of training samples
COLLAPSE_REL_GAP, COLLAPSE_AGREEMENT = 0.10, 0.99
BUDGET_POINTS = 8


def peer0(run: dict[str, Any]) -> dict[str, Any]:
    """DML runs train two exchangeable peers; statistics use peer 0."""
    return run["peers"][0]


def by_method(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    grouped: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        grouped[run["method"]][run["seed"]] = run
    return grouped


def full_width(run: dict[str, Any], plan: Plan) -> bool:
    arm = plan.arms.get(run["method"])
    return arm.width == "full" if arm else not run["method"].startswith("half_")


def budget_grid(runs: list[dict[str, Any]], plan: Plan) -> np.ndarray:
    """Average-MACs points every full-width run's budgeted curve covers (a narrower network costs less)."""
    full = [peer0(r) for r in runs if full_width(r, plan)]
    lo = max(min(p["avg_macs"] for p in r["budgeted"]) for r in full)
    hi = min(max(p["avg_macs"] for p in r["budgeted"]) for r in full)
    return np.linspace(lo, hi, BUDGET_POINTS)


def area_of(run: dict[str, Any]) -> float:
    p = peer0(run)
    return anytime_area(np.array(p["exit_macs"], dtype=float), np.array(p["test_top1"]))


def run_scores(run: dict[str, Any], grid: np.ndarray) -> dict[str, Any]:
    """The per-run numbers the comparisons pair up: anytime area, budgeted mean, train-test gap."""
    p = peer0(run)
    test, clean = np.array(p["test_top1"]), np.array(p["train_top1_clean"])
    budget = accuracy_at(p["budgeted"], grid)
    return {
        "area": area_of(run),
        "budgeted": float(np.nanmean(budget)) if not np.all(np.isnan(budget)) else math.nan,
        "gap": float(np.mean(clean - test)),
        "clean_last": float(clean[-1]),
        "test": test,
        "budget_curve": budget,
    }


def twin_monitors(seeds: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Mean over seeds of the last epoch's twin-head monitors (keys starting with ``twin_``)."""
    values: dict[str, list[float]] = defaultdict(list)
    for run in seeds.values():
        for key, value in run["last_epoch"].items():
            if key.startswith("twin_") and isinstance(value, int | float):
                values[key].append(float(value))
    return {k: float(np.mean(v)) for k, v in sorted(values.items())}


def method_row(seeds: dict[int, dict[str, Any]], grid: np.ndarray) -> dict[str, Any]:
    scores = {s: run_scores(r, grid) for s, r in seeds.items()}
    first = peer0(next(iter(seeds.values())))
    test = np.array([sc["test"] for sc in scores.values()])
    return {
        "seeds": sorted(seeds),
        "test_top1": [interval(test[:, k]) for k in range(test.shape[1])],
        "anytime_area": interval([sc["area"] for sc in scores.values()]),
        "budgeted_mean": interval([sc["budgeted"] for sc in scores.values()]),
        "budgeted_curve": [interval(col) for col in np.array([sc["budget_curve"] for sc in scores.values()]).T],
        "gap_mean": interval([sc["gap"] for sc in scores.values()]),
        "train_clean_last_exit": interval([sc["clean_last"] for sc in scores.values()]),
        "deploy_params": first["params_cumulative"][-1],
        "deploy_macs": first["exit_macs"],
        "train_minutes": interval([r["train_seconds"] / 60 for r in seeds.values()]),
        "twin_monitors": twin_monitors(seeds),
        "_scores": scores,
    }


def references(plan: Plan, name: str, present: Any) -> list[str]:
    """The arms ``name`` is compared with in the all-pairs table: those it names that have runs, never itself."""
    return [ref for ref in plan.arms[name].compare_with if ref in present and ref != name]


def comparisons(rows: dict[str, dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Every arm against its references over every seed both have, uncorrected: anytime area, budgeted mean,
    gap and each exit; ``tier``: the larger group of the two arms."""
    out = []
    for name in rows:
        for ref in references(plan, name, rows):
            mine, theirs = rows[name]["_scores"], rows[ref]["_scores"]
            diffs = {
                key: paired({s: v[key] for s, v in mine.items()}, {s: v[key] for s, v in theirs.items()})
                for key in ("area", "budgeted", "gap")
            }
            tier = max(plan.arms[name].group, plan.arms[ref].group)
            out.append({"method": name, "reference": ref, "tier": tier, **diffs, "exits": per_exit(mine, theirs)})
    return out


def per_exit(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]]) -> list[dict[str, float]]:
    """Paired differences in test top-1, one per exit (two arms' per-seed scores)."""
    exits = len(next(iter(mine.values()))["test"])
    return [
        paired({s: float(v["test"][k]) for s, v in mine.items()}, {s: float(v["test"][k]) for s, v in theirs.items()})
        for k in range(exits)
    ]


def paired_area(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]]) -> dict[str, float]:
    return paired({s: v["area"] for s, v in mine.items()}, {s: v["area"] for s, v in theirs.items()})


def size_claim(rows: dict[str, dict[str, Any]], sila: str, small: str, full: str) -> dict[str, Any] | None:
    """The 50 % claim (SilaNet v1 abstract): the smaller SiLa network against the full-size baseline (does it keep
    the accuracy?) and against the baseline of its own size (does SiLa help at that size?), per exit and in anytime
    area. Supported only when the small SiLa network is not worse than the full-size baseline beyond noise *and*
    better than the small baseline beyond noise."""
    if sila not in rows or full not in rows:
        return None
    shown = [m for m in (full, small, sila) if m in rows]
    area = {ref: paired_area(rows[sila]["_scores"], rows[ref]["_scores"]) for ref in shown if ref != sila}
    keeps = full in area and not (beyond_noise(area[full]) and area[full]["mean"] < 0)
    helps = small in area and beyond_noise(area[small]) and area[small]["mean"] > 0
    return {
        "sila": sila,
        "param_share": rows[sila]["deploy_params"] / rows[full]["deploy_params"],
        "methods": {
            m: {
                k: rows[m][key]
                for k, key in (
                    ("params", "deploy_params"),
                    ("macs", "deploy_macs"),
                    ("test_top1", "test_top1"),
                    ("anytime_area", "anytime_area"),
                )
            }
            for m in shown
        },  # fmt: skip
        "half_sila_vs": {ref: per_exit(rows[sila]["_scores"], rows[ref]["_scores"]) for ref in area},
        "area_vs": area,
        # None: fewer than two paired seeds on a side, so "beyond noise" cannot be judged either way
        "supported": None if min((a["n"] for a in area.values()), default=0) < 2 else bool(keeps and helps),
    }


def collapsed(monitors: dict[str, float]) -> bool | None:
    """Whether a SiLa twin ended up as a copy of its exit (``COLLAPSE_*``); None without twin monitors."""
    gaps = [v for k, v in monitors.items() if k.startswith("twin_rel_gap_e")]
    agree = [v for k, v in monitors.items() if k.startswith("twin_agree_e")]
    if not gaps or not agree:
        return None
    return float(np.mean(gaps)) < COLLAPSE_REL_GAP and float(np.mean(agree)) >= COLLAPSE_AGREEMENT


def reading_verdict(difference: dict[str, float], p_holm: float) -> str:
    """A few words for a paired difference in anytime area: helps / hurts (Holm-corrected), a nominal gain or
    loss (beyond noise alone, not after Holm over the family), no effect seen (the design could have seen one of
    INCONCLUSIVE_MDE points), or inconclusive (it could not)."""
    if difference.get("n", MIN_PAIRS) < MIN_PAIRS:
        return f"too few pairs (n < {MIN_PAIRS})"
    if math.isfinite(p_holm) and p_holm < ALPHA:
        return "helps" if difference["mean"] > 0 else "hurts"
    if difference.get("p_value", math.nan) < ALPHA:
        return ("nominal gain" if difference["mean"] > 0 else "nominal loss") + ", not after Holm"
    if math.isfinite(difference.get("mde", math.nan)) and difference["mde"] <= INCONCLUSIVE_MDE:
        return "no effect seen"
    return "inconclusive"


def design_check(rows: dict[str, dict[str, Any]], sized: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """Could this experiment see an effect? The regime (the plan's regime arm fits its training set, with a gap),
    the interval widths of the family the design was sized for, and whether the positive control shows up."""
    d = plan.design
    base = rows.get(d.get("regime_arm", "baseline"))
    width_target, gap_target = float(d.get("width_target", 1.0)), float(d.get("gap_target", 10.0))
    widths = [c["area"]["ci95"] for c in sized if math.isfinite(c["area"]["ci95"])]
    needed = [pairs_for_width(c["area"]["std"], width_target) for c in sized if math.isfinite(c["area"]["std"])]
    arm, ref = d.get("positive_control", (None, None))
    control = next((paired_area(rows[arm]["_scores"], rows[ref]["_scores"]) for _ in [0] if arm in rows and ref in
                    rows), None)  # fmt: skip
    return {
        "tier1_holm": [{k: c[k] for k in ("method", "reference")} | {"p": c["area"]["p_value"], "p_holm": c["p_holm"]}
                       for c in sized],  # fmt: skip
        "baseline_train_clean_last_exit": base["train_clean_last_exit"]["mean"] if base else math.nan,
        "baseline_gap": base["gap_mean"]["mean"] if base else math.nan,
        "baseline_test_last_exit": base["test_top1"][-1]["mean"] if base else math.nan,
        "gap_target": gap_target,
        "widest_tier1_ci95": max(widths) if widths else math.nan,
        "width_target": width_target,
        "widths_met": bool(widths) and max(widths) < width_target,
        # seeds the widest comparison would need for the width target at its observed spread
        "seeds_for_width_target": None if not needed or None in needed else max(n for n in needed if n is not None),
        "largest_tier1_mde": max((c["area"]["mde"] for c in sized if math.isfinite(c["area"]["mde"])),
                                 default=math.nan),
        "positive_control": control,
        "positive_control_seen": bool(control and beyond_noise(control) and control["mean"] > 0),
    }  # fmt: skip


def reproduction_checks(reproductions: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each re-run of a committed run (same arm and seed, trained again on a later machine, from its revision or a
    later one) against its run file: whether every recorded number but the timings, the admission (which names the
    machine) and the revision is equal. An equal re-run from a later revision shows that revision trains the same
    numbers."""
    committed = {(r["method"], r["seed"]): r for r in runs}
    skip = (*TIMINGS, "admission", "code")
    out = []
    for again in reproductions:
        first = committed.get((again["method"], again["seed"]))
        same = first is not None and numbers(first, skip) == numbers(again, skip)
        out.append({"run": f"{again['method']}_seed{again['seed']}", "code": again.get("code"), "equal": same,
                    "found": first is not None, "first_code": first.get("code") if first else None})  # fmt: skip
    return out


def pairing_groups(runs: list[dict[str, Any]], bridged: dict[str, str]) -> dict[str, int]:
    """How many run files each pairing group holds (``none``: a file that cannot be matched)."""
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        g = raw_group(run)
        counts[bridged.get(g, g) if g else "none"] += 1
    return dict(sorted(counts.items()))


def summarise(
    runs: list[dict[str, Any]], plan: Plan, reproductions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Everything the report shows, from the run files, the plan and the reproductions (``reproductions/``)."""
    grouped = by_method(runs)
    grid = budget_grid(runs, plan)
    rows = {m: method_row(grouped[m], grid) for m in plan.arms if m in grouped}
    scores = {m: row["_scores"] for m, row in rows.items()}
    bridged = bridges(reproductions or [], runs)
    families = {name: family_verdicts(f, grouped, scores, bridged, reading_verdict) for name, f in
                plan.families.items()}  # fmt: skip
    for name, family in plan.families.items():
        if family.twin_collapse:
            for entry in families[name]:
                entry["collapsed"] = collapsed(rows[entry["method"]]["twin_monitors"])
    areas = {m: {s: sc["area"] for s, sc in v.items()} for m, v in scores.items()}
    selections = {name: dict(zip(("choice", "why"), select(f.select, grouped, areas, bridged), strict=True))
                  for name, f in plan.families.items() if f.select}  # fmt: skip
    compared = comparisons(rows, plan)
    sized = families.get(plan.design.get("sized_family", ""), [])
    claims = {name: size_claim(rows, c["sila"], c["small"], c["full"]) for name, c in plan.claims.items()}
    design = design_check(rows, sized, plan)
    for row in rows.values():
        del row["_scores"]
    return {
        "budget_grid_macs": grid.tolist(),
        "methods": rows,
        "comparisons": compared,
        "design": design,
        "claims": claims,
        "families": families,
        "selections": selections,
        "pairing_groups": pairing_groups(runs, bridged),
    }
