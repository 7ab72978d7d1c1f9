"""The evaluation report as typed records, and its one serialiser (``eval.json``).

A report holds one row per exit and one curve per evaluation mode: for multi-exit networks anytime rows
(``AnytimeExit``) and one budgeted curve per confidence criterion; for gated networks one ``GatedExit`` (at the
model's own gate threshold) and the gate-threshold sweep. ``EvalReport.to_dict`` gives the JSON form (the keys
of every record's fields, infinities as the strings "inf" / "-inf", which strict JSON lacks and ``float()`` reads
back); ``EvalReport.from_dict`` reads it, including files written before these records existed. A multi-exit report also
holds ``calibration``: per-exit temperatures fitted on validation, the ECE per exit before and after, and the
budgeted curves again on the temperature-scaled logits (absent, ``None``, in older files and for gated networks).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from dynsila.budget.calibration import ExitCalibration
from dynsila.budget.thresholds import BudgetedRow

# What "MACs" means in every report: the cost unit and the model it is counted on.
MACS_UNITS = "MACs (multiply-accumulates, conv+linear), batch 1, deploy model"

# The conventions a budgeted curve's average MACs can be counted in (``EvalReport.macs_convention``).
MACS_CONVENTIONS = {
    "paper": "as evaluated (the MSDNet paper's convention: every stage whole, every exit up to the one taken)",
    "lazy": "lazy (what a sample pays when the parts only later exits read run only for the samples that go on)",
}


@dataclass
class AnytimeExit:
    """One exit of a multi-exit network: its costs (``dynsila.flops.ExitCost``) and accuracy."""

    exit: int  # 1-based
    macs: int  # exit only
    macs_cumulative: int  # as evaluated: what reaching this exit costs an early-exit run
    fvcore_total: int
    fvcore_total_cumulative: int
    params: int
    params_cumulative: int
    val_top1: float
    test_top1: float
    test_top5: float | None  # None when there are fewer than 10 classes
    # lazy evaluation (dynsila.flops): what a sample leaving here pays, and what one going on pays on top; None in
    # reports written before they were counted
    macs_lazy: int | None = None
    macs_deferred: int | None = None


@dataclass
class GatedExit:
    """The single exit of a gated network at the model's own gate threshold; MACs are averages per sample."""

    exit: int
    macs: float  # average per-sample MACs on test
    macs_cumulative: float  # the same: one exit
    params: int
    params_cumulative: int
    val_top1: float
    test_top1: float
    test_top5: float | None
    macs_all_blocks: int  # every gated block executed
    macs_plain_resnet: int  # the same network without gates
    executed_fraction: float  # dynsila's share of the G gated blocks run (the always-run first block not counted)
    # SkipNet's "computation %", as its code reports it: (sum of gated blocks run + 1) / (G + 1) x 100
    skipnet_computation_percent: float | None = None  # None: an eval.json written before it was reported


ExitRow = AnytimeExit | GatedExit


@dataclass
class BudgetedCurve:
    """MSDNet's budgeted batch classification for one confidence criterion: one point per q."""

    criterion: str
    points: list[BudgetedRow]
    kind: ClassVar[str] = "budgeted"

    @property
    def name(self) -> str:
        return f"budgeted ({self.criterion})"


@dataclass
class GatedPoint:
    threshold: float
    avg_macs: float  # test, per sample
    test_top1: float
    val_top1: float
    val_avg_macs: float
    executed_fraction: float  # share of the G gated blocks run (not SkipNet's computation %: see GatedExit)
    macs_fraction: float  # true MACs against the plain ResNet


@dataclass
class GatedCurve:
    """A gated network's accuracy versus average per-sample MACs over a sweep of the gate threshold."""

    points: list[GatedPoint]
    kind: ClassVar[str] = "gated"
    criterion: ClassVar[str] = "gate_threshold"
    name: ClassVar[str] = "gated (threshold sweep)"


Curve = BudgetedCurve | GatedCurve


@dataclass
class CalibratedCurves:
    """Per-exit temperature scaling (``dynsila.budget.calibration``: temperatures fitted on validation, ECE per exit
    before and after) and one budgeted curve per criterion on the scaled logits, thresholds fitted on scaled
    validation confidences as for the plain curves. JSON: the fit's fields and ``curves``, side by side."""

    fit: ExitCalibration
    curves: list[BudgetedCurve]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.fit), "curves": [_curve_to_dict(c) for c in self.curves]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibratedCurves:
        curves = [_curve_from_dict(c) for c in data["curves"]]
        return cls(_record(ExitCalibration, data), [c for c in curves if isinstance(c, BudgetedCurve)])


@dataclass
class EvalReport:
    run: str
    run_dir: str
    model: str  # the registered model name
    dataset: str
    sila: bool
    seed: int
    units: str  # what the MACs columns count
    splits: dict[str, int]  # {"val": N, "test": N}
    exits: list[AnytimeExit] | list[GatedExit]
    curves: list[Curve]
    macs_convention: str = "paper"  # how the budgeted curves' average MACs are counted: a key of MACS_CONVENTIONS
    calibration: CalibratedCurves | None = None  # temperature-scaled exits; None for gated networks and older files

    @property
    def gated(self) -> bool:
        return any(isinstance(e, GatedExit) for e in self.exits)

    def budgeted(self, criterion: str, calibrated: bool = False) -> BudgetedCurve | None:
        """The budgeted curve of ``criterion`` (``calibrated``: on temperature-scaled logits), if the report has one."""
        if calibrated:
            curves: list[Curve] = list(self.calibration.curves) if self.calibration is not None else []
        else:
            curves = self.curves
        return next((c for c in curves if isinstance(c, BudgetedCurve) and c.criterion == criterion), None)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["exits"] = [dataclasses.asdict(e) for e in self.exits]
        data["curves"] = [_curve_to_dict(c) for c in self.curves]
        data["calibration"] = self.calibration.to_dict() if self.calibration is not None else None
        safe: dict[str, Any] = json_safe(data)
        return safe

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        rows = data["exits"]
        exits: list[AnytimeExit] | list[GatedExit] = (
            [_record(GatedExit, e) for e in rows]
            if any("executed_fraction" in e for e in rows)  # only a gated row has it
            else [_record(AnytimeExit, e) for e in rows]
        )
        header = {k: data[k] for k in ("run", "run_dir", "model", "dataset", "sila", "seed", "units", "splits")}
        curves = [_curve_from_dict(c) for c in data["curves"]]
        calibration = CalibratedCurves.from_dict(data["calibration"]) if data.get("calibration") else None
        convention = data.get("macs_convention", "paper")
        return cls(**header, exits=exits, curves=curves, macs_convention=convention, calibration=calibration)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        return cls.from_dict(json.loads(text))


def _curve_to_dict(curve: Curve) -> dict[str, Any]:
    return {
        "name": curve.name,
        "kind": curve.kind,
        "criterion": curve.criterion,
        "points": [dataclasses.asdict(p) for p in curve.points],
    }


def _curve_from_dict(data: dict[str, Any]) -> Curve:
    if data["kind"] == GatedCurve.kind:
        return GatedCurve([_record(GatedPoint, p) for p in data["points"]])
    return BudgetedCurve(data["criterion"], [_record(BudgetedRow, p) for p in data["points"]])


R = TypeVar("R")


def _record(cls: type[R], data: dict[str, Any]) -> R:
    """A record from its JSON dict: keys it does not know are ignored; "inf" / "-inf" strings become floats."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # every R here is a dataclass
    return cls(**{k: _from_json_value(v) for k, v in data.items() if k in names})


def _from_json_value(value: Any) -> Any:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, list):
        return [_from_json_value(v) for v in value]
    return value


def json_safe(value: Any) -> Any:
    """Strict JSON has no infinities: write them as the strings "inf" / "-inf" (and NaN as "nan"; ``float()``
    reads them back). Tensors, arrays and NumPy scalars become lists and numbers, paths and keys strings, so the
    benchmarks' result files follow the same convention through this one function."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value
