"""SkipNet on ONNX Runtime: run a gated export (``python -m dynsila.export`` on a SkipNet run) with numpy only.

``OnnxGatedRunner(DIR)`` opens one session per graph the manifest names (stem, blocks, shortcuts, gates, head) and
runs a batch as ``GatedRunner`` runs it in PyTorch: every gate runs on every sample; the samples whose gate opens
(probability >= the threshold, compared in float32 as PyTorch compares a float32 probability with a Python
float) are gathered, the block runs on them alone, and the result is scattered back beside the skipped samples'
shortcut (the projection graph, or the input itself). A recurrent gate's hidden and cell state start at zero and
pass from gate to gate for every sample. Like ``onnx_runner``, this module imports numpy and onnxruntime only: on
a machine without torch, copy ``onnx_runner.py`` and this file into one folder and import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from dynsila.deploy import onnx_runner as base
except ImportError:  # this file copied beside onnx_runner.py onto a machine without torch (so without dynsila)
    import onnx_runner as base  # type: ignore[import-not-found,no-redef]

GATED_MANIFEST_FORMAT = "dynsila-onnx-gated-1"
Array = np.ndarray


@dataclass
class OnnxGatedResult:
    predictions: Array  # N, int64 class index
    executed: Array  # N x G, float32 1 where gated block j + 1 ran (as GatedResult.executed)
    macs: Array  # N, float64 per-sample MACs (gates and shortcuts included)
    logits: Array  # N x C, float32
    probabilities: Array  # N x G, float32 each gate's probability of running its block


def read_gated_manifest(directory: Path) -> dict[str, Any]:
    """A gated export's manifest, checked before anything in it is opened: every graph it names must be a plain
    ``.onnx`` file name inside the folder."""
    path, manifest = base.load_manifest_json(directory)
    if not isinstance(manifest, dict) or manifest.get("format") != GATED_MANIFEST_FORMAT:
        raise base._DeployError(f"{path} is not a gated ({GATED_MANIFEST_FORMAT}) export; use OnnxEarlyExitRunner")
    problem = _gated_manifest_problem(manifest, Path(directory))
    if problem is not None:
        raise base._DeployError(f"{path}: {problem}; re-export with python -m dynsila.export")
    return manifest


def _gated_manifest_problem(manifest: dict[str, Any], directory: Path) -> str | None:
    blocks, gates = manifest.get("blocks"), manifest.get("gates")
    if not (isinstance(blocks, list) and blocks and isinstance(gates, list) and len(gates) == len(blocks) - 1):
        return "it needs a list of blocks and one gate per block after the first"
    if not all(isinstance(e, dict) for e in blocks + gates) or not isinstance(manifest.get("recurrent_state"), dict):
        return "a block, gate or recurrent_state entry is not a mapping"
    shortcuts = [b["shortcut"] for b in blocks if b.get("shortcut") is not None]
    for entry in [manifest.get("stem"), *blocks, *shortcuts, *gates, manifest.get("head")]:
        problem = base._graph_file_problem(entry, directory)
        if problem is not None:
            return problem
    if not isinstance(manifest.get("macs"), dict) or not isinstance(manifest.get("input"), dict):
        return "its macs or input entry is missing"
    return None


class OnnxGatedRunner:
    """Per-sample block skipping on ONNX Runtime (CPU).

    directory: what ``python -m dynsila.export`` wrote for a gated run. threshold: the gate threshold (default
    the manifest's); a gate opens when its probability >= it; -1 runs every block. threads, thread_pool,
    optimization, cache_dir: how the sessions are made (``SessionSettings``; None: the manifest's
    ``onnxruntime`` entry, else the defaults)."""

    def __init__(
        self,
        directory: Path | str,
        threshold: float | None = None,
        threads: int | None = None,
        thread_pool: str | None = None,
        optimization: str | None = None,
        cache_dir: Path | str | None = None,
    ) -> None:
        ort = base._import_onnxruntime()
        self.directory = Path(directory)
        self.manifest = read_gated_manifest(self.directory)
        chosen = self.manifest.get("onnxruntime", {})
        cache = cache_dir if cache_dir is not None else chosen.get("cache_dir")
        self.sessions = base.SessionSettings(
            threads,
            thread_pool or chosen.get("thread_pool", base.SessionSettings.thread_pool),
            optimization or chosen.get("optimization", base.SessionSettings.optimization),
            None if cache is None else self.directory / cache,
        )
        pool = self.sessions.pool(ort)

        def open_graph(entry: dict[str, Any]) -> base._Graph:
            try:
                return base._Graph(self.sessions.open(ort, self.directory / entry["file"], pool))
            except Exception as e:  # onnxruntime's own exception types: an unsupported opset, a damaged graph
                detail = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
                raise base._DeployError(
                    f"onnxruntime {ort.__version__} cannot load {entry['file']} ({detail}); re-export the run with "
                    "python -m dynsila.export, or install an onnxruntime that supports its opset"
                ) from None

        m = self.manifest
        self.stem, self.head = open_graph(m["stem"]), open_graph(m["head"])
        self.blocks = [open_graph(b) for b in m["blocks"]]
        self.shortcuts = [None if b.get("shortcut") is None else open_graph(b["shortcut"]) for b in m["blocks"]]
        self.gates = [open_graph(g) for g in m["gates"]]
        self.state_names: list[str] = list(m["recurrent_state"].get("names", []))
        self.state_shape: list[int] = [int(d) for d in m["recurrent_state"].get("shape", [])]
        costs = m["macs"]
        self.always = float(costs["always"]) + float(costs["gates"])
        self.block_macs = np.asarray(costs["blocks"], dtype=np.float64)
        self.shortcut_macs = np.asarray(costs["shortcuts"], dtype=np.float64)
        self.input_name = m["input"]["name"]
        self.set_threshold(m["gate_threshold"] if threshold is None else threshold)

    def set_threshold(self, threshold: float) -> None:
        """The gate threshold, checked as ``GatedRunner.set_threshold`` checks it."""
        if not isinstance(threshold, int | float) or (not 0.0 <= threshold <= 1.0 and threshold != -1.0):
            raise base._DeployError(f"gate threshold {threshold!r} must lie in [0, 1] (or -1: every block runs)")
        self.threshold = np.float32(threshold)

    def __call__(self, x: Array) -> OnnxGatedResult:
        """One batch ``N x C x H x W``, normalised as the manifest's ``input`` says."""
        x = base.checked_images(x, self.manifest["input"])
        n = x.shape[0]
        (features,) = self.stem({self.input_name: x}).values()
        features = self._block(0, features)
        state = {name: np.zeros((n, *self.state_shape), dtype=np.float32) for name in self.state_names}
        probabilities = np.empty((n, len(self.gates)), dtype=np.float32)
        for j, gate in enumerate(self.gates):
            out = gate({"x": features, **state})
            probabilities[:, j] = out["p"]
            state = {name: out[f"next_{name}"] for name in self.state_names}
            features = self._gated_block(j + 1, features, probabilities[:, j] >= self.threshold)
        (logits,) = self.head({"x": features}).values()
        executed = (probabilities >= self.threshold).astype(np.float32)
        run = executed.astype(np.float64)
        macs = self.always + run @ self.block_macs + (1 - run) @ self.shortcut_macs
        return OnnxGatedResult(logits.argmax(axis=1), executed, macs, logits, probabilities)

    def _block(self, k: int, x: Array) -> Array:
        (out,) = self.blocks[k]({"x": x}).values()
        return out

    def _skip(self, k: int, x: Array) -> Array:
        shortcut = self.shortcuts[k]
        if shortcut is None:
            return x
        (out,) = shortcut({"x": x}).values()
        return out

    def _gated_block(self, k: int, x: Array, run: Array) -> Array:
        """Block ``k`` on the samples with ``run`` true, the shortcut on the rest, scattered back in order."""
        if run.all():
            return self._block(k, x)
        if not run.any():
            return self._skip(k, x)
        executed = self._block(k, np.ascontiguousarray(x[run]))
        out = np.empty((x.shape[0], *executed.shape[1:]), dtype=executed.dtype)
        out[run] = executed
        out[~run] = self._skip(k, np.ascontiguousarray(x[~run]))
        return out
