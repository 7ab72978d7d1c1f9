"""An experiment as a plan file: what ``benchmarks/anytime.py`` trains and what its report compares.

A plan (YAML, ``benchmarks/plans/*.yaml``) names its config, the data it needs, the overrides every run gets, the
arms (name -> overrides, optional width and ``starts_from``), the seeds (blocks planned seed-major), the families of
comparisons (each arm against a reference arm, the pairing rule, the Holm scope, an optional selection rule), the
canary a machine must reproduce before it trains, and the device profiles. Everything the harness and the report
know about an experiment is here; adding an arm or a regime is an edit of the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PAIRINGS = ("any", "matched")  # every seed both arms have / only seeds whose runs share a pairing group
HOLM_SCOPES = ("present", "declared")  # Holm over the comparisons with data / over every declared comparison


@dataclass(frozen=True)
class Arm:
    name: str
    group: int  # a label for reports (the tier of the first plan); runs record it as ``tier``
    overrides: tuple[str, ...]
    about: str
    width: str = "full"  # a key of Plan.widths: which model overrides shrink the network
    starts_from: str | None = None  # the arm whose run of the same seed initialises this one (train.init_from)
    compare_with: tuple[str, ...] = ()  # the references of the all-pairs table (no correction for multiplicity)


@dataclass(frozen=True)
class Selection:
    """A rule fixed before the first run: once every candidate has ``pairs_needed`` matched pairs with
    ``reference``, the one with the largest mean paired difference in anytime area is chosen, and the arms
    ``adds[choice]`` are planned on ``seeds``."""

    candidates: tuple[str, ...]
    reference: str
    pairs_needed: int
    adds: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    comparisons: tuple[tuple[str, str], ...]  # (arm, reference arm)
    pairing: str = "matched"
    holm_scope: str = "declared"
    target: float = 1.0  # points: the 95 % interval half-width the family aims for
    twin_collapse: bool = False  # show whether the arm's SiLa twin collapsed onto its exit
    select: Selection | None = None


@dataclass(frozen=True)
class Canary:
    arm: str
    seed: int
    overrides: tuple[str, ...]
    reference: str  # the committed canary run file, relative to the repository root


@dataclass(frozen=True)
class Device:
    jobs: int
    threads: int
    overrides: tuple[str, ...] = ()
    needs: str | None = None  # the data this profile reads instead of the plan's
    results: str | None = None  # results name instead of the plan's (a separate experiment on other hardware)
    device: str = "cpu"


@dataclass(frozen=True)
class Plan:
    name: str  # results: benchmarks/results/<name>.{json,md,png} and <name>/runs/
    title: str
    config: str
    needs: str
    overrides: tuple[str, ...]
    widths: dict[str, tuple[str, ...]]
    arms: dict[str, Arm]
    seeds: tuple[tuple[tuple[tuple[str, ...], tuple[int, ...]], ...], ...]  # blocks of (arms, seeds)
    families: dict[str, Family]
    devices: dict[str, Device]
    canary: Canary | None = None
    design: dict[str, Any] = field(default_factory=dict)  # regime and power checks (see anytime_report)
    claims: dict[str, dict[str, str]] = field(default_factory=dict)  # size claims: sila, small, full arms
    notes: tuple[str, ...] = ()  # free text the report prints under its title
    path: str = ""


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_seed{self.seed}"


def seed_list(value: Any) -> tuple[int, ...]:
    """``"5-14"``, ``7`` or ``[0, 2, 3]`` as a tuple of seeds."""
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        lo, _, hi = value.partition("-")
        return tuple(range(int(lo), int(hi or lo) + 1))
    return tuple(int(s) for s in value)


def strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in (value or ()))


def load_plan(path: str | Path) -> Plan:
    raw = yaml.safe_load(Path(path).read_text())
    arms = {name: arm_of(name, spec) for name, spec in raw["arms"].items()}
    blocks = tuple(
        tuple((strings(e["arms"]), seed_list(e["seeds"])) for e in (b if isinstance(b, list) else [b]))
        for b in raw.get("seeds", [])
    )
    families = {name: family_of(name, spec) for name, spec in (raw.get("families") or {}).items()}
    devices = {name: Device(**{**spec, "overrides": strings(spec.get("overrides"))}) for name, spec in
               raw["devices"].items()}  # fmt: skip
    canary = raw.get("canary")
    plan = Plan(
        name=raw["name"], title=raw.get("title", raw["name"]), config=raw["config"], needs=raw["needs"],
        overrides=strings(raw.get("overrides")), widths={k: strings(v) for k, v in raw.get("widths", {}).items()},
        arms=arms, seeds=blocks, families=families, devices=devices,
        canary=Canary(canary["arm"], int(canary["seed"]), strings(canary.get("overrides")), canary["reference"])
        if canary else None,
        design=raw.get("design") or {}, claims=raw.get("claims") or {}, notes=strings(raw.get("notes")),
        path=str(path),
    )  # fmt: skip
    check(plan)
    return plan


def arm_of(name: str, spec: dict[str, Any]) -> Arm:
    return Arm(
        name=name,
        group=int(spec.get("group", 1)),
        overrides=strings(spec.get("overrides")),
        about=str(spec.get("about", "")),
        width=str(spec.get("width", "full")),
        starts_from=spec.get("starts_from"),
        compare_with=strings(spec.get("compare_with")),
    )


def family_of(name: str, spec: dict[str, Any]) -> Family:
    select = spec.get("select")
    return Family(
        name=name,
        title=str(spec.get("title", name)),
        comparisons=tuple((str(a), str(b)) for a, b in spec["comparisons"]),
        pairing=spec.get("pairing", "matched"),
        holm_scope=spec.get("holm_scope", "declared"),
        target=float(spec.get("target", 1.0)),
        twin_collapse=bool(spec.get("twin_collapse", False)),
        select=Selection(
            candidates=strings(select["candidates"]),
            reference=str(select["reference"]),
            pairs_needed=int(select["pairs_needed"]),
            adds={k: strings(v) for k, v in select["adds"].items()},
            seeds=seed_list(select["seeds"]),
        )
        if select
        else None,
    )


def check(plan: Plan) -> None:
    """Every name a plan uses refers to an arm, a width or a pairing it defines."""
    named = [a for block in plan.seeds for arms, _ in block for a in arms]
    for arm in plan.arms.values():
        named += [*arm.compare_with, *([arm.starts_from] if arm.starts_from else [])]
        if arm.width not in plan.widths:
            raise ValueError(f"{plan.path}: arm {arm.name} has width {arm.width!r}, not one of {sorted(plan.widths)}")
    for family in plan.families.values():
        named += [a for pair in family.comparisons for a in pair]
        if family.pairing not in PAIRINGS or family.holm_scope not in HOLM_SCOPES:
            raise ValueError(f"{plan.path}: family {family.name}: pairing in {PAIRINGS}, holm_scope in {HOLM_SCOPES}")
        if family.select:
            named += [*family.select.candidates, family.select.reference]
            named += [a for arms in family.select.adds.values() for a in arms]
    named += [plan.canary.arm] if plan.canary else []
    unknown = sorted({a for a in named if a not in plan.arms})
    if unknown:
        raise ValueError(f"{plan.path}: unknown arm(s) {', '.join(unknown)}")


def planned_runs(plan: Plan, arms: list[str] | None = None, choices: dict[str, str] | None = None) -> list[RunSpec]:
    """Every run of the plan (only ``arms`` when given), block by block, seed-major within a block (each seed's
    runs of every entry side by side, so partial results stay paired); then the runs each selection's choice adds
    (``choices``: family -> chosen candidate), a second stage after its source. A run named twice trains once."""
    wanted = set(plan.arms if arms is None else arms)
    specs: list[RunSpec] = []
    for block in plan.seeds:
        for seed in sorted({s for _, seeds in block for s in seeds}):
            specs += [RunSpec(a, seed) for names, seeds in block if seed in seeds for a in names if a in wanted]
    for name, choice in (choices or {}).items():
        select = plan.families[name].select
        if select is None or choice not in select.adds:
            continue
        chain = [s for a in select.adds[choice] for s in (plan.arms[a].starts_from, a) if s and s in wanted]
        specs += [RunSpec(a, seed) for seed in select.seeds for a in dict.fromkeys(chain)]
    return list(dict.fromkeys(specs))


def run_overrides(plan: Plan, device: Device, spec: RunSpec, runs_root: Path, shown: Any = str) -> list[str]:
    """The config overrides that make a run: the plan's, the device profile's, the arm's, its width, the seed,
    and for a second stage the run it starts from (under ``runs_root``, as ``shown`` writes paths)."""
    arm = plan.arms[spec.method]
    source = []
    if arm.starts_from:
        source = [f"train.init_from={shown(runs_root / RunSpec(arm.starts_from, spec.seed).name)}"]
    return [*plan.overrides, *device.overrides, *arm.overrides, *plan.widths[arm.width], f"seed={spec.seed}", *source]
