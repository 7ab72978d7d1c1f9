"""int8 exits on ONNX Runtime against fp32: accuracy per exit, exit decisions, and speed, on a trained run.

    python benchmarks/int8_exits.py RUN_DIR [--q 1.0] [--threads 2] [--repeats 7] [--exporter auto]
        [--out int8_exits] [--no-b7]

Exports RUN_DIR twice with ``python -m dynsila.export``'s code: fp32, and ``--int8`` (static quantisation
calibrated on the run's validation split, thresholds refitted on the int8 graphs' validation logits). On the
run's test split: top-1 of every exit in both (the anytime outputs), and each export's early-exit decisions with
its own thresholds (the share of test images that leave at another exit, or with another prediction). Speed:
``OnnxEarlyExitRunner`` int8 over fp32, paired in one process, full network (every exit) and early exit
(``run_stream`` at batch 64, one image at a time at batch 1); and, as the run's network is small, the full
MSDNet CIFAR-100 b7 with random weights (speed only). Writes benchmarks/results/<out>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python benchmarks/x.py` puts only benchmarks/ there

from benchmarks.toolkit import RESULTS_DIR, command_line, environment, header, paired_times, verdict, write_results
from dynsila.data import build_splits, make_loader, normalize
from dynsila.deploy.onnx_runner import OnnxEarlyExitRunner
from dynsila.deploy.run_export import export_run
from dynsila.runs.rundir import read_run_config

ACCURACY_LIMIT = 0.5  # points of top-1 per exit, int8 against fp32
DECISIONS_LIMIT = 0.02  # share of test images whose exit changes


def test_images(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's test split, normalised as the export's manifest says, and its labels."""
    splits = build_splits(read_run_config(run_dir).data)
    parts = [(normalize(x, splits.mean, splits.std), y) for x, y in make_loader(splits.test, 256, False)]
    return torch.cat([x for x, _ in parts]).numpy(), torch.cat([y for _, y in parts]).numpy()


def accuracy_rows(fp32: OnnxEarlyExitRunner, int8: OnnxEarlyExitRunner, x: np.ndarray, y: np.ndarray) -> list[dict]:
    """Top-1 of every exit (no early exit) in both exports."""
    a, b = fp32.all_exit_logits(x).argmax(-1), int8.all_exit_logits(x).argmax(-1)
    return [
        {
            "exit": k + 1,
            "fp32_top1": 100 * float((a[:, k] == y).mean()),
            "int8_top1": 100 * float((b[:, k] == y).mean()),
        }
        for k in range(a.shape[1])
    ]


def decisions(fp32: OnnxEarlyExitRunner, int8: OnnxEarlyExitRunner, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Each export's early exit with its own thresholds, image by image."""
    a, b = fp32(x), int8(x)
    return {
        "exit_changed": float((a.exit_index != b.exit_index).mean()),
        "prediction_changed": float((a.predictions != b.predictions).mean()),
        "fp32_top1": 100 * float((a.predictions == y).mean()),
        "int8_top1": 100 * float((b.predictions == y).mean()),
        "fp32_macs": float(a.macs.mean()),
        "int8_macs": float(b.macs.mean()),
        "fp32_exit_histogram": np.bincount(a.exit_index, minlength=fp32.num_exits).tolist(),
        "int8_exit_histogram": np.bincount(b.exit_index, minlength=int8.num_exits).tolist(),
    }


def kept_thresholds(folder: Path, fp32: OnnxEarlyExitRunner, x: np.ndarray, y: np.ndarray, threads: int) -> dict:
    """The int8 graphs with the fp32 thresholds (not refitted): how many decisions the int8 logits alone move,
    and what that does to the exit mix (the refit exists to hold the budget)."""
    thresholds = [float(t) for t in fp32.thresholds]
    a, b = fp32(x), OnnxEarlyExitRunner(folder, threads=threads, thresholds=thresholds)(x)
    return {
        "exit_changed": float((a.exit_index != b.exit_index).mean()),
        "prediction_changed": float((a.predictions != b.predictions).mean()),
        "int8_top1": 100 * float((b.predictions == y).mean()),
        "int8_macs": float(b.macs.mean()),
        "int8_exit_histogram": np.bincount(b.exit_index, minlength=fp32.num_exits).tolist(),
    }


def speed_rows(fp32: OnnxEarlyExitRunner, int8: OnnxEarlyExitRunner, x: np.ndarray, repeats: int) -> list[dict]:
    """int8 over fp32, paired: full network and early exit, batch 64 and batch 1."""
    batched = [x[i : i + 64] for i in range(0, len(x), 64)]
    singles = [x[i : i + 1] for i in range(min(len(x), 128))]
    cases: dict[str, Callable[[OnnxEarlyExitRunner], Callable[[], Any]]] = {
        "full network, batch 64": lambda r: lambda: [r.all_exit_logits(b) for b in batched],
        "early exit, batch 64 (run_stream)": lambda r: lambda: r.run_stream(batched),
        "full network, batch 1": lambda r: lambda: [r.all_exit_logits(b) for b in singles],
        "early exit, batch 1": lambda r: lambda: [r(b) for b in singles],
    }
    rows = []
    for name, make in cases.items():
        slow, fast = make(fp32), make(int8)
        slow(), fast()
        int8_times, fp32_times = paired_times(fast, slow, "cpu", repeats)
        rows.append(
            {
                "case": name,
                "fp32_seconds": statistics.median(fp32_times),
                "int8_seconds": statistics.median(int8_times),
                "int8_over_fp32": statistics.median(a / b for a, b in zip(int8_times, fp32_times, strict=True)),
            }
        )
        print(rows[-1], flush=True)
    return rows


def b7_speed(folder: Path, threads: int, repeats: int, exporter: str) -> list[dict[str, Any]]:
    """int8 over fp32 on MSDNet CIFAR-100 b7 (random weights, calibrated on random images: speed only), full
    network at batch 64 and batch 1: the trained run's network is small enough for overheads to dominate."""
    import shutil

    from benchmarks.speed.onnx_speed import PRESET
    from dynsila import models
    from dynsila.config import load_config
    from dynsila.deploy.export import ThresholdFit, export_onnx
    from dynsila.deploy.quantize import quantize_export

    torch.manual_seed(0)
    model = models.build("msdnet", num_classes=100, **load_config(PRESET).model_kwargs()).eval()
    assert isinstance(model, models.MultiExitNetwork)
    images = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fit = ThresholdFit([0.0] * model.num_exits, "max_prob", 1.0, None, 0, [], 0.0)
    costs = [{"macs": 0, "macs_cumulative": k} for k in range(model.num_exits)]
    export_onnx(model, folder / "b7_fp32", images[:8], costs, fit, exporter=exporter)
    shutil.copytree(folder / "b7_fp32", folder / "b7_int8")
    quantize_export(folder / "b7_int8", images[:128].numpy())
    fp32, int8 = (OnnxEarlyExitRunner(folder / n, threads=threads) for n in ("b7_fp32", "b7_int8"))
    x = images.numpy()
    rows = []
    for batch, n in ((64, 256), (1, 16)):
        parts = [x[i : i + batch] for i in range(0, n, batch)]

        def every_exit(r: OnnxEarlyExitRunner, parts: list[np.ndarray] = parts) -> Callable[[], Any]:
            return lambda: [r.all_exit_logits(b) for b in parts]

        every_exit(int8)(), every_exit(fp32)()
        int8_times, fp32_times = paired_times(every_exit(int8), every_exit(fp32), "cpu", repeats)
        rows.append(
            {
                "case": f"b7 full network, batch {batch}",
                "fp32_seconds": statistics.median(fp32_times),
                "int8_seconds": statistics.median(int8_times),
                "int8_over_fp32": statistics.median(a / b for a, b in zip(int8_times, fp32_times, strict=True)),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--q", type=float, default=1.0, help="exit distribution share_k ~ q^k fitted on validation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    parser.add_argument("--out", default="int8_exits")
    parser.add_argument("--no-b7", action="store_true", help="skip the b7 speed rows (random weights)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        manifests = {
            name: export_run(
                args.run_dir, Path(tmp) / name, "max_prob", args.q, None, args.exporter, False, int8=name == "int8"
            )
            for name in ("fp32", "int8")
        }
        fp32, int8 = (OnnxEarlyExitRunner(Path(tmp) / n, threads=args.threads) for n in ("fp32", "int8"))
        x, y = test_images(args.run_dir)
        result = {
            "command": command_line(__file__, argv),
            "environment": environment("cpu", args.threads),
            "run": str(args.run_dir),
            "run_epochs": read_run_config(args.run_dir).train.epochs,
            "q": args.q,
            "quantization": manifests["int8"]["quantization"],
            "thresholds": {n: [float(e["threshold"]) for e in m["exits"]] for n, m in manifests.items()},
            "test_images": len(x),
            "per_exit": accuracy_rows(fp32, int8, x, y),
            "early_exit": decisions(fp32, int8, x, y),
            "int8_with_fp32_thresholds": kept_thresholds(Path(tmp) / "int8", fp32, x, y, args.threads),
            "speed": speed_rows(fp32, int8, x, args.repeats)
            + ([] if args.no_b7 else b7_speed(Path(tmp), args.threads, args.repeats, args.exporter)),
            "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        }
    md = markdown(result)
    write_results(args.out, result, md, args.results_dir)
    print(md)
    return 0


def _kept_lines(kept: dict[str, Any] | None) -> list[str]:
    if kept is None:
        return []
    return [
        f"The int8 graphs with the fp32 thresholds instead (no refit): test images leaving at another exit than in "
        f"fp32 {100 * kept['exit_changed']:.2f} %, with another prediction {100 * kept['prediction_changed']:.2f} %; "
        f"top-1 {kept['int8_top1']:.2f}, average MACs {kept['int8_macs'] / 1e6:.3f}M, exit histogram "
        f"{kept['int8_exit_histogram']}.",
        "",
    ]


def markdown(result: dict[str, Any]) -> str:
    env, load, ee = result["environment"], result["load_average_1min"], result["early_exit"]
    lines = [
        *header("int8 exits on ONNX Runtime against fp32", result["command"], env),
        f"Run `{result['run']}` (trained {result['run_epochs']} epochs); {result['quantization']['method']}; "
        "calibrated on "
        f"{result['quantization']['calibration_images']} {result['quantization']['calibration_split']} images; "
        f"thresholds (max_prob, q {result['q']}) fitted on the validation split, the int8 ones on the int8 graphs' "
        f"logits. Accuracy and decisions on the {result['test_images']} test images. {env['threads']} threads; "
        f"times: medians of paired runs in one process; 1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end (above {env['threads']}, other work shared the cores).",
        "",
        "| exit | fp32 top-1 | int8 top-1 | change (points) |",
        "| --- | --- | --- | --- |",
    ]
    changes = []
    for r in result["per_exit"]:
        changes.append(r["int8_top1"] - r["fp32_top1"])
        lines.append(f"| {r['exit']} | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} | {changes[-1]:+.2f} |")
    lines += [
        "",
        f"Early exit, each export with its own thresholds: top-1 fp32 {ee['fp32_top1']:.2f}, int8 "
        f"{ee['int8_top1']:.2f}; average MACs fp32 {ee['fp32_macs'] / 1e6:.3f}M, int8 {ee['int8_macs'] / 1e6:.3f}M; "
        f"exit histograms fp32 {ee['fp32_exit_histogram']}, int8 {ee['int8_exit_histogram']}; test images leaving "
        f"at another exit {100 * ee['exit_changed']:.2f} %, with another prediction "
        f"{100 * ee['prediction_changed']:.2f} %.",
        "",
        *_kept_lines(result.get("int8_with_fp32_thresholds")),
        "| case | fp32 s | int8 s | int8 / fp32 |",
        "| --- | --- | --- | --- |",
    ]
    for r in result["speed"]:
        lines.append(f"| {r['case']} | {r['fp32_seconds']:.4f} | {r['int8_seconds']:.4f} | {r['int8_over_fp32']:.3f} |")
    worst = max(abs(c) for c in changes)
    lines += [
        "",
        f"- Per-exit top-1 within {ACCURACY_LIMIT} points of fp32: largest change {worst:.2f}: "
        f"{verdict(worst <= ACCURACY_LIMIT)}.",
        f"- Exit decisions changed on at most {100 * DECISIONS_LIMIT:.0f} % of test images: "
        f"{100 * ee['exit_changed']:.2f} %: {verdict(ee['exit_changed'] <= DECISIONS_LIMIT)}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
