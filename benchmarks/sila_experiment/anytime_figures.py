"""The report's figures, each read at a glance: per family a forest plot of the paired differences coloured by
their verdict word, and accuracy against MACs as small multiples (one panel per arm, its reference in grey)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.toolkit import save_figure

VERDICT_COLOURS = {  # colour-blind-safe (Okabe-Ito): gains blue, losses vermillion, nulls grey, leads lighter
    "helps": "#0072B2",
    "hurts": "#D55E00",
    "nominal gain": "#56B4E9",
    "nominal loss": "#E69F00",
    "no effect seen": "#555555",
    "inconclusive": "#AAAAAA",
    "too few pairs": "#DDDDDD",
}


def verdict_colour(verdict: str) -> str:
    return next((c for word, c in VERDICT_COLOURS.items() if verdict.startswith(word)), "#000000")


def forest(payload: dict[str, Any], path: Path) -> None:
    """One panel per family: each comparison's paired Δ anytime area with its 95 % interval."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    families = {n: e for n, e in payload["summary"]["families"].items() if e}
    if not families:
        return
    heights = [max(len(e), 2) * 0.32 + 0.9 for e in families.values()]
    fig, axes = plt.subplots(len(families), 1, figsize=(8, sum(heights)), dpi=110, squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for ax, (name, entries) in zip(axes[:, 0], families.items(), strict=True):
        for j, e in enumerate(entries):
            d = e["area"]
            err = d["ci95"] if math.isfinite(d["ci95"]) else 0.0
            ax.errorbar(d["mean"], j, xerr=err, fmt="o", capsize=3, color=verdict_colour(e["verdict"]))
        ax.set_yticks(range(len(entries)), [f"{e['method']} − {e['reference']} (n={e['area']['n']})"
                                            for e in entries], fontsize=7)  # fmt: skip
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{name}: paired Δ anytime area (points, 95 % CI)", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], marker="o", ls="", color=c, label=w) for w, c in VERDICT_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)
    plt.close(fig)


def small_multiples(payload: dict[str, Any], path: Path, reference: str) -> None:
    """Test top-1 against MACs per exit, one small panel per arm on shared axes, ``reference`` in grey in each."""
    import matplotlib.pyplot as plt

    rows = payload["summary"]["methods"]
    names = list(rows)
    cols = min(6, len(names))
    lines = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(2.2 * cols, 1.9 * lines), dpi=110, sharex=True, sharey=True,
                             squeeze=False)  # fmt: skip

    def draw(ax: Any, row: dict[str, Any], colour: str) -> None:
        macs = np.array(row["deploy_macs"]) / 1e6
        mean = np.array([x["mean"] for x in row["test_top1"]])
        half = np.array([x["ci95"] if math.isfinite(x["ci95"]) else 0.0 for x in row["test_top1"]])
        ax.fill_between(macs, mean - half, mean + half, color=colour, alpha=0.2, lw=0)
        ax.plot(macs, mean, marker="o", ms=3, color=colour, lw=1.2)

    for ax, name in zip(axes.flat, names, strict=False):
        if reference in rows and name != reference:
            draw(ax, rows[reference], "#999999")
        draw(ax, rows[name], "#0072B2")
        ax.set_title(f"{name} (n={len(rows[name]['seeds'])})", fontsize=7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.supxlabel("MACs per image (millions)", fontsize=8)
    fig.supylabel("test top-1 (%), mean ± 95 % CI", fontsize=8)
    fig.suptitle(f"anytime prediction per arm; grey: {reference}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot(payload: dict[str, Any], stem: Path, reference: str) -> list[Path]:
    """Both figures: ``<stem>.png`` (small multiples, the path the report always had) and ``<stem>_forest.png``."""
    import matplotlib

    matplotlib.use("Agg")
    paths = [stem.with_suffix(".png"), stem.parent / f"{stem.name}_forest.png"]
    small_multiples(payload, paths[0], reference)
    forest(payload, paths[1])
    return paths
