"""Writing one ONNX graph and publishing an export folder: what the staged early-exit export and the gated export
share (the exporter choice and its fallback, the manifest entry of a graph, the atomic rename into place)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynsila.deploy.onnx_runner import DEPLOY_EXTRA, MANIFEST
from dynsila.errors import DynsilaError
from dynsila.evaluation.report import json_safe
from dynsila.runs.checkpoint import atomic_write_text

log = logging.getLogger(__name__)
EXPORTERS = ("auto", "dynamo", "torchscript")
INPUT_NAME = "image"
VERIFY_TOLERANCE = 1e-3  # on logits, absolute and relative: runtimes round differently, a wrong graph far more


def require_packages(*packages: str) -> None:
    """One clear line when the optional ``deploy`` dependencies are missing."""
    missing = []
    for name in packages:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise DynsilaError(f"ONNX export needs {', '.join(missing)} (the deploy extra): {DEPLOY_EXTRA}")


def export_graph(
    module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, names: tuple[list[str], list[str]], exporter: str
) -> str:
    """Write ``module`` (called on ``example``) to ``path`` with a dynamic batch axis on every input and output;
    returns how: "dynamo", "torchscript", or "torchscript (dynamo failed: ...)" under ``exporter="auto"``."""
    input_names, output_names = names
    module.eval()
    if exporter in ("auto", "dynamo"):
        batch = torch.export.Dim("batch", min=1)
        try:
            with quiet_export():
                torch.onnx.export(
                    module,
                    example,
                    str(path),
                    dynamo=True,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=(tuple({0: batch} for _ in example),),
                    external_data=False,
                    verbose=False,
                )
            return "dynamo"
        except Exception as e:  # any exporter failure: fall back (auto) or report it (dynamo)
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if exporter == "dynamo":
                raise DynsilaError(f"the dynamo exporter failed on {path.name}: {reason}; try --exporter auto") from e
            log.warning("the dynamo exporter failed on %s (%s); using the TorchScript exporter", path.name, reason)
            exporter = f"torchscript (dynamo failed: {reason})"
    axes = {name: {0: "batch"} for name in input_names + output_names}
    with quiet_export():
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
        )
    return exporter


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """The exporters print progress and warn about deprecations and axis names: none of it is the user's concern."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def graph_entry(path: Path, exporter: str) -> dict[str, Any]:
    """A written graph's manifest entry: its file, the inputs it really reads (the TorchScript exporter drops
    unused ones), its opset, and which exporter wrote it."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    return {"file": path.name, "inputs": [i.name for i in graph.graph.input], "opset": opset, "exporter": exporter}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """An export's ``manifest.json``, strict JSON (no NaN), written atomically."""
    atomic_write_text(folder / MANIFEST, json.dumps(json_safe(manifest), indent=1, allow_nan=False))


def publish(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an older export there is renamed away first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


EXPORT_FORMATS = ("dynsila-onnx-1", "dynsila-onnx-gated-1")
EXPORT_SUFFIXES = (".onnx", ".data", ".onnx_data")  # graphs and their external weights


def refuse_output_folder(out_dir: Path, force: bool) -> None:
    """One line unless ``out_dir`` is free, or ``force`` is given and it holds an export of ours and nothing else
    (its manifest says so, and every file is a graph, the manifest or in its onnxruntime cache): ``--force``
    replaces what this project wrote, never a user's folder or file."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise DynsilaError(f"{out_dir} exists; pass --force to replace it or choose another --out")
    problem = foreign_content(out_dir)
    if problem is not None:
        raise DynsilaError(f"--force replaces only an earlier export, but {out_dir} {problem}; choose another --out")


def foreign_content(folder: Path) -> str | None:
    """Why ``folder`` is not an export this project wrote (so replacing it could lose a user's files), or None."""
    if folder.is_symlink() or not folder.is_dir():
        return "is a file or a link, not an export folder"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"holds no readable {MANIFEST} of an export"
    if not isinstance(manifest, dict) or manifest.get("format") not in EXPORT_FORMATS:
        return f"has a {MANIFEST} that is not an export's"
    cache = (manifest.get("onnxruntime") or {}).get("cache_dir")
    for path in folder.rglob("*"):  # stops at the first foreign file
        inside_cache = isinstance(cache, str) and (folder / cache) in path.parents
        ours = path.name == MANIFEST or path.suffix in EXPORT_SUFFIXES or path.is_dir() or inside_cache
        if not ours or path.is_symlink():
            return f"holds {path.relative_to(folder)}, which no export writes"
    return None


def staging_folder(out_dir: Path, force: bool) -> Path:
    """A fresh folder beside ``out_dir`` to write an export into before ``publish`` renames it into place; refuses
    an existing ``out_dir`` unless ``force`` and it is an export of ours (``refuse_output_folder``)."""
    refuse_output_folder(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; give it the usual permissions
    return staging
