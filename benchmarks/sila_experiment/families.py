"""A plan's families of comparisons: which seeds pair, the paired statistics, Holm over the family, the verdict.

Pairing. A family with ``pairing: any`` pairs every seed both arms have (the first tiers were run that way). A
``matched`` family pairs a seed only when both run files are in one pairing group: runs admitted by the canary
(``admission``) at one revision of the training path, or revisions bridged by a bit-exact reproduction
(``reproductions/``); files that record no admission are the legacy group and pair by their recorded machine
fingerprint, the rule they were run under.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

from scipy import stats

from benchmarks.sila_experiment.paired_stats import holm, paired, pairs_for_width
from benchmarks.sila_experiment.plan import Family, Selection

Runs = dict[str, dict[int, dict[str, Any]]]  # arm -> seed -> run file
TIMINGS = ("train_seconds", "seconds", "img_per_s", "environment")  # what a faithful re-run may change
PROVENANCE = ("code", "admission", "fingerprint")  # where and from which revision: a bridge compares without them


def raw_group(run: dict[str, Any]) -> str | None:
    """The pairing group a run file names by itself: its admission's training-path revision, or for a legacy
    file (or one partly trained before admission: ``canary: mixed``) its machine fingerprint; None without
    either."""
    admission = run.get("admission") or {}
    if admission.get("canary") == "equal":
        return f"admitted:{admission['training_path']}"
    fingerprint = run.get("fingerprint")
    return "legacy:" + json.dumps(fingerprint, sort_keys=True) if fingerprint else None


def numbers(run: dict[str, Any], skip: tuple[str, ...] = TIMINGS) -> Any:
    """A run file without the keys in ``skip`` (one level deep too): what a reproduction must equal."""
    return {k: ({i: j for i, j in v.items() if i not in skip} if isinstance(v, dict) else v)
            for k, v in run.items() if k not in skip}  # fmt: skip


def bridges(reproductions: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, str]:
    """Pairing groups joined by reproductions equal, bit for bit in every number but timings and provenance, to
    the run file they repeat: group -> its representative (union-find, smallest name first)."""
    parent: dict[str, str] = {}

    def find(g: str) -> str:
        while parent.get(g, g) != g:
            g = parent[g]
        return g

    committed = {(r["method"], r["seed"]): r for r in runs}
    skip = TIMINGS + PROVENANCE
    for again in reproductions:
        first = committed.get((again["method"], again["seed"]))
        if first is None:
            continue
        a, b = raw_group(first), raw_group(again)
        if a and b and numbers(first, skip) == numbers(again, skip):
            ra, rb = sorted((find(a), find(b)))
            parent[rb] = ra
    return {g: find(g) for g in parent}


def group_of(run: dict[str, Any], bridged: dict[str, str]) -> str | None:
    g = raw_group(run)
    return bridged.get(g, g) if g else None


def matched_seeds(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]], bridged: dict[str, str]
                  ) -> list[int]:  # fmt: skip
    """The seeds both arms ran whose two files are in one pairing group."""
    groups = {s: (group_of(mine[s], bridged), group_of(theirs[s], bridged)) for s in set(mine) & set(theirs)}
    return sorted(s for s, (a, b) in groups.items() if a is not None and a == b)


def wilcoxon_exact(differences: list[float]) -> float:
    """Two-sided exact Wilcoxon signed-rank p of paired differences (nan for fewer than one non-zero value)."""
    if not any(d != 0 for d in differences):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns when zeros or ties force it off the exact distribution
        return float(stats.wilcoxon(differences, method="exact").pvalue)


def compare(mine: dict[int, dict[str, Any]], theirs: dict[int, dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """Paired differences over ``seeds`` in anytime area and budgeted mean, and over every common seed."""
    area = {s: mine[s]["area"] - theirs[s]["area"] for s in seeds}
    return {
        "seeds": seeds,
        "area": paired({s: mine[s]["area"] for s in seeds}, {s: theirs[s]["area"] for s in seeds}),
        "budgeted": paired({s: mine[s]["budgeted"] for s in seeds}, {s: theirs[s]["budgeted"] for s in seeds}),
        "any_machine": paired({s: v["area"] for s, v in mine.items()}, {s: v["area"] for s, v in theirs.items()}),
        "wilcoxon_p": wilcoxon_exact([area[s] for s in seeds]),
    }


def family_verdicts(family: Family, grouped: Runs, scores: dict[str, dict[int, dict[str, Any]]],
                    bridged: dict[str, str], verdict: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Each comparison of ``family`` whose two arms have runs: the paired differences (``compare``), Holm over the
    family's scope, the verdict word (``verdict(area, p_holm)``), and whether the interval met the target."""
    out: list[dict[str, Any]] = []
    for method, ref in family.comparisons:
        if method not in scores or ref not in scores:
            continue
        mine, theirs = scores[method], scores[ref]
        seeds = sorted(set(mine) & set(theirs))
        if family.pairing == "matched":
            seeds = matched_seeds(grouped[method], grouped[ref], bridged)
        out.append({"method": method, "reference": ref, **compare(mine, theirs, seeds)})
    p_values = [e["area"]["p_value"] for e in out]
    if family.holm_scope == "declared":  # a declared comparison without data counts, as p = 1
        p_values = [p if math.isfinite(p) else 1.0 for p in p_values]
        p_values += [1.0] * (len(family.comparisons) - len(out))
    for entry, p in zip(out, holm(p_values), strict=False):
        entry["p_holm"] = p
        entry["holm_m"] = len(p_values) if family.holm_scope == "declared" else sum(map(math.isfinite, p_values))
        entry["verdict"] = verdict(entry["area"], p)
        entry["width_met"] = bool(math.isfinite(entry["area"]["ci95"]) and entry["area"]["ci95"] <= family.target)
        entry["pairs_for_target"] = pairs_for_width(entry["area"]["std"], family.target)
    return out


def select(rule: Selection, grouped: Runs, areas: dict[str, dict[int, float]], bridged: dict[str, str]
           ) -> tuple[str | None, str]:  # fmt: skip
    """The candidate a selection rule picks, or None while a candidate has fewer than ``pairs_needed`` matched
    pairs with the reference; with the reason in words."""
    ref = rule.reference
    pairs = {c: matched_seeds(grouped.get(c, {}), grouped.get(ref, {}), bridged) for c in rule.candidates}
    short = {c: len(seeds) for c, seeds in pairs.items() if len(seeds) < rule.pairs_needed}
    if short:
        have = ", ".join(f"{c} {n}" for c, n in short.items())
        return None, f"waits for {rule.pairs_needed} matched pairs of every candidate with {ref} (have: {have})"
    deltas = {c: paired({s: areas[c][s] for s in pairs[c]}, areas[ref])["mean"] for c in rule.candidates}
    best = max(deltas, key=lambda c: deltas[c])
    listed = ", ".join(f"{c} {d:+.2f}" for c, d in deltas.items())
    return best, f"{best}: the largest paired difference in anytime area against {ref} ({listed})"
