"""The Markdown report of a plan's summary (``anytime_report.summarise``): the design check, one verdict table per
family, the all-pairs table, the size claims, per-exit and budgeted accuracy, the twin monitors and the re-runs."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.sila_experiment.anytime_report import COLLAPSE_AGREEMENT, COLLAPSE_REL_GAP, INCONCLUSIVE_MDE
from benchmarks.sila_experiment.paired_stats import ALPHA, beyond_noise

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


def p_cell(p: float) -> str:
    return f"{p:.3f}" if math.isfinite(p) else NO_VALUE


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def design_lines(design: dict[str, Any], augmentation: str) -> list[str]:
    control = design["positive_control"]
    widths = "met" if design["widths_met"] else "not met"
    lines = [
        f"- Regime: augmentation `{augmentation}`; the regime arm's last exit: clean train top-1 "
        f"{design['baseline_train_clean_last_exit']:.1f} %, test top-1 {design['baseline_test_last_exit']:.1f} %; "
        f"train–test gap (mean over exits) {design['baseline_gap']:.1f} points (target ≥ {design['gap_target']:.0f}).",
        "- Power: widest 95 % interval of a paired difference in anytime area in the family the design was sized "
        f"for ±{design['widest_tier1_ci95']:.2f} points (target < ±{design['width_target']:.1f}: {widths}); largest "
        f"minimum detectable effect (80 % power, 5 % two-sided) {design['largest_tier1_mde']:.2f} points.",
    ]
    if not design["widths_met"] and design.get("seeds_for_width_target"):
        lines.append(f"- At the spreads observed, every interval of that family would be narrower than "
                     f"±{design['width_target']:.1f} with about {design['seeds_for_width_target']} paired seeds "
                     "(a planning estimate: the spreads are themselves estimated from few seeds).")  # fmt: skip
    if control is None or control["n"] < 2:
        lines.append("- **Incomplete**: the positive control has fewer than two seeds paired with its reference, so "
                     "the experiment's sensitivity is unknown and nothing below is evidence either way.")  # fmt: skip
    else:
        seen = "**seen**" if design["positive_control_seen"] else "**not seen**"
        lines.append(f"- Positive control: {diff_cell(control)} — {seen}.")
        if not design["positive_control_seen"]:
            lines.append(
                "- The positive control does not beat its reference beyond noise, so this experiment is "
                "**not sensitive enough** to call any null result negative: read them as inconclusive."
            )
    return lines


def family_lines(name: str, entries: list[dict[str, Any]], family: dict[str, Any]) -> list[str]:
    if not entries:
        return ["No run of this family yet."]
    collapse = any("collapsed" in e for e in entries)
    planned = family.get("planned_pairs", {})

    def pairs(e: dict[str, Any]) -> str:
        of = planned.get(f"{e['method']} vs {e['reference']}")
        return f"{len(e['seeds'])} of {of}" if of is not None else str(len(e["seeds"]))

    def verdict(e: dict[str, Any]) -> str:  # a pre-registered family decides at its planned pairs, not before
        of = planned.get(f"{e['method']} vs {e['reference']}")
        early = family["holm_scope"] == "declared" and of is not None and len(e["seeds"]) < of
        return f"{e['verdict']} (interim)" if early else e["verdict"]

    header = [
        "arm",
        "vs",
        "pairs (of planned)",
        "Δ anytime area (95 % CI)",
        "MDE",
        "p (Holm, m)",
        "Wilcoxon exact p",
        "Δ budgeted mean",
        "verdict",
        f"interval ≤ ±{family['target']:.1f}?",
        *(["twin collapsed"] * collapse),
    ]
    body = [
        [e["method"], e["reference"], pairs(e), diff_cell(e["area"]),
         f"{e['area']['mde']:.2f}" if math.isfinite(e["area"]["mde"]) else NO_VALUE,
         f"{p_cell(e['p_holm'])} (m={e['holm_m']})", p_cell(e["wilcoxon_p"]), diff_cell(e["budgeted"]),
         verdict(e), "yes" if e["width_met"] else f"no (about {e['pairs_for_target'] or '?'} pairs)",
         *([{True: "yes", False: "no", None: NO_VALUE}[e.get("collapsed")]] * collapse)]
        for e in entries
    ]  # fmt: skip
    shown = {(e["method"], e["reference"]) for e in entries}
    body += [[a, b, f"0 of {planned.get(f'{a} vs {b}', '?')}", "no run yet", *[NO_VALUE] * (len(header) - 4)]
             for a, b in family.get("comparisons", []) if (a, b) not in shown]  # fmt: skip
    scope = ("every declared comparison (a missing one counts as p = 1)" if family["holm_scope"] == "declared"
             else "the comparisons with data")  # fmt: skip
    pairing = ("seeds whose two run files are in one pairing group" if family["pairing"] == "matched"
               else "every seed both arms have")  # fmt: skip
    return [
        f"Paired over {pairing}; Holm over {scope}. *helps* / *hurts* need the Holm p below {ALPHA}; a *nominal* "
        f"gain or loss is beyond noise alone; a null is *inconclusive* when its MDE exceeds {INCONCLUSIVE_MDE:.0f} "
        "points. The budgeted mean is secondary and uncorrected."
        + (f" Collapsed: the twin's logits within {COLLAPSE_REL_GAP:.0%} of the exit's and agreeing on "
           f"≥ {COLLAPSE_AGREEMENT:.0%} of training samples." if collapse else ""),
        "",
        *table(header, body),
    ]  # fmt: skip


def claim_lines(claim: dict[str, Any] | None) -> list[str]:
    if claim is None:
        return ["No run of this claim yet."]
    methods, sila = claim["methods"], claim["sila"]
    exits = len(next(iter(methods.values()))["test_top1"])
    header = ["", "deploy params", "MACs per exit", *[f"exit {k + 1}" for k in range(exits)], "anytime area"]
    body = [[m, f"{v['params']:,}", " / ".join(f"{x / 1e6:.2f}M" for x in v["macs"]),
             *[fmt(i) for i in v["test_top1"]], fmt(v["anytime_area"])] for m, v in methods.items()]  # fmt: skip
    for ref, diffs in claim["half_sila_vs"].items():
        body.append([f"{sila} − {ref}", "", "", *[diff_cell(d) for d in diffs], diff_cell(claim["area_vs"][ref])])
    verdict = {None: "**not yet judged** (fewer than two paired seeds)", True: "**supported**",
               False: "**not supported**"}[claim["supported"]]  # fmt: skip
    return [
        f"{sila} has {claim['param_share']:.1%} of the full-size deploy parameters; difference rows paired by seed.",
        "",
        *table(header, body),
        "",
        f"Claim {verdict}: it needs the small SiLa network not worse than the full-size baseline beyond noise *and* "
        "better than the baseline of its own size beyond noise (anytime area).",
    ]


def pairing_lines(groups: dict[str, int]) -> list[str]:
    legacy = sum(n for g, n in groups.items() if g.startswith("legacy:"))
    admitted = {g: n for g, n in groups.items() if g.startswith("admitted:")}
    lines = [
        f"- Admitted (the canary reproduced bit for bit): {sum(admitted.values())} run files"
        + (" in " + ", ".join(f"`{g}` ({n})" for g, n in admitted.items()) if admitted else "")
        + "."
    ]
    lines.append(
        f"- Legacy (trained before admission): {legacy} run files with a machine fingerprint, "
        f"{groups.get('none', 0)} without one (never matched). Legacy files pair by today's rule, the same "
        "recorded fingerprint, which shows the same software on the same kind of processor, not one machine."
    )
    return lines  # fmt: skip


def all_pairs_lines(compared: list[dict[str, Any]], exits: list[str]) -> list[str]:
    header = ["arm", "vs", "Δ anytime area", *[f"Δ {e}" for e in exits], "Δ budgeted mean", "Δ gap"]
    body = [[c["method"], c["reference"], diff_cell(c["area"]), *[diff_cell(d) for d in c["exits"]],
             diff_cell(c["budgeted"]), diff_cell(c["gap"])] for c in compared]  # fmt: skip
    return table(header, body) if body else ["No comparison yet."]


def arm_lines(rows: dict[str, dict[str, Any]], arms: dict[str, Any]) -> list[str]:
    body = [[n, str(arms[n]["group"]), str(len(r["seeds"])), fmt(r["anytime_area"]), fmt(r["gap_mean"]),
             fmt(r["train_clean_last_exit"]), f"{r['deploy_params']:,}", f"{r['deploy_macs'][-1] / 1e6:.2f}M"]
            for n, r in rows.items()]  # fmt: skip
    header = [
        "arm",
        "group",
        "seeds",
        "anytime area",
        "train–test gap",
        "clean train top-1 (last exit)",
        "deploy params",
        "MACs (last exit)",
    ]
    return table(header, body)


def reproduction_lines(checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return []
    body = [[c["run"], c.get("first_code") or NO_VALUE, c["code"] or NO_VALUE,
             "equal" if c["equal"] else ("no run file to compare" if not c["found"] else "**differs**")]
            for c in checks]  # fmt: skip
    return [
        "## Re-runs (`reproductions/`)",
        "",
        "A committed run trained again on a later machine, from its revision or a later one, every recorded number "
        "but the timings and the revision compared with its run file; an equal re-run bridges its pairing group "
        "(and its revision) with the original's:",
        "",
        *table(["run", "run file's code", "re-run's code", "every number but the timings"], body),
        "",
    ]


def twin_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in rows.values() for k in r["twin_monitors"]})
    if not keys:
        return ["No run logged twin monitors."]
    body = [[n, *[f"{r['twin_monitors'].get(k, math.nan):.3f}" for k in keys]] for n, r in rows.items()
            if r["twin_monitors"]]  # fmt: skip
    return table(["arm", *keys], body)


def markdown(payload: dict[str, Any]) -> str:
    s = payload["summary"]
    rows = s["methods"]
    first = next(iter(rows.values()))
    exits = [f"exit {k + 1} ({m / 1e6:.2f}M)" for k, m in enumerate(first["deploy_macs"])]
    lines = [
        f"# {payload['title']}",
        "",
        f"Command: `{payload['command']}`  ",
        f"Plan `{payload['plan']}`; recomputed from {payload['finished_runs']} run files (of "
        f"{payload['planned_runs']} planned) under `benchmarks/results/{payload['name']}/runs/`; config "
        f"`{payload['config']}`; overrides per run in each file.",
        "",
        "Test top-1 in % on the held-out test split, mean ± 95 % t-interval over seeds; differences paired by seed. "
        "MACs and parameters of the deploy model (training-only heads pruned), as evaluated. Anytime area = mean "
        "test top-1 over the exits' MACs range (trapezoid). DML rows report peer 0.",
        "",
        *[f"> {note}\n" for note in payload.get("notes", [])],
        "## Can this experiment see an effect?",
        "",
        *design_lines(s["design"], payload["augmentation"]),
        "",
        "## Which runs pair",
        "",
        *pairing_lines(s["pairing_groups"]),
        "",
    ]
    for name, entries in s["families"].items():
        family = payload["families"][name]
        lines += [f"## Family `{name}`: {family['title']}", "", *family_lines(name, entries, family), ""]
        if name in s["selections"]:
            lines += [f"Selection rule, fixed before its runs: {s['selections'][name]['why']}.", ""]
    for name, claim in s["claims"].items():
        lines += [f"## Claim `{name}`", "", *claim_lines(claim), ""]
    lines += [
        "## Arms",
        "",
        *arm_lines(rows, payload["methods"]),
        "",
        "## Every arm against its references (uncorrected: a single **beyond noise** here is a lead, not a finding)",
        "",
        *all_pairs_lines(s["comparisons"], exits),
        "",
        "## Test top-1 per exit",
        "",
        *table(["arm", *exits], [[n, *[fmt(i) for i in r["test_top1"]]] for n, r in rows.items()]),
        "",
        "## Budgeted batch classification (max_prob thresholds fitted on val), test top-1 at matched average MACs",
        "",
        *table(["arm", *[f"{m / 1e6:.2f}M" for m in s["budget_grid_macs"]]],
               [[n, *[fmt(i, 1) for i in r["budgeted_curve"]]] for n, r in rows.items()]),
        "",
        f"{NO_VALUE}: a budget outside the network's range (the grid spans what every full-width run's curve covers).",
        "",
        "## Twin heads: do they differ from the main exits? (last epoch, mean over seeds)",
        "",
        *twin_lines(rows),
        "",
        *reproduction_lines(payload.get("reproductions", [])),
        "## Arms' overrides",
        "",
        *[f"- `{n}` (group {m['group']}): {m['about']}; `{' '.join(m['overrides'])}`" for n, m in
          payload["methods"].items() if n in rows],
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
