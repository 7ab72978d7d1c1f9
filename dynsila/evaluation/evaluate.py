"""Budget-aware evaluation of multi-exit networks: ``python -m dynsila.evaluate RUN_DIR``.

One pass over a split stores every exit's logits (N x K x C); every criterion is computed from that array.

- **anytime**: top-1 (and top-5 when C >= 10) of every exit on test, with its MACs.
- **budgeted** batch classification (MSDNet): for target exit distributions share_k ~ q^k (39 values
  q = 0.05 ... 1.95), fit one confidence threshold per exit on the validation split, apply them to test, and
  report average MACs, accuracy and the realised exit fractions. The threshold maths and the confidence criteria
  are ``dynsila.thresholds``; this module collects logits, reads the run directory, formats and writes.
- average MACs in the paper's convention by default (every stage whole, every exit up to the one taken) or, with
  ``macs="lazy"``, in what a sample pays under ``dynsila.runner``'s lazy evaluation (``dynsila.flops``); every
  table states which.
- **calibrated** budgeted curves: one temperature per exit fitted on the validation logits
  (``dynsila.budget.calibration``, Guo et al. 2017), then the same budgeted sweep on the scaled logits; the
  temperatures and each exit's ECE before and after go with them (``EvalReport.calibration``).
- **exit policies** (``--policy NAME ...``): every named policy of ``dynsila.policies`` fitted on val and applied to
  test for the same budgets, written to ``eval_policies.json``.
- **gated** networks (``model.gated_body()`` is not None): accuracy versus average per-sample MACs over a sweep
  of the gate threshold.

The report is ``dynsila.report.EvalReport``, written to ``RUN_DIR/eval.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dynsila.budget.calibration import apply_temperatures, calibrate_exits
from dynsila.budget.flops import ExitCost, GatedCosts, exit_costs, gated_costs
from dynsila.budget.thresholds import CONFIDENCE, budgeted_sweep
from dynsila.cli import USER_ERRORS, OneLineParser, device_name, fail
from dynsila.config import Config
from dynsila.data import Splits, build_splits, make_loader, normalize
from dynsila.errors import DynsilaError
from dynsila.evaluation.report import (
    MACS_CONVENTIONS,
    MACS_UNITS,
    AnytimeExit,
    BudgetedCurve,
    CalibratedCurves,
    Curve,
    EvalReport,
    ExitRow,
    GatedCurve,
    GatedExit,
    GatedPoint,
    json_safe,
)
from dynsila.models import GatedBody, MultiExitNetwork, exit_logits, gated_body
from dynsila.policies.sweep import PolicyPoint, all_curves
from dynsila.policies.table import POLICIES
from dynsila.runs.checkpoint import atomic_write_text
from dynsila.runs.rundir import input_shape, load_deploy_model

__all__ = [
    "EVAL_FILE",
    "MACS_UNITS",
    "EvalReport",
    "calibrated_curves",
    "collect_logits",
    "evaluate_run",
    "format_report",
    "json_safe",
    "read_report",
    "topk_accuracy",
]

EVAL_FILE = "eval.json"

log = logging.getLogger(__name__)


# --- one pass over a split ----------------------------------------------------------------------------------


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: DataLoader,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (bare, in eval mode) over ``loader``: logits ``N x K x C`` (float32, CPU) and labels ``N``."""
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        x = normalize(images.to(device, non_blocking=True), mean, std)
        all_logits.append(torch.stack(exit_logits(model(x)), dim=1).float().cpu())
        all_labels.append(labels)
    model.train(was_training)
    return torch.cat(all_logits), torch.cat(all_labels)


def exit_top1(model: nn.Module, loader: DataLoader, mean: tuple[float, ...], std: tuple[float, ...],
              device: torch.device | str) -> list[float]:  # fmt: skip
    """Top-1 in % of every exit on a loader's images (the per-epoch validation of training)."""
    return topk_accuracy(*collect_logits(model, loader, mean, std, device)).tolist()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Top-k accuracy in percent of every exit: logits ``N x K x C``, labels ``N`` -> ``K``."""
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[1])
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # N x K x k
    hit = (top == labels[:, None, None]).any(dim=-1).float()
    return hit.mean(dim=0) * 100.0


# --- anytime prediction -------------------------------------------------------------------------------------


def anytime(
    val: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], costs: list[ExitCost]
) -> list[AnytimeExit]:
    """One row per exit: its costs, val and test top-1, test top-5 (None below 10 classes)."""
    val_top1, test_top1 = topk_accuracy(*val).tolist(), topk_accuracy(*test).tolist()
    test_top5 = topk_accuracy(*test, k=5).tolist() if test[0].shape[-1] >= 10 else [None] * len(costs)
    return [
        AnytimeExit(**asdict(c), val_top1=v, test_top1=t, test_top5=t5)
        for c, v, t, t5 in zip(costs, val_top1, test_top1, test_top5, strict=True)
    ]


# --- gated networks: accuracy versus average per-sample MACs ------------------------------------------------

GATE_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1 ... 0.9


@dataclass
class GatedPass:
    logits: torch.Tensor  # N x C
    labels: torch.Tensor  # N
    executed: torch.Tensor  # N x G, 1 where the gated block ran
    macs: torch.Tensor  # N, per-sample MACs

    @property
    def top1(self) -> float:
        return float(topk_accuracy(self.logits[:, None], self.labels)[0])


@torch.no_grad()
def gated_pass(
    model: nn.Module,
    loader: DataLoader,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device | str,
    costs: GatedCosts,
) -> GatedPass:
    """One pass of a gated network (eval mode: skipped blocks are not computed) at its current threshold."""
    model.eval()
    logits, labels, executed = [], [], []
    for images, y in loader:
        out = model(normalize(images.to(device), mean, std))
        logits.append(out.logits[-1].float().cpu())
        executed.append(torch.stack(out.gate_actions, dim=1).cpu())
        labels.append(y)
    run = torch.cat(executed)
    return GatedPass(torch.cat(logits), torch.cat(labels), run, costs.per_sample(run))


def gated_exit(model: nn.Module, val: GatedPass, test: GatedPass, costs: GatedCosts) -> GatedExit:
    """The single exit of a gated network at its own threshold; MACs averaged over the test samples; the
    family's own computation percentage (SkipNet's) comes from its gated body."""
    body = gated_body(model)
    if body is None:
        raise TypeError(f"{type(model).__name__} has no gated body")
    params = sum(p.numel() for p in model.parameters())
    top5 = float(topk_accuracy(test.logits[:, None], test.labels, 5)[0]) if test.logits.shape[-1] >= 10 else None
    return GatedExit(
        exit=1,
        macs=float(test.macs.mean()),
        macs_cumulative=float(test.macs.mean()),
        params=params,
        params_cumulative=params,
        val_top1=val.top1,
        test_top1=test.top1,
        test_top5=top5,
        macs_all_blocks=costs.full,
        macs_plain_resnet=costs.plain,
        executed_fraction=float(test.executed.mean()),
        skipnet_computation_percent=body.computation_percent(test.executed),
    )


def gated_sweep(
    model: nn.Module,
    body: GatedBody,
    loaders: tuple[DataLoader, DataLoader],
    splits: Splits,
    device: str,
    costs: GatedCosts,
) -> GatedCurve:
    """Accuracy and average per-sample MACs at every gate threshold in ``GATE_THRESHOLDS`` (val and test)."""
    points = []
    default = body.threshold
    try:
        for t in GATE_THRESHOLDS:
            body.threshold = t
            v, s = (gated_pass(model, loader, splits.mean, splits.std, device, costs) for loader in loaders)
            points.append(
                GatedPoint(
                    threshold=t,
                    avg_macs=float(s.macs.mean()),
                    test_top1=s.top1,
                    val_top1=v.top1,
                    val_avg_macs=float(v.macs.mean()),
                    executed_fraction=float(s.executed.mean()),
                    macs_fraction=float(s.macs.mean()) / costs.plain,
                )
            )
    finally:
        body.threshold = default
    return GatedCurve(points)


# --- a run directory ----------------------------------------------------------------------------------------


def _evaluate_gated(
    model: MultiExitNetwork,
    body: GatedBody,
    cfg: Config,
    splits: Splits,
    loaders: tuple[DataLoader, DataLoader],
    device: str,
) -> tuple[dict[str, int], list[GatedExit], list[Curve]]:
    costs = gated_costs(model, input_shape(cfg))
    model.to(device)
    val, test = (gated_pass(model, loader, splits.mean, splits.std, device, costs) for loader in loaders)
    sizes = {"val": len(val.labels), "test": len(test.labels)}
    return sizes, [gated_exit(model, val, test, costs)], [gated_sweep(model, body, loaders, splits, device, costs)]


Split = tuple[torch.Tensor, torch.Tensor]  # logits N x K x C, labels N


def calibrated_curves(val: Split, test: Split, per_exit: Sequence[float], criteria: Sequence[str]) -> CalibratedCurves:
    """Temperatures fitted on ``val`` alone, then one budgeted curve per criterion on both splits' scaled logits
    (thresholds fitted on scaled validation confidences, applied to scaled test ones)."""
    try:
        fit = calibrate_exits(*val, *test)
    except ValueError as e:  # the calibration module imports torch alone; here it becomes a one-line user error
        raise DynsilaError(f"temperature scaling: {e}") from None
    temperatures = torch.tensor(fit.temperatures, dtype=torch.float64)
    scaled_val, scaled_test = ((apply_temperatures(x, temperatures), y) for x, y in (val, test))
    return CalibratedCurves(
        fit,
        [
            BudgetedCurve(criterion, budgeted_sweep(*scaled_val, *scaled_test, per_exit, criterion=criterion))
            for criterion in criteria
        ],
    )


def _evaluate_multi_exit(
    model: MultiExitNetwork,
    cfg: Config,
    splits: Splits,
    loaders: tuple[DataLoader, DataLoader],
    device: str,
    criteria: Sequence[str],
    macs: str,
) -> tuple[dict[str, int], list[AnytimeExit], list[Curve], CalibratedCurves | None]:
    costs = exit_costs(model, input_shape(cfg))
    model.to(device)
    val, test = (collect_logits(model, loader, splits.mean, splits.std, device) for loader in loaders)
    sizes = {"val": len(val[1]), "test": len(test[1])}
    per_exit = [c.macs_lazy if macs == "lazy" else c.macs_cumulative for c in costs]
    curves: list[Curve] = [
        BudgetedCurve(criterion, budgeted_sweep(*val, *test, per_exit, criterion=criterion)) for criterion in criteria
    ]
    try:
        calibration: CalibratedCurves | None = calibrated_curves(val, test, per_exit, criteria)
    except DynsilaError as e:  # an exit with non-finite logits: the plain curves are still worth reporting
        log.warning("%s; the report has no calibrated curves", e)
        calibration = None
    return sizes, anytime(val, test, costs), curves, calibration


def evaluate_run(
    run_dir: Path,
    criteria: Sequence[str] = tuple(CONFIDENCE),
    device: str = "cpu",
    batch_size: int = 256,
    macs: str = "paper",
    val_indices: Path | None = None,
    write: bool = True,
) -> EvalReport:
    """Evaluate a finished run's deploy model: costs, anytime, budgeted and calibrated budgeted results; writes
    ``eval.json`` unless ``write`` is false (a benchmark re-evaluating runs it must not touch).
    ``macs``: the convention of the budgeted curves' average MACs, a key of ``MACS_CONVENTIONS``.
    ``val_indices``: a file listing the validation split (``data.val_indices``), e.g. a checkpoint's authors'."""
    if macs not in MACS_CONVENTIONS:
        raise DynsilaError(f"unknown MACs convention {macs!r}; choose one of {sorted(MACS_CONVENTIONS)}")
    run_dir = Path(run_dir)
    model, cfg = load_deploy_model(run_dir)
    if val_indices is not None:
        cfg = replace(cfg, data=replace(cfg.data, val_indices=str(val_indices)))
    splits = build_splits(cfg.data)
    loaders = (make_loader(splits.val, batch_size, False), make_loader(splits.test, batch_size, False))
    body = model.gated_body()
    exits: list[AnytimeExit] | list[GatedExit]
    calibration = None
    if body is not None:  # gated network: one exit, cost per sample
        sizes, exits, curves = _evaluate_gated(model, body, cfg, splits, loaders, device)
    else:
        sizes, exits, curves, calibration = _evaluate_multi_exit(model, cfg, splits, loaders, device, criteria, macs)
    report = EvalReport(
        run=cfg.name,
        run_dir=str(run_dir),
        model=cfg.model["name"],
        dataset=cfg.data.name,
        sila=cfg.sila.enabled,
        seed=cfg.seed,
        units=MACS_UNITS,
        splits=sizes,
        exits=exits,
        curves=curves,
        macs_convention=macs,
        calibration=calibration,
    )
    if write:
        atomic_write_text(run_dir / EVAL_FILE, report.to_json())
    return report


def read_report(run_dir: Path) -> EvalReport:
    """The report a run's ``eval.json`` holds."""
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        raise DynsilaError(f"{path} not found; run python -m dynsila.evaluate {run_dir} first")
    return EvalReport.from_json(path.read_text())


# --- every exit policy's curve (``--policy``) -----------------------------------------------------------------

POLICY_FILE = "eval_policies.json"  # eval.json is left as it was


def run_logits(run_dir: Path, device: str = "cpu") -> tuple[Any, Any, list[Any]]:
    """A run's (val, test) logits and labels and its exit costs (``ExitCost`` per exit)."""
    model, cfg = load_deploy_model(Path(run_dir))
    if model.gated_body() is not None:
        raise DynsilaError(f"{run_dir} holds a gated network (one exit): exit policies do not apply")
    costs = exit_costs(model, input_shape(cfg))
    splits = build_splits(cfg.data)
    model.to(device)
    val, test = (collect_logits(model, make_loader(s, 256, False), splits.mean, splits.std, device)
                 for s in (splits.val, splits.test))  # fmt: skip
    return val, test, costs


def policy_curves(
    run_dir: Path, names: Sequence[str], device: str = "cpu", macs: str = "paper", write: bool = True
) -> dict[str, list[PolicyPoint]]:
    val, test, costs = run_logits(run_dir, device)
    per_exit = [c.macs_lazy if macs == "lazy" else c.macs_cumulative for c in costs]
    curves = all_curves(val, test, per_exit, names)
    if write:
        payload = {"macs_convention": macs, "curves": {n: [asdict(p) for p in c] for n, c in curves.items()}}
        atomic_write_text(Path(run_dir) / POLICY_FILE, json.dumps(json_safe(payload), indent=1, allow_nan=False))
    return curves


def format_curves(curves: dict[str, list[PolicyPoint]]) -> str:
    """Every fourth point of each curve."""
    lines = []
    for name, points in curves.items():
        header = f"{'target':>10}  {'avg MACs':>10}  {'test top-1':>10}  {'val top-1':>9}  exit fractions (test)"
        lines += ["", f"policy {name}: fitted on val, applied to test", header]
        for p in points[::4] if len(points) > 12 else points:
            fractions = " ".join(f"{f:.2f}" for f in p.exit_fractions)
            lines.append(f"{p.target:>10.4g}  {p.avg_macs / 1e6:>9.2f}M  {p.test_top1:>10.2f}  {p.val_top1:>9.2f}  "
                         f"{fractions}")  # fmt: skip
    return "\n".join(lines)


# --- formatting ---------------------------------------------------------------------------------------------


def _anytime_table(report: EvalReport) -> list[str]:
    """One row per exit; the lazy column where the costs were counted lazily too."""
    rows: list[ExitRow] = list(report.exits)
    lazy = [e.macs_lazy if isinstance(e, AnytimeExit) else None for e in rows]
    show_lazy = all(m is not None for m in lazy)
    lines = [
        "anytime prediction" + ("; MACs lazy = what a sample leaving there pays under lazy evaluation" * show_lazy),
        f"{'exit':>4}  {'MACs (as evaluated)':>19}  " + (f"{'MACs lazy':>10}  " * show_lazy) + f"{'params':>9}  "
        f"{'val top-1':>9}  {'test top-1':>10}  {'test top-5':>10}",
    ]
    for e, m in zip(rows, lazy, strict=True):
        top5 = f"{e.test_top5:>10.2f}" if e.test_top5 is not None else f"{'-':>10}"
        lazy_cell = f"{(m or 0) / 1e6:>9.2f}M  " if show_lazy else ""
        lines.append(
            f"{e.exit:>4}  {e.macs_cumulative / 1e6:>18.2f}M  {lazy_cell}{e.params_cumulative / 1e6:>8.3f}M  "
            f"{e.val_top1:>9.2f}  {e.test_top1:>10.2f}  {top5}"
        )
    return lines


def _gated_table(curve: GatedCurve) -> list[str]:
    lines = [
        f"{curve.name}: per-sample MACs, skipped blocks not computed",
        f"{'threshold':>9}  {'avg MACs':>10}  {'test top-1':>10}  {'blocks run':>10}  {'MACs vs ResNet':>14}",
    ]
    lines += [
        f"{p.threshold:>9.1f}  {p.avg_macs / 1e6:>9.2f}M  {p.test_top1:>10.2f}  "
        f"{p.executed_fraction:>10.2f}  {p.macs_fraction:>14.2f}"
        for p in curve.points
    ]
    return lines


def _calibration_table(calibration: CalibratedCurves) -> list[str]:
    """One row per exit: the temperature fitted on val and the ECE before -> after on both splits."""
    fit = calibration.fit
    lines = [
        f"temperature scaling: T per exit fitted on val (NLL); ECE % ({fit.bins} bins) before -> after",
        f"{'exit':>4}  {'T':>7}  {'val ECE':>15}  {'test ECE':>15}",
    ]
    for k, t in enumerate(fit.temperatures):
        val = f"{fit.val_ece_before[k]:.2f} -> {fit.val_ece_after[k]:.2f}"
        test = f"{fit.test_ece_before[k]:.2f} -> {fit.test_ece_after[k]:.2f}"
        lines.append(f"{k + 1:>4}  {t:>7.3f}  {val:>15}  {test:>15}")
    return lines


def _budgeted_table(curve: BudgetedCurve, macs_convention: str, scaled: bool = False) -> list[str]:
    """Every fourth q, to stay readable; ``scaled``: a curve on temperature-scaled logits."""
    name = f"{curve.name}, temperature-scaled" if scaled else curve.name
    lines = [
        f"{name}: thresholds fitted on val, applied to test; avg MACs {MACS_CONVENTIONS[macs_convention]}",
        f"{'q':>5}  {'avg MACs':>10}  {'test top-1':>10}  {'val top-1':>9}  exit fractions (test)",
    ]
    for p in curve.points[::4]:
        fractions = " ".join(f"{f:.2f}" for f in p.exit_fractions)
        lines.append(f"{p.q:>5.2f}  {p.avg_macs / 1e6:>9.2f}M  {p.test_top1:>10.2f}  {p.val_top1:>9.2f}  {fractions}")
    return lines


def format_report(report: EvalReport, criteria: Sequence[str] | None = None) -> str:
    """Anytime table, then the gated sweep or one budgeted table per criterion (all, or those in ``criteria``),
    then the temperatures with the ECE per exit and the temperature-scaled budgeted tables."""
    lines = [
        f"{report.run}: {report.model} on {report.dataset} (val {report.splits['val']}, "
        f"test {report.splits['test']}); {report.units}",
        "",
        *_anytime_table(report),
    ]
    for curve in report.curves:
        if isinstance(curve, GatedCurve):
            lines += ["", *_gated_table(curve)]
        elif criteria is None or curve.criterion in criteria:
            lines += ["", *_budgeted_table(curve, report.macs_convention)]
    if report.calibration is not None:
        lines += ["", *_calibration_table(report.calibration)]
        for scaled in report.calibration.curves:
            if criteria is None or scaled.criterion in criteria:
                lines += ["", *_budgeted_table(scaled, report.macs_convention, scaled=True)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dynsila.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--criteria", nargs="+", default=list(CONFIDENCE), choices=sorted(CONFIDENCE))
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--macs", choices=sorted(MACS_CONVENTIONS), default="paper", help="convention of the budgeted average MACs"
    )
    parser.add_argument("--val-indices", type=Path, help="file of training-set indices forming the validation split")
    parser.add_argument(
        "--policy", nargs="+", choices=list(POLICIES), help="also every named exit policy's curve (eval_policies.json)"
    )
    args = parser.parse_args(argv)
    try:
        report = evaluate_run(args.run_dir, args.criteria, args.device, macs=args.macs, val_indices=args.val_indices)
        if args.policy:
            curves = policy_curves(args.run_dir, args.policy, args.device, args.macs)
    except USER_ERRORS as e:
        return fail(e)
    print(format_report(report))
    print(f"\nwrote {args.run_dir / EVAL_FILE}")
    if args.policy:
        print(format_curves(curves) + f"\n\nwrote {args.run_dir / POLICY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
