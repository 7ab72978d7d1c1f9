"""``python -m dynsila.export RUN_DIR [--q Q | --budget MACS | --gate-threshold T]``: export a finished run.

Loads the run's deploy model, fits what the deploy network decides with on the run's validation split (exit
thresholds as ``python -m dynsila.infer`` fits them; a gate threshold for a MACs budget), and writes the graphs:
an early-exit network staged (``deploy.export``, optionally int8 through ``deploy.quantize``), a gated network
(SkipNet) per block and gate (``deploy.gated_export``). Prints what it wrote, the thresholds and the costs.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynsila.budget.flops import exit_costs
from dynsila.budget.thresholds import CONFIDENCE, exit_indices, thresholds_for_target
from dynsila.cli import USER_ERRORS, OneLineParser, fail, positive
from dynsila.console import log_lines_to
from dynsila.data import Splits, build_splits, make_loader, normalize
from dynsila.deploy.export import ThresholdFit, export_onnx
from dynsila.deploy.gated_export import export_gated_run, format_gated_summary
from dynsila.deploy.graphs import EXPORTERS, refuse_output_folder
from dynsila.deploy.onnx_gated_runner import GATED_MANIFEST_FORMAT
from dynsila.deploy.onnx_runner import OPTIMIZATION_LEVELS, THREAD_POOLS, OnnxEarlyExitRunner, cache_dir_problem
from dynsila.deploy.policy_args import add_epsilon_target, add_policy_arguments, fit_policy
from dynsila.errors import DynsilaError
from dynsila.evaluation.evaluate import collect_logits
from dynsila.models import MultiExitNetwork, gated_body
from dynsila.policies.base import apply_one
from dynsila.policies.rules import Spec
from dynsila.runs.rundir import input_shape, load_deploy_model


def fit_run_thresholds(
    model: nn.Module, splits: Splits, costs: list[float], criterion: str, q: float | None, budget: float | None
) -> ThresholdFit:
    """Thresholds fitted on the validation split as ``python -m dynsila.infer`` fits them: for the exit
    distribution share_k ~ q^k, or for the largest average validation cost within ``budget`` MACs."""
    if (q is None) == (budget is None):
        raise DynsilaError("give exactly one of q and budget")
    val_logits, _ = collect_logits(model, make_loader(splits.val, 256, False), splits.mean, splits.std, "cpu")
    return fit_logits(val_logits, costs, criterion, q, budget)


def fit_logits(
    val_logits: torch.Tensor, costs: list[float], criterion: str, q: float | None, budget: float | None
) -> ThresholdFit:
    """``fit_run_thresholds`` on given validation logits ``N x K x C`` (an int8 export's own, say)."""
    thresholds, _ = thresholds_for_target(val_logits, costs, criterion, q, budget)
    conf = CONFIDENCE[criterion](val_logits)
    exits = exit_indices(conf, thresholds[None])[0]
    fractions = torch.bincount(exits, minlength=len(costs)).double() / len(exits)
    return ThresholdFit(
        thresholds=thresholds.tolist(),
        criterion=criterion,
        q=q,
        budget=budget,
        val_images=len(exits),
        val_exit_fractions=fractions.tolist(),
        val_avg_macs=float(fractions @ torch.as_tensor(costs, dtype=torch.float64)),
    )


def export_run(
    run_dir: Path,
    out_dir: Path,
    criterion: str,
    q: float | None,
    budget: float | None,
    exporter: str,
    force: bool,
    lazy: bool = False,
    onnxruntime: dict[str, str] | None = None,
    int8: bool = False,
    gate_threshold: float | None = None,
    policy_fit: Callable[[torch.Tensor, torch.Tensor, list[float]], Spec] | None = None,
) -> dict[str, Any]:
    """``python -m dynsila.export``'s work: load the run's deploy model, fit thresholds on its validation split,
    export. ``onnxruntime``: session settings the runner uses by default (``SessionSettings`` fields). ``int8``:
    quantise the graphs, calibrated on the validation split, and refit the thresholds on the int8 graphs'
    validation logits (``dynsila.deploy.quantize``). A gated run (SkipNet) is exported per block and gate
    (``dynsila.deploy.gated_export``) at ``gate_threshold`` or the one fitted for ``budget``. ``policy_fit``: fits
    another exit policy on the validation logits, labels and costs (``--policy``); the manifest's ``policy`` holds
    the spec the ONNX runner executes (for the default, the quota policy and its criterion). Returns the manifest."""
    model, cfg = load_deploy_model(run_dir)
    splits = build_splits(cfg.data)
    if gated_body(model) is not None:
        return _export_gated_run(model, cfg, splits, run_dir, out_dir, q, budget, exporter, force, lazy, int8,
                                 onnxruntime, gate_threshold)  # fmt: skip
    if gate_threshold is not None:
        raise DynsilaError(f"{run_dir} holds a multi-exit network without gates: pass --q or --budget")
    q = 1.0 if q is None and budget is None else q  # equal exit shares by default
    measured = exit_costs(model, input_shape(cfg))
    costs = [{"macs": c.macs, "macs_cumulative": c.macs_cumulative, "macs_lazy": c.macs_lazy} for c in measured]
    cumulative: list[float] = [c.macs_cumulative for c in measured]
    policy: Spec = {"policy": "quotas", "rule": "quotas", "criterion": criterion}
    if policy_fit is None:
        fit = fit_run_thresholds(model, splits, cumulative, criterion, q, budget)
    else:
        if int8:
            raise DynsilaError("--int8 refits quota thresholds on the int8 logits; export it with --policy quotas")
        policy, fit = _fit_policy(model, splits, cumulative, policy_fit, q, budget)
    images, _ = next(iter(make_loader(splits.val, 8, shuffle=False)))
    example = normalize(images, splits.mean, splits.std)
    extra = {"run": str(run_dir), "name": cfg.name, "num_classes": splits.num_classes, "input": _preprocess(splits)}
    extra["policy"] = policy
    if onnxruntime:
        extra["onnxruntime"] = onnxruntime
    finish = None
    if int8:
        val_images = torch.cat([normalize(x, splits.mean, splits.std) for x, _ in make_loader(splits.val, 256, False)])
        finish = functools.partial(_quantize, val_images.numpy(), cumulative, criterion, q, budget)
    return export_onnx(
        model, out_dir, example, costs, fit, exporter=exporter, force=force, lazy=lazy, extra=extra, finish=finish
    )


def _fit_policy(
    model: nn.Module,
    splits: Splits,
    costs: list[float],
    policy_fit: Callable[[torch.Tensor, torch.Tensor, list[float]], Spec],
    q: float | None,
    budget: float | None,
) -> tuple[Spec, ThresholdFit]:
    """A policy's spec fitted on the validation split, and its thresholds with the validation exit shares."""
    val_logits, val_labels = collect_logits(model, make_loader(splits.val, 256, False), splits.mean, splits.std)
    spec = policy_fit(val_logits, val_labels, costs)
    exits, _ = apply_one(spec, val_logits)
    fractions = np.bincount(exits, minlength=len(costs)) / len(exits)
    thresholds = [float(t) for t in spec["thresholds"]]
    criterion = spec.get("criterion", "max_prob")
    return spec, ThresholdFit(
        thresholds, criterion, q, budget, len(exits), fractions.tolist(), float(fractions @ costs)
    )


def _export_gated_run(
    model: MultiExitNetwork,
    cfg: Any,
    splits: Splits,
    run_dir: Path,
    out_dir: Path,
    q: float | None,
    budget: float | None,
    exporter: str,
    force: bool,
    lazy: bool,
    int8: bool,
    onnxruntime: dict[str, str] | None,
    gate_threshold: float | None,
) -> dict[str, Any]:
    """``export_run`` for a gated network: what does not apply to it is refused in one line."""
    if int8 or lazy:
        flag = "--int8" if int8 else "--lazy"
        raise DynsilaError(f"{flag} is not supported for gated networks (SkipNet); export without it")
    if q is not None or (gate_threshold is None and budget is None):
        raise DynsilaError(
            f"{run_dir} holds a gated network (one exit, gates): pass --gate-threshold T or --budget MACS"
        )
    extra: dict[str, Any] = {"run": str(run_dir), "name": cfg.name, "num_classes": splits.num_classes}
    extra["input"] = _preprocess(splits)
    if onnxruntime:
        extra["onnxruntime"] = onnxruntime
    return export_gated_run(model, splits, input_shape(cfg), out_dir, gate_threshold, budget, exporter, force, extra)


def _preprocess(splits: Splits) -> dict[str, Any]:
    """The manifest's word on turning pixels into the graphs' input."""
    return {
        "preprocess": "x = (pixels * scale - mean) / std per channel, pixels uint8",
        "scale": 1 / 255,
        "mean": list(splits.mean),
        "std": list(splits.std),
    }


def _quantize(
    val_images: np.ndarray,
    costs: list[float],
    criterion: str,
    q: float | None,
    budget: float | None,
    folder: Path,
    manifest: dict[str, Any],
) -> None:
    """int8 graphs calibrated on the validation images, and thresholds refitted on their validation logits."""
    from dynsila.deploy.quantize import quantize_export

    fp32 = OnnxEarlyExitRunner(folder, thread_pool="session").all_exit_logits(val_images)
    manifest["quantization"] = quantize_export(folder, val_images)
    int8 = OnnxEarlyExitRunner(folder, thread_pool="session").all_exit_logits(val_images)
    manifest["quantization"]["val_top1_agreement_with_fp32"] = (fp32.argmax(-1) == int8.argmax(-1)).mean(0).tolist()
    fit = fit_logits(torch.from_numpy(int8), costs, criterion, q, budget)
    for entry, threshold in zip(manifest["exits"], fit.thresholds, strict=True):
        entry["threshold"] = threshold
    manifest["thresholds_fitted_on_val"] = {
        k: v for k, v in fit.__dict__.items() if k not in ("thresholds", "criterion")
    }
    manifest["thresholds_fitted_on_val"]["logits"] = "the int8 graphs'"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m dynsila.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--format", choices=("onnx",), default="onnx")
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/onnx)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--q", type=positive, help="exit distribution share_k ~ q^k (default 1.0: equal shares)")
    target.add_argument("--budget", type=positive, help="average MACs per image to stay within (on validation)")
    target.add_argument(
        "--gate-threshold", type=float, help="gated networks (SkipNet): a gate opens at this probability"
    )
    add_epsilon_target(target)
    add_policy_arguments(parser)
    parser.add_argument("--criterion", choices=sorted(CONFIDENCE), default="max_prob")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto", help="auto: dynamo, else TorchScript")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--lazy",
        action="store_true",
        help="split stages for lazy evaluation (fewer MACs; not faster on ORT in every mix here)",
    )
    parser.add_argument(
        "--int8", action="store_true", help="int8 graphs, calibrated on the validation split (thresholds refitted)"
    )
    parser.add_argument("--ort-optimization", choices=OPTIMIZATION_LEVELS, help="graph optimisation (default all)")
    parser.add_argument("--ort-thread-pool", choices=THREAD_POOLS, help="per session (default) or process-wide")
    parser.add_argument("--ort-cache", help="folder (inside the export) for optimised graphs, reused at start")
    args = parser.parse_args(argv)
    settings = {"optimization": args.ort_optimization, "thread_pool": args.ort_thread_pool, "cache_dir": args.ort_cache}
    problem = cache_dir_problem(args.ort_cache)
    if problem is not None:
        message = f"--ort-cache: {problem}; name a folder relative to the export, e.g. --ort-cache ort_cache"
        return fail(DynsilaError(message))
    out_dir = Path(os.path.abspath(args.out or args.run_dir / "onnx"))  # --out . or .. named as the folder it is
    policy_fit = None
    if args.policy != "quotas" or args.epsilon is not None:
        if args.q is None and args.budget is None and args.epsilon is None:
            args.q = 1.0
        policy_fit = functools.partial(fit_policy, args)
    start = time.perf_counter()
    try:
        refuse_output_folder(out_dir, args.force)  # before the run is loaded: nothing is written on a refusal
        with log_lines_to(sys.stdout):
            manifest = export_run(
                args.run_dir,
                out_dir,
                args.criterion,
                args.q,
                args.budget,
                args.exporter,
                args.force,
                args.lazy,
                {k: v for k, v in settings.items() if v is not None},
                args.int8,
                args.gate_threshold,
                policy_fit,
            )
    except USER_ERRORS as e:
        return fail(e)
    summary = format_gated_summary if manifest["format"] == GATED_MANIFEST_FORMAT else format_summary
    print(summary(manifest, out_dir, time.perf_counter() - start))
    return 0


def format_summary(manifest: dict[str, Any], out_dir: Path, seconds: float) -> str:
    """What the command prints: where the graphs went, how they were exported, the thresholds and costs."""
    fitted = manifest["thresholds_fitted_on_val"]
    if fitted["q"] is not None:
        target = f"q {fitted['q']}"
    elif fitted["budget"] is not None:
        target = f"budget {fitted['budget'] / 1e6:.2f}M MACs"
    else:
        target = f"epsilon {manifest['policy']['fit']['epsilon']}"
    if manifest.get("policy", {}).get("policy", "quotas") != "quotas":
        target = f"policy {manifest['policy']['policy']}, {target}"
    rests = [s["rest"] for s in manifest["stages"] if "rest" in s]
    exporters = sorted({g["exporter"] for g in manifest["stages"] + rests + manifest["exits"]})
    split = f" ({len(rests)} of them split for lazy evaluation)" if rests else ""
    lines = [
        f"exported {len(manifest['stages'])} stage graphs{split} and {len(manifest['exits'])} exit graphs to "
        f"{out_dir} in {seconds:.1f} s (exporter: {'; '.join(exporters)})",
        f"checked against PyTorch: max |logit difference| {manifest['verified_max_abs_logit_difference']:.2e}",
        f"thresholds ({manifest['criterion']}, {target}) fitted on {fitted['val_images']} val images: "
        f"{fitted['val_avg_macs'] / 1e6:.3f}M MACs on average",
        "exit  after stage  threshold  val share  MACs (as evaluated)  MACs (lazy)",
    ]
    for e, share in zip(manifest["exits"], fitted["val_exit_fractions"], strict=True):
        t = "(rest)" if e["exit"] == len(manifest["exits"]) else f"{float(e['threshold']):.4f}"
        lazy = f"{e['macs_lazy'] / 1e6:>10.2f}M" if "macs_lazy" in e else f"{'-':>11}"
        lines.append(
            f"{e['exit']:>4}  {e['after_stage']:>11}  {t:>9}  {share:>9.2f}  {e['macs_cumulative'] / 1e6:>18.2f}M  "
            f"{lazy}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
