"""The aggregate of ``benchmarks/anytime.py``: statistics, the Markdown verdict and the plot, from run files alone.

A run file holds one (method, seed) training: per exit its MACs, parameters, val / test / clean-train top-1, the
budgeted curve, and its last epoch's metrics (with the SiLa twin monitors). Everything here is a pure function
of the list of run files, so the committed aggregate can be recomputed without training.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Collection, Mapping
from typing import Any, Protocol

import numpy as np

from benchmarks.sila_experiment.paired_stats import ALPHA, beyond_noise, holm, interval, paired, pairs_for_width
from benchmarks.toolkit import accuracy_at, anytime_area, save_figure

WIDTH_TARGET = 1.0  # points: the 95 % interval of a tier-1 paired difference must be narrower than +-1.0
GAP_TARGET = 10.0  # points: the baseline's train-test gap the regime must reach
POSITIVE_CONTROL = "self_distill"
LOSS_SCALE_CONTROL = "baseline_x2"
HALF_SILA, HALF_BASELINE = "half_sila", "half_baseline"
HALF_PARAMS_SILA, HALF_PARAMS_BASELINE = "half_params_sila", "half_params_baseline"
# composed methods and the same method without SiLa
WITHOUT_SILA = {
    "sila_dml": "dml",
    "sila_self_distill": POSITIVE_CONTROL,
    HALF_SILA: HALF_BASELINE,
    HALF_PARAMS_SILA: HALF_PARAMS_BASELINE,
}
# tier 3 is compared with the baseline and the loss-scale control re-run at its own code revision and machine: the
# first 46 runs' files did not reproduce when re-run here (docs/sila_experiment.md), so they are not reused
RERUN = {"baseline": "baseline_rerun", LOSS_SCALE_CONTROL: "baseline_x2_rerun"}
TIER3 = {"sila_classifier", "sila_mlp", HALF_PARAMS_SILA, HALF_PARAMS_BASELINE}
MIN_PAIRS = 3  # below this the spread (and so the MDE) is not estimated well enough for any verdict
INCONCLUSIVE_MDE = 2.0  # points: a null whose minimum detectable effect is larger than this is inconclusive
# a twin has collapsed onto its exit when, at the last epoch, its logits sit this close (mean |z' - z| / mean |z|,
# averaged over exits) and it agrees with the exit's argmax on at least this share of training samples
COLLAPSE_REL_GAP, COLLAPSE_AGREEMENT = 0.10, 0.99
BUDGET_POINTS = 8
# the readings that can carry a signal, measured until their intervals reach +-PRECISION_TARGET points, against the
# references re-run beside them; a seed is paired only when both files record the same machine fingerprint
PRECISION_READINGS = ("sila_mlp", "sila_joint_only")
PRECISION_REFERENCES = (RERUN[LOSS_SCALE_CONTROL], RERUN["baseline"])
PRECISION_TARGET = 1.0
# the field's techniques (tier 4), against the same references; tier 5: SiLa with one of them, chosen by
# best_field_technique before it is trained, against the technique alone and the loss-scale control
FIELD = ("ge", "imta", "l2w", "ztw_cascade", "ztw_ensemble")
WITH_SILA = {technique: f"sila_{technique}" for technique in FIELD}
FIELD_SEEDS = 5  # same-machine pairs every technique needs before the best of them is chosen
# what each technique's paper reports, with its source (the modules' docstrings say more); none is at this scale
PAPER_FIGURES = {
    "ge": "not found in a source we could read (IMTA paper, ICCV 2019)",
    "imta": "not found in a source we could read (ICCV 2019; the authors' README shows its curves as images)",
    "l2w": "MSDNet + L2W over MSDNet, CIFAR-100 budgeted: +1.3 and +1.1 points at two budgets "
    "(github.com/LeapLabTHU/L2W-DEN, figs/result_cifar.jpg)",
    "ztw_cascade": "not found in a source we could read (NeurIPS 2021)",
    "ztw_ensemble": "not found in a source we could read (NeurIPS 2021)",
}
WITHOUT_SILA.update({combined: technique for technique, combined in WITH_SILA.items()})


class MethodInfo(Protocol):
    @property
    def tier(self) -> int: ...

    @property
    def about(self) -> str: ...


def peer0(run: dict[str, Any]) -> dict[str, Any]:
    """DML runs train two exchangeable peers; statistics use peer 0."""
    return run["peers"][0]


def by_method(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    grouped: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        grouped[run["method"]][run["seed"]] = run
    return grouped


def budget_grid(runs: list[dict[str, Any]]) -> np.ndarray:
    """Average-MACs points every run's budgeted curve covers (full-width runs only: half width costs less)."""
    full = [peer0(r) for r in runs if not r["method"].startswith("half_")]
    lo = max(min(p["avg_macs"] for p in r["budgeted"]) for r in full)
    hi = min(max(p["avg_macs"] for p in r["budgeted"]) for r in full)
    return np.linspace(lo, hi, BUDGET_POINTS)


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


def method_row(name: str, seeds: dict[int, dict[str, Any]], grid: np.ndarray) -> dict[str, Any]:
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


def references(name: str, present: Collection[str]) -> list[str]:
    """What a method is compared with: the baseline; for a SiLa reading also the loss-scale control; for a
    composed method also the same method without SiLa. Only references in ``present``, never itself."""
    wanted = ["baseline"]
    if name.startswith("sila"):
        wanted.append(LOSS_SCALE_CONTROL)
    if name in WITHOUT_SILA:  # does SiLa add anything to the method it is composed with?
        wanted.append(WITHOUT_SILA[name])
    if name in TIER3 or name in FIELD or name in WITH_SILA.values():
        wanted = [RERUN.get(ref, ref) for ref in wanted]
    elif name in RERUN.values():  # the re-run against the file it did not reproduce: a diagnostic
        wanted = [ref for ref, rerun in RERUN.items() if rerun == name]
    return [ref for ref in wanted if ref in present and ref != name]


def comparisons(rows: dict[str, dict[str, Any]], methods: Mapping[str, MethodInfo]) -> list[dict[str, Any]]:
    """Every method against its references (``references``). A comparison is tier 1 when both sides are tier-1
    methods (the ones the design is sized for)."""
    out = []
    for name in rows:
        for ref in references(name, rows):
            mine, theirs = rows[name]["_scores"], rows[ref]["_scores"]
            diffs = {
                key: paired({s: v[key] for s, v in mine.items()}, {s: v[key] for s, v in theirs.items()})
                for key in ("area", "budgeted", "gap")
            }
            tier = max(methods[name].tier, methods[ref].tier)
            out.append({"method": name, "reference": ref, "tier": tier, **diffs, "exits": per_exit(mine, theirs)})
    return out


def per_exit(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]]) -> list[dict[str, float]]:
    """Paired differences in test top-1, one per exit (two methods' per-seed scores)."""
    exits = len(next(iter(mine.values()))["test"])
    return [
        paired({s: float(v["test"][k]) for s, v in mine.items()}, {s: float(v["test"][k]) for s, v in theirs.items()})
        for k in range(exits)
    ]


def size_claim(
    rows: dict[str, dict[str, Any]], sila: str, small_baseline: str, full: str = "baseline"
) -> dict[str, Any] | None:
    """The 50 % claim (SilaNet v1 abstract): the smaller SiLa network against the full-size baseline (does it keep
    the accuracy?) and against the baseline of its own size (does SiLa help at that size?), per exit and in anytime
    area, with the deploy parameters and MACs of each. Supported only when the small SiLa network is not worse than
    the full-size baseline beyond noise *and* better than the small baseline beyond noise."""
    if sila not in rows or full not in rows:
        return None
    shown = [m for m in (full, small_baseline, sila) if m in rows]
    area = {ref: paired_area(rows[sila]["_scores"], rows[ref]["_scores"]) for ref in shown if ref != sila}
    keeps = full in area and not (beyond_noise(area[full]) and area[full]["mean"] < 0)
    helps = small_baseline in area and beyond_noise(area[small_baseline]) and area[small_baseline]["mean"] > 0
    return {
        "sila": sila,
        "param_share": rows[sila]["deploy_params"] / rows[full]["deploy_params"],
        "methods": {
            m: {
                "params": rows[m]["deploy_params"],
                "macs": rows[m]["deploy_macs"],
                "test_top1": rows[m]["test_top1"],
                "anytime_area": rows[m]["anytime_area"],
            }
            for m in shown
        },
        "half_sila_vs": {ref: per_exit(rows[sila]["_scores"], rows[ref]["_scores"]) for ref in area},
        "area_vs": area,
        # None: fewer than two paired seeds on a side, so "beyond noise" cannot be judged either way
        "supported": None if min((a["n"] for a in area.values()), default=0) < 2 else bool(keeps and helps),
    }


def half_width_claim(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    return size_claim(rows, HALF_SILA, HALF_BASELINE)


def paired_area(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]]) -> dict[str, float]:
    return paired({s: v["area"] for s, v in mine.items()}, {s: v["area"] for s, v in theirs.items()})


def collapsed(monitors: dict[str, float]) -> bool | None:
    """Whether a SiLa twin ended up as a copy of its exit (``COLLAPSE_*``); None without twin monitors."""
    gaps = [v for k, v in monitors.items() if k.startswith("twin_rel_gap_e")]
    agree = [v for k, v in monitors.items() if k.startswith("twin_agree_e")]
    if not gaps or not agree:
        return None
    return float(np.mean(gaps)) < COLLAPSE_REL_GAP and float(np.mean(agree)) >= COLLAPSE_AGREEMENT


def family_holm(compared: list[dict[str, Any]], tier: int) -> list[dict[str, Any]]:
    """One tier's comparisons in anytime area, Holm-corrected as a family (raw and adjusted p)."""
    family = [c for c in compared if c["tier"] == tier]
    adjusted = holm([c["area"]["p_value"] for c in family])
    return [
        {"method": c["method"], "reference": c["reference"], "p": c["area"]["p_value"], "p_holm": p}
        for c, p in zip(family, adjusted, strict=True)
    ]


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


def tier3_verdicts(rows: dict[str, dict[str, Any]], compared: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tier-3 SiLa reading: its differences against the baseline and the loss-scale control, Holm over the
    tier-3 family, the verdict against each, and whether its twin collapsed onto the exit."""
    readings = [c for c in compared if c["tier"] == 3 and c["method"].startswith("sila")]
    holm_p = {(c["method"], c["reference"]): c["p_holm"] for c in family_holm(readings, 3)}
    out = []
    for c in compared:
        if c["tier"] != 3 or not c["method"].startswith("sila"):
            continue
        p = holm_p.get((c["method"], c["reference"]), math.nan)
        out.append({
            "method": c["method"], "reference": c["reference"], "area": c["area"], "p_holm": p,
            "verdict": reading_verdict(c["area"], p), "collapsed": collapsed(rows[c["method"]]["twin_monitors"]),
        })  # fmt: skip
    return out


def machine_of(run: dict[str, Any]) -> str | None:
    """A run file's machine fingerprint as one comparable string; None when it has none (files written before
    fingerprints were recorded, or a run resumed on another machine)."""
    fingerprint = run.get("fingerprint")
    return json.dumps(fingerprint, sort_keys=True) if fingerprint else None


def same_machine_seeds(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]]) -> list[int]:
    """The seeds both methods ran with the same recorded machine fingerprint: the only pairs the precision family
    compares (a re-run elsewhere moved a run by up to 2 points)."""
    return sorted(
        s for s in set(mine) & set(theirs) if machine_of(mine[s]) and machine_of(mine[s]) == machine_of(theirs[s])
    )


def precision_verdicts(
    grouped: dict[str, dict[int, dict[str, Any]]],
    rows: dict[str, dict[str, Any]],
    pairs: list[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Each (method, reference) pair (default: each signal-carrying SiLa reading against each re-run reference):
    the paired difference in anytime area over the same-machine seeds, Holm over this family, the verdict, whether
    the interval reached the target, and, for reference only, the difference over every seed both have (machines
    unchecked). Pairs with a side not run yet are left out."""
    if pairs is None:
        pairs = [(reading, ref) for reading in PRECISION_READINGS for ref in PRECISION_REFERENCES]
    out: list[dict[str, Any]] = []
    for method, ref in pairs:
        if method not in rows or ref not in rows:
            continue
        mine, theirs = rows[method]["_scores"], rows[ref]["_scores"]
        seeds = same_machine_seeds(grouped[method], grouped[ref])
        strict = paired({s: mine[s]["area"] for s in seeds}, {s: theirs[s]["area"] for s in seeds})
        budgeted = paired({s: mine[s]["budgeted"] for s in seeds}, {s: theirs[s]["budgeted"] for s in seeds})
        out.append({"method": method, "reference": ref, "seeds": seeds, "area": strict, "budgeted": budgeted,
                    "any_machine": paired_area(mine, theirs)})  # fmt: skip
    for entry, p in zip(out, holm([e["area"]["p_value"] for e in out]), strict=True):
        entry["p_holm"] = p
        entry["verdict"] = reading_verdict(entry["area"], p)
        entry["width_met"] = bool(math.isfinite(entry["area"]["ci95"]) and entry["area"]["ci95"] <= PRECISION_TARGET)
        entry["pairs_for_target"] = pairs_for_width(entry["area"]["std"], PRECISION_TARGET)
    return out


def field_pairs() -> list[tuple[str, str]]:
    """The field family: every technique against both re-run references, and SiLa with a technique against the
    technique alone (does SiLa add to it?) and against the loss-scale control."""
    techniques = [(t, ref) for t in FIELD for ref in PRECISION_REFERENCES]
    combined = [(WITH_SILA[t], ref) for t in FIELD for ref in (t, RERUN[LOSS_SCALE_CONTROL])]
    return techniques + combined


def best_field_technique(runs: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The rule that picks the technique SiLa is combined with, fixed before any tier-4 verdict: the largest mean
    paired difference in anytime area against the loss-scale control re-run, once every technique has
    ``FIELD_SEEDS`` same-machine pairs with it. Returns (the technique or None, why in words)."""
    grouped = by_method(runs)
    control = RERUN[LOSS_SCALE_CONTROL]
    pairs = {t: same_machine_seeds(grouped.get(t, {}), grouped.get(control, {})) for t in FIELD}
    short = {t: len(seeds) for t, seeds in pairs.items() if len(seeds) < FIELD_SEEDS}
    if short:
        have = ", ".join(f"{t} {n}" for t, n in short.items())
        return None, f"waits for {FIELD_SEEDS} same-machine pairs of every technique with {control} (have: {have})"
    area = {name: {s: area_of(r) for s, r in seeds.items()} for name, seeds in grouped.items()}
    deltas = {t: paired({s: area[t][s] for s in pairs[t]}, area[control])["mean"] for t in FIELD}
    best = max(deltas, key=lambda t: deltas[t])
    listed = ", ".join(f"{t} {d:+.2f}" for t, d in deltas.items())
    return best, f"{best}: the largest paired difference in anytime area against {control} ({listed})"


TIMINGS = ("train_seconds", "seconds", "img_per_s", "environment")  # what a faithful re-run may change


def reproduction_checks(reproductions: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each re-run of a committed run (the same method, seed and code, trained again on a later machine with the
    same fingerprint) against its run file: whether every recorded number but the timings is equal, bit for bit.
    Equal re-runs are the evidence that files from such machines pair as if from one machine."""
    committed = {(r["method"], r["seed"]): r for r in runs}

    def numbers(run: dict[str, Any]) -> Any:
        return {k: ({i: j for i, j in v.items() if i not in TIMINGS} if isinstance(v, dict) else v)
                for k, v in run.items() if k not in TIMINGS}  # fmt: skip

    out = []
    for again in reproductions:
        first = committed.get((again["method"], again["seed"]))
        same = first is not None and numbers(first) == numbers(again)
        out.append({"run": f"{again['method']}_seed{again['seed']}", "code": again.get("code"), "equal": same,
                    "found": first is not None})  # fmt: skip
    return out


def area_of(run: dict[str, Any]) -> float:
    p = peer0(run)
    return anytime_area(np.array(p["exit_macs"], dtype=float), np.array(p["test_top1"]))


def design_check(rows: dict[str, dict[str, Any]], compared: list[dict[str, Any]]) -> dict[str, Any]:
    """Could this experiment see an effect? The regime (the baseline fits its training set, with a gap), the
    interval widths of the tier-1 comparisons, and whether the positive control shows up."""
    base = rows.get("baseline")
    tier1 = [c for c in compared if c["tier"] == 1]
    widths = [c["area"]["ci95"] for c in tier1 if math.isfinite(c["area"]["ci95"])]
    needed = [pairs_for_width(c["area"]["std"], WIDTH_TARGET) for c in tier1 if math.isfinite(c["area"]["std"])]
    control = next((c for c in compared if c["method"] == POSITIVE_CONTROL and c["reference"] == "baseline"), None)
    return {
        # the tier-1 family corrected for multiplicity (Holm): which comparisons hold together
        "tier1_holm": family_holm(compared, 1),
        "baseline_train_clean_last_exit": base["train_clean_last_exit"]["mean"] if base else math.nan,
        "baseline_gap": base["gap_mean"]["mean"] if base else math.nan,
        "gap_target": GAP_TARGET,
        "widest_tier1_ci95": max(widths) if widths else math.nan,
        "width_target": WIDTH_TARGET,
        "widths_met": bool(widths) and max(widths) < WIDTH_TARGET,
        # seeds the widest tier-1 comparison would need for the width target at its observed spread
        "seeds_for_width_target": None if not needed or None in needed else max(n for n in needed if n is not None),
        "largest_tier1_mde": max((c["area"]["mde"] for c in tier1 if math.isfinite(c["area"]["mde"])),
                                 default=math.nan),
        "positive_control": control["area"] if control else None,
        "positive_control_seen": bool(control and beyond_noise(control["area"]) and control["area"]["mean"] > 0),
    }  # fmt: skip


def summarise(runs: list[dict[str, Any]], methods: Mapping[str, MethodInfo]) -> dict[str, Any]:
    grouped = by_method(runs)
    grid = budget_grid(runs)
    order = [m for m in methods if m in grouped]
    rows = {m: method_row(m, grouped[m], grid) for m in order}
    compared = comparisons(rows, methods)
    check = design_check(rows, compared)
    half = half_width_claim(rows)
    half_params = size_claim(rows, HALF_PARAMS_SILA, HALF_PARAMS_BASELINE, RERUN["baseline"])
    tier3 = tier3_verdicts(rows, compared)
    precision = precision_verdicts(grouped, rows)
    field = precision_verdicts(grouped, rows, field_pairs())
    for row in rows.values():
        del row["_scores"]
    return {
        "budget_grid_macs": grid.tolist(),
        "methods": rows,
        "comparisons": compared,
        "design": check,
        "half_width": half,
        "half_params": half_params,
        "tier3": tier3,
        "precision": precision,
        "field": field,
        "field_best": dict(zip(("technique", "why"), best_field_technique(runs), strict=True)),
    }


# --- Markdown -----------------------------------------------------------------------------------------------


NO_VALUE = "–"  # no number to show, e.g. a budget the network cannot spend (half width costs less)


def fmt(i: dict[str, float], digits: int = 2) -> str:
    if not math.isfinite(i["mean"]):
        return NO_VALUE
    if not math.isfinite(i.get("ci95", math.nan)):
        return f"{i['mean']:.{digits}f} (n={i['n']})"
    return f"{i['mean']:.{digits}f} ± {i['ci95']:.{digits}f}"


def diff_cell(d: dict[str, float]) -> str:
    if not math.isfinite(d["mean"]):
        return NO_VALUE
    if d["n"] < 2:
        return f"{d['mean']:+.2f} (n={d['n']})"
    mark = " **beyond noise**" if beyond_noise(d) else ""
    return f"{d['mean']:+.2f} ± {d['ci95']:.2f} (p {d['p_value']:.3f}, MDE {d['mde']:.2f}, n={d['n']}){mark}"


def verdict_lines(payload: dict[str, Any]) -> list[str]:
    s = payload["summary"]
    rows = s["methods"]
    lines = [
        "| method | tier | seeds | anytime area | Δ vs baseline | Δ vs baseline ×2 | Δ vs the same without SiLa "
        "| train–test gap | deploy params | MACs (last exit) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        cells = {}
        for c in s["comparisons"]:
            if c["method"] == name:
                cells[c["reference"]] = diff_cell(c["area"])
        lines.append(
            f"| {name} | {payload['methods'][name]['tier']} | {len(row['seeds'])} | {fmt(row['anytime_area'])} | "
            f"{cells.get('baseline', cells.get(RERUN['baseline'], '-'))} | "
            f"{cells.get(LOSS_SCALE_CONTROL, cells.get(RERUN[LOSS_SCALE_CONTROL], '-'))} | "
            f"{cells.get(WITHOUT_SILA.get(name, ''), '-')} | {fmt(row['gap_mean'])} | "
            f"{row['deploy_params']:,} | {row['deploy_macs'][-1] / 1e6:.2f}M |"
        )
    return lines


def design_lines(design: dict[str, Any]) -> list[str]:
    control = design["positive_control"]
    seen = "**seen**" if design["positive_control_seen"] else "**not seen**"
    widths = "met" if design["widths_met"] else "not met"
    lines = [
        f"- Regime: baseline clean train top-1 (last exit) {design['baseline_train_clean_last_exit']:.1f} %, "
        f"train–test gap (mean over exits) {design['baseline_gap']:.1f} points (target ≥ {design['gap_target']:.0f}).",
        "- Power: widest 95 % interval of a tier-1 paired difference in anytime area "
        f"±{design['widest_tier1_ci95']:.2f} points (target < ±{design['width_target']:.1f}: {widths}); largest "
        f"minimum detectable effect (80 % power, 5 % two-sided) {design['largest_tier1_mde']:.2f} points.",
    ]
    if not design["widths_met"] and design.get("seeds_for_width_target"):
        lines.append(
            f"- At the spreads observed, every tier-1 interval would be narrower than ±{design['width_target']:.1f} "
            f"with about {design['seeds_for_width_target']} paired seeds (a planning estimate: the spreads are "
            "themselves estimated from few seeds)."
        )
    if control is not None:
        lines.append(f"- Positive control (self-distillation vs baseline): {diff_cell(control)} — {seen}.")
    family = [c for c in design.get("tier1_holm", []) if math.isfinite(c["p_holm"])]
    if family:
        held = [f"{c['method']} vs {c['reference']} (p {c['p']:.3f} -> {c['p_holm']:.3f})"
                for c in family if c["p_holm"] < ALPHA]  # fmt: skip
        lines.append(
            f"- Corrected for multiplicity (Holm, the {len(family)} tier-1 comparisons in anytime area, "
            f"{ALPHA:.0%} family-wise): " + ("; ".join(held) if held else "none") + " hold"
            + (" (raw p -> adjusted p); every other tier-1 difference is within noise once the family is counted."
               if held else ".")
        )  # fmt: skip
    if control is None or control["n"] < 2:
        lines.append(
            "- **Incomplete**: the positive control has fewer than two seeds paired with the baseline, so the "
            "experiment's sensitivity is unknown and nothing below is evidence either way."
        )
    elif not design["positive_control_seen"]:
        lines.append(
            "- The positive control does not beat the baseline beyond noise, so this experiment is **not sensitive "
            "enough** to call any method's null result negative: read non-significant rows as inconclusive."
        )
    return lines


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    rows = s["methods"]
    first = next(iter(rows.values()))
    exits = [f"exit {k + 1} ({m / 1e6:.2f}M)" for k, m in enumerate(first["deploy_macs"])]
    lines = [
        f"# Does SiLa help? Anytime prediction, preset `{payload['preset']}`",
        "",
        f"Command: `{payload['command']}`  ",
        f"Recomputed from {payload['finished_runs']} run files (of {payload['planned_runs']} planned) under "
        f"`benchmarks/results/anytime_*/runs/`; config `{payload['config']}`; overrides per run in each file.",
        "",
        "Test top-1 in % on the held-out test split, mean ± 95 % t-interval over seeds; differences paired by seed. "
        "MACs and parameters of the deploy model (training-only heads pruned), as evaluated (paper convention). "
        "Anytime area = mean test top-1 over the exits' MACs range (trapezoid). DML rows report peer 0.",
        "",
        "## Can this experiment see an effect?",
        "",
        *design_lines(s["design"]),
        "",
        "## Verdict (anytime area)",
        "",
        *verdict_lines(payload),
        "",
        "## Secondary: paired differences per exit, in the budgeted mean and in the train–test gap",
        "",
        "Points of test top-1 (gap: points of train–test gap; negative = a smaller gap). The primary endpoint is the "
        "anytime area above; these are many tests without correction for multiplicity, so a single "
        "**beyond noise** here is a lead, not a finding.",
        "",
        *secondary_lines(s["comparisons"], exits),
        "",
        "## Twins that can carry a new signal (tier 3, a family of its own)",
        "",
        *tier3_lines(s.get("tier3", [])),
        "",
        f"## SiLa at ±{PRECISION_TARGET:.0f} point: the two signal-carrying readings, same-machine pairs only",
        "",
        *precision_lines(s.get("precision", [])),
        "",
        "## The field's techniques (tier 4) and SiLa with the best of them (tier 5), same-machine pairs only",
        "",
        *precision_lines(s.get("field", []), "No run of the field's techniques yet."),
        "",
        "What each paper reports, at its own scale (not reproduced here):",
        "",
        *table(["technique", "paper's figure"], [[t, figure] for t, figure in PAPER_FIGURES.items()]),
        "",
        *reproduction_lines(payload.get("reproductions", [])),
        "",
        f"SiLa (MLP twin) is combined with one technique, chosen by a rule fixed before any verdict: "
        f"{s['field_best']['why'] if 'field_best' in s else 'not applied yet'}.",
        "",
        "## The 50 % claim as stated: half the deploy parameters, with SiLa, against full size",
        "",
        *half_width_lines(s.get("half_params"), "No half-parameter SiLa run yet."),
        "",
        "## A stronger compression: half width (a quarter of the parameters) with SiLa, against full width",
        "",
        *half_width_lines(s.get("half_width")),
        "",
        "## Test top-1 per exit",
        "",
        *table(["method", *exits], [[n, *[fmt(i) for i in r["test_top1"]]] for n, r in rows.items()]),
        "",
        "## Budgeted batch classification (max_prob thresholds fitted on val), test top-1 at matched average MACs",
        "",
        *table(
            ["method", *[f"{m / 1e6:.2f}M" for m in s["budget_grid_macs"]]],
            [[n, *[fmt(i, 1) for i in r["budgeted_curve"]]] for n, r in rows.items()],
        ),
        "",
        f"{NO_VALUE}: a budget outside the network's range (the grid spans what every full-width run's curve "
        "covers; the half-width networks cost less at every exit, so their budgeted curves are not on it; the same "
        "holds for their Δ budgeted mean in the secondary table).",
        "",
        "## Twin heads: do they differ from the main exits? (last epoch, mean over seeds)",
        "",
        *twin_lines(rows),
        "",
        "## Methods",
        "",
        *[f"- `{n}` (tier {m['tier']}): {m['about']}; `{' '.join(m['overrides'])}`" for n, m in
          payload["methods"].items() if n in rows],
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def secondary_lines(compared: list[dict[str, Any]], exits: list[str]) -> list[str]:
    header = ["method", "vs", *[f"Δ {e}" for e in exits], "Δ budgeted mean", "Δ gap"]
    body = [
        [
            c["method"],
            c["reference"],
            *[diff_cell(d) for d in c["exits"]],
            diff_cell(c["budgeted"]),
            diff_cell(c["gap"]),
        ]
        for c in compared
    ]
    return table(header, body) if body else ["No comparison yet."]


def half_width_lines(half: dict[str, Any] | None, missing: str = "No half-width SiLa run yet.") -> list[str]:
    if half is None:
        return [missing]
    methods, sila = half["methods"], half["sila"]
    exits = len(next(iter(methods.values()))["test_top1"])
    header = ["", "deploy params", "MACs per exit", *[f"exit {k + 1}" for k in range(exits)], "anytime area"]
    body = [
        [m, f"{v['params']:,}", " / ".join(f"{x / 1e6:.2f}M" for x in v["macs"]), *[fmt(i) for i in v["test_top1"]],
         fmt(v["anytime_area"])]
        for m, v in methods.items()
    ]  # fmt: skip
    for ref, diffs in half["half_sila_vs"].items():
        body.append([f"{sila} − {ref}", "", "", *[diff_cell(d) for d in diffs], diff_cell(half["area_vs"][ref])])
    lines = [
        f"{sila} has {half['param_share']:.1%} of the baseline's deploy parameters. Test top-1 per "
        "exit (each network at its own exits' MACs); the difference rows are paired by seed.",
        "",
        *table(header, body),
    ]
    if half["supported"] is None:
        lines += ["", "Claim **not yet judged**: fewer than two paired seeds (anytime area)."]
    else:
        verdict = "**supported**" if half["supported"] else "**not supported**"
        lines += [
            "",
            f"Claim {verdict}: it needs the small SiLa network not worse than the full-size baseline "
            "beyond noise *and* better than the baseline of its own size beyond noise (anytime area).",
        ]
    return lines


def tier3_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    if not verdicts:
        return ["No tier-3 run yet."]
    body = [
        [v["method"], v["reference"], diff_cell(v["area"]), f"{v['p_holm']:.3f}" if math.isfinite(v["p_holm"])
         else NO_VALUE, v["verdict"], {True: "yes", False: "no", None: NO_VALUE}[v["collapsed"]]]
        for v in verdicts
    ]  # fmt: skip
    return [
        f"Anytime area, paired by seed; Holm over this family's comparisons: *helps* / *hurts* need the Holm p "
        f"below {ALPHA}; a *nominal* gain or loss is beyond noise alone but not after Holm. A null is "
        f"*inconclusive* when its MDE exceeds {INCONCLUSIVE_MDE:.0f} points. Collapsed: at the last epoch the "
        f"twin's logits are within {COLLAPSE_REL_GAP:.0%} of the exit's (mean |z′ − z| / mean |z|) and agree on "
        f"≥ {COLLAPSE_AGREEMENT:.0%} of training samples.",
        "",
        *table(["reading", "vs", "Δ anytime area", "p (Holm)", "verdict", "twin collapsed"], body),
    ]


def precision_lines(verdicts: list[dict[str, Any]], missing: str = "No run of this family yet.") -> list[str]:
    if not verdicts:
        return [missing]
    body = [
        [v["method"], v["reference"], f"{len(v['seeds'])}", diff_cell(v["area"]),
         f"{v['p_holm']:.3f}" if math.isfinite(v["p_holm"]) else NO_VALUE, v["verdict"],
         "yes" if v["width_met"] else f"no (about {v['pairs_for_target'] or '?'} pairs at this spread)",
         diff_cell(v["budgeted"]) if "budgeted" in v else NO_VALUE, diff_cell(v["any_machine"])]
        for v in verdicts
    ]  # fmt: skip
    return [
        "Anytime area, paired by seed over the seeds whose two run files record the same machine fingerprint "
        "(CPU model, cores, torch and oneDNN versions; files written before fingerprints were recorded are never "
        f"paired here); Holm over this family's {len(verdicts)} comparisons; verdict words as in tier 3. Target: a "
        f"95 % interval no wider than ±{PRECISION_TARGET:.1f}. Secondary, uncorrected: the budgeted curve's mean "
        "over the shared MACs grid, paired over the same seeds. The last column pairs every seed both methods "
        "have, machines unchecked, for reference only.",
        "",
        *table(["reading", "vs", "same-machine pairs", "Δ anytime area", "p (Holm)", "verdict",
                f"interval ≤ ±{PRECISION_TARGET:.1f}?", "Δ budgeted mean", "Δ over every seed (machines unchecked)"],
               body),
    ]  # fmt: skip


def reproduction_lines(checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return []
    body = [[c["run"], c["code"] or NO_VALUE,
             "equal" if c["equal"] else ("no run file to compare" if not c["found"] else "**differs**")]
            for c in checks]  # fmt: skip
    return [
        "Re-runs (`reproductions/`): a committed run trained again from its revision on a later machine with the same "
        "fingerprint, every recorded number but the timings compared with its run file:",
        "",
        *table(["run", "code", "every number but the timings"], body),
    ]


def twin_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows.values() for k in r["twin_monitors"]})
    if not keys:
        return ["No run logged twin monitors."]
    body = [[n, *[f"{r['twin_monitors'].get(k, math.nan):.3f}" for k in keys]] for n, r in rows.items()
            if r["twin_monitors"]]  # fmt: skip
    return table(["method", *keys], body)


# --- plot ---------------------------------------------------------------------------------------------------


def plot(payload: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = payload["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for i, (name, row) in enumerate(s["methods"].items()):
        macs = np.array(row["deploy_macs"]) / 1e6
        ax1.errorbar(macs, [x["mean"] for x in row["test_top1"]], yerr=[x["ci95"] for x in row["test_top1"]],
                     marker="o", capsize=3, label=name, color=f"C{i % 10}", ls="--" if i >= 10 else "-")  # fmt: skip
    ax1.set_xlabel("MACs per image (millions)")
    ax1.set_ylabel("test top-1 (%)")
    ax1.set_title("anytime prediction (mean ± 95 % CI)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    compared = [c for c in s["comparisons"] if c["area"]["n"] >= 2]
    for j, c in enumerate(compared):
        d = c["area"]
        ax2.errorbar(d["mean"], j, xerr=d["ci95"], fmt="o", color="C0" if c["tier"] == 1 else "C7", capsize=3)
    ax2.set_yticks(range(len(compared)), [f"{c['method']} − {c['reference']}" for c in compared], fontsize=7)
    ax2.axvline(0, color="k", lw=0.8)
    ax2.set_xlabel("paired Δ anytime area (points, 95 % CI); blue = tier 1")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
