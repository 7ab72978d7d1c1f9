"""Classify image files with a trained run: ``python -m dynsila.predict RUN_DIR IMAGES... (--q Q | --budget MACS)``.

IMAGES are image files or folders of them (PNG, JPEG, BMP, WebP; a folder is read in name order, its sub-folders
included). Each image is read as the run's evaluation split reads its images (RGB, resized to the run's image
size, normalised with the mean and std recorded in the run's config) and goes through the early-exit runner with
thresholds fitted on the run's validation split exactly as ``python -m dynsila.infer`` fits them (a gated network:
``--gate-threshold`` or ``--budget``). The CSV (``--out``, written atomically; an existing file is kept unless
``--force``) has one row per image: file, class index, class name (where the run knows its classes), confidence
(the criterion's value at the exit taken; max_prob: the class's softmax probability), exit (numbered from 1, as
``python -m dynsila.infer`` prints them) and the MACs the image cost (as evaluated). An image that cannot be read
stops the command naming the file, unless ``--skip-bad`` (then it is skipped with a warning).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dynsila.budget.thresholds import CONFIDENCE, confidence_of
from dynsila.cli import USER_ERRORS, OneLineParser, at_least_one, device_name, fail
from dynsila.config import Config
from dynsila.data import build_splits, image_as_evaluated, normalize
from dynsila.deploy.gated_runner import GatedResult
from dynsila.deploy.infer import add_exit_arguments, fitted_runner, gated_runner
from dynsila.deploy.runner import raise_primitive_cache
from dynsila.errors import DynsilaError
from dynsila.models import MultiExitNetwork
from dynsila.policies.table import DEFAULT
from dynsila.runs.checkpoint import atomic_write_text
from dynsila.runs.rundir import load_deploy_model

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
COLUMNS = ["file", "class", "class_name", "confidence", "exit", "macs"]


def image_files(paths: list[Path]) -> list[Path]:
    """The files named, and the image files inside the folders named (name order, sub-folders included)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise DynsilaError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); pass another")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise DynsilaError(f"{path} does not exist; pass image files or folders of them")
    return found


BAD_IMAGE = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for a file it cannot decode


def read_image(path: Path, cfg: Config) -> torch.Tensor:
    """``path`` as the run evaluates images (uint8 3 x S x S); raises one of ``BAD_IMAGE`` when it is no image."""
    with Image.open(path) as image:
        image.load()
        return image_as_evaluated(image, cfg.data)


def readable_batches(
    files: list[Path], cfg: Config, size: int, skip_bad: bool
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """(files, uint8 images N x 3 x S x S) in batches of ``size``. An unreadable file stops everything with one
    line naming it, or with ``skip_bad`` is skipped with a warning."""
    for start in range(0, len(files), size):
        kept, images = [], []
        for path in files[start : start + size]:
            try:
                images.append(read_image(path, cfg))
                kept.append(path)
            except BAD_IMAGE as e:
                if not skip_bad:
                    raise DynsilaError(f"{path} is not a readable image ({e}); remove it or pass --skip-bad") from None
                print(f"warning: skipped {path}: not a readable image ({e})", file=sys.stderr)
        if kept:
            yield kept, torch.stack(images)


def predict_rows(
    model: MultiExitNetwork, cfg: Config, files: list[Path], args: argparse.Namespace
) -> list[list[object]]:
    """One CSV row per readable image: early exit with thresholds fitted on the run's validation split."""
    splits = build_splits(cfg.data)  # the validation split the thresholds are fitted on
    mean, std = tuple(cfg.data.mean or splits.mean), tuple(cfg.data.std or splits.std)  # as the run trained
    gated = model.gated_body() is not None
    if gated and (args.policy != DEFAULT or args.epsilon is not None):
        raise DynsilaError(f"{args.run_dir} holds a gated network (one exit): --policy {args.policy} does not apply")
    if gated and args.q is not None:
        raise DynsilaError(f"{args.run_dir} holds a gated network: pass --budget MACS or --gate-threshold T, not --q")
    if not gated and args.gate_threshold is not None:
        raise DynsilaError(f"{args.run_dir} holds a multi-exit network without gates: pass --q or --budget")
    runner: Callable[[torch.Tensor], Any]
    runner = gated_runner(model, cfg, splits, args) if gated else fitted_runner(model, cfg, splits, args)[0]
    names = cfg.data.class_names
    rows: list[list[object]] = []
    for batch, images in readable_batches(files, cfg, args.batch_size, args.skip_bad):
        result = runner(normalize(images.to(args.device), mean, std))
        if isinstance(result, GatedResult):  # one exit; its confidence on max_prob's scale
            confidence = confidence_of("max_prob")(result.logits.float()).cpu()
            exits = torch.zeros(len(batch), dtype=torch.long)
        else:
            confidence, exits = result.confidence.cpu(), result.exit_index.cpu()
        for i, path in enumerate(batch):
            label = int(result.predictions[i])
            rows.append([str(path), label, names[label] if names else "", f"{float(confidence[i]):.6g}",
                         int(exits[i]) + 1, int(result.macs[i])])  # fmt: skip
    return rows


def csv_text(rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m dynsila.predict", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders of them")
    add_exit_arguments(parser)
    parser.add_argument("--criterion", choices=sorted(CONFIDENCE), default="max_prob")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV to write")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    parser.add_argument("--batch-size", type=at_least_one, default=64)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raise_primitive_cache()  # first: oneDNN reads it at the process's first convolution
    args = _parse(argv)
    try:
        if args.out.exists() and not args.force:
            raise DynsilaError(f"{args.out} exists; pass --force to overwrite it, or another --out")
        files = image_files(args.images)  # a missing path is told before the model loads
        model, cfg = load_deploy_model(args.run_dir)
        rows = predict_rows(model, cfg, files, args)
        if not rows:
            raise DynsilaError("no image could be read; nothing written")
        atomic_write_text(args.out, csv_text(rows))
    except USER_ERRORS as e:
        return fail(e)
    print(f"{len(rows)} predictions written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
