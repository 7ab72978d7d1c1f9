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


def staging_folder(out_dir: Path, force: bool) -> Path:
    """A fresh folder beside ``out_dir`` to write an export into before ``publish`` renames it into place; refuses
    an existing ``out_dir`` unless ``force``."""
    if out_dir.exists() and not force:
        raise DynsilaError(f"{out_dir} exists; pass --force to replace it or choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; give it the usual permissions
    return staging
