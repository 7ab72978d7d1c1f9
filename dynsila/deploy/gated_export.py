"""ONNX export of a gated network (SkipNet): one graph per piece the gated runner needs, and a manifest.

A gated network skips blocks per sample, so, as an early-exit network, it cannot be one graph: the runner must
choose between graphs per sample. The deploy model (batch-norm folded) is written as ``stem.onnx`` (image ->
``x``), per gated body block ``block<k>.onnx`` (the whole residual block, ``x`` -> ``x``), ``shortcut<k>.onnx``
where a skipped block still computes a projection (none where it passes its input through), per gate
``gate<j>.onnx`` (the output of block j, and for a recurrent gate the LSTM's hidden and cell state, batch-first
``N x H``, -> the probability of running block j + 1 and the next state), and ``head.onnx`` (``x`` -> logits).
``manifest.json`` (format ``dynsila-onnx-gated-1``) holds the order, the tensor names and shapes, the gate
threshold (given, or fitted on the validation split for an average-MACs budget, as ``python -m dynsila.infer``
fits it) and the per-part MACs. ``OnnxGatedRunner(DIR)`` (``dynsila.deploy.onnx_gated_runner``) runs it.
After export the graphs are checked against PyTorch with every block executed: logits and gate probabilities.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dynsila.budget.flops import GatedCosts, gated_costs
from dynsila.data import Splits, make_loader, normalize
from dynsila.deploy.fuse import fold_batchnorm
from dynsila.deploy.gated_runner import GatedRunner, threshold_for_budget
from dynsila.deploy.graphs import (
    EXPORTERS,
    INPUT_NAME,
    VERIFY_TOLERANCE,
    export_graph,
    graph_entry,
    publish,
    require_packages,
    staging_folder,
    write_manifest,
)
from dynsila.deploy.onnx_gated_runner import GATED_MANIFEST_FORMAT, OnnxGatedRunner
from dynsila.errors import DynsilaError
from dynsila.methods.technique import unwrap
from dynsila.models import GatedBody, MultiExitNetwork, gated_body

# --- graphs of flat tensors ------------------------------------------------------------------------------------


class PieceGraph(nn.Module):
    """A one-tensor piece (stem, block, shortcut, head) called with flat positional tensors, as ``export_graph``
    gives its dynamic batch axes."""

    def __init__(self, piece: nn.Module) -> None:
        super().__init__()
        self.piece = piece

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.piece(*inputs)
        return out


class GateGraph(nn.Module):
    """A gate as a graph: features (and a recurrent gate's state leaves, batch-first ``N x H``) in; the
    probability ``N`` of running the next block (and the next state leaves) out. The LSTM keeps its state as
    ``1 x N x H``; the graphs move the batch axis first so that every input and output is batched on axis 0."""

    def __init__(self, gate: nn.Module, spec: Any) -> None:
        super().__init__()
        self.gate, self.spec = gate, spec

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, state = inputs[0], inputs[1:]
        tree = None if self.spec is None else tree_unflatten([s.unsqueeze(0) for s in state], self.spec)
        p, next_state = self.gate(x, tree)
        if self.spec is None:
            return (p,)
        return (p, *(s.squeeze(0) for s in tree_flatten(next_state)[0]))


def recurrent_state(gate: nn.Module, x: torch.Tensor) -> tuple[Any, list[int]]:
    """A gate's state layout (None for a feed-forward gate) and each leaf's per-sample shape, from one call with
    no state. A recurrent state must be ``1 x N x ...`` tensors (an LSTM's hidden and cell state)."""
    _, state = gate(x, None)
    leaves, spec = tree_flatten(state)
    if not leaves or all(leaf is None for leaf in leaves):
        return None, []
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[:2] == (1, x.shape[0]) for t in leaves):
        raise DynsilaError(
            f"{type(gate).__name__}'s state is not 1 x N x H tensors (an LSTM's); the ONNX export handles "
            "feed-forward gates and LSTM-state recurrent gates only"
        )
    return spec, [int(leaves[0].shape[2])]


# --- the export ------------------------------------------------------------------------------------------------


def export_gated(
    model: nn.Module,
    out_dir: Path,
    example: torch.Tensor,
    threshold: float,
    costs: GatedCosts,
    *,
    exporter: str = "auto",
    force: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export gated ``model``'s pieces to ``out_dir`` (written beside it, then renamed into place) and return the
    manifest. ``example``: a few normalised inputs ``N x C x H x W`` (N >= 2) to trace and verify with;
    ``threshold``: the gate threshold the runner uses by default (a gate opens when its probability >= it);
    ``costs``: the deploy model's per-part MACs (``dynsila.budget.flops.gated_costs``)."""
    bare = unwrap(model)
    body = gated_body(bare)
    if body is None:
        raise DynsilaError(f"{type(bare).__name__} has no gated body; export it with export_onnx")
    if exporter not in EXPORTERS:
        raise DynsilaError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    require_packages("onnx", "onnxruntime", *(["onnxscript"] if exporter != "torchscript" else []))
    if example.shape[0] < 2:
        raise DynsilaError("export needs at least 2 example images (batch 1 would fix the batch axis)")
    if not 0.0 <= threshold <= 1.0 and threshold != -1.0:
        raise DynsilaError(f"gate threshold {threshold} must lie in [0, 1] (or -1: every block runs)")
    out_dir = Path(out_dir)
    folded = unwrap(fold_batchnorm(bare)).float().eval()
    # the recurrent gates' shared LSTM is no submodule of the gate graphs: the TorchScript exporter writes its
    # weights as constants, which it refuses for tensors that require grad
    folded.requires_grad_(False)
    staging = staging_folder(out_dir, force)
    try:
        with torch.no_grad():
            graphs = _export_pieces(folded, example.float(), staging, exporter)
        manifest = _gated_manifest(example, graphs, threshold, costs, dict(extra or {}))
        write_manifest(staging, manifest)
        manifest["verified_max_abs_difference"] = _verify(folded, example.float(), staging)
        write_manifest(staging, manifest)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _export_pieces(model: MultiExitNetwork, x: torch.Tensor, folder: Path, exporter: str) -> dict[str, Any]:
    """Every graph of the gated network into ``folder``, running ``x`` through with every block executed; their
    manifest entries: stem, blocks (each with its shortcut or None), gates, head, recurrent state."""
    body = gated_body(model)
    assert body is not None
    if len(model.stages) != 1 or model.num_exits != 1:
        raise DynsilaError("the gated ONNX export handles one gated stage and one exit (SkipNet's layout)")

    def write(
        module: nn.Module, inputs: tuple[torch.Tensor, ...], name: str, names: tuple[list[str], list[str]]
    ) -> dict[str, Any]:
        path = folder / f"{name}.onnx"
        return graph_entry(path, export_graph(module, inputs, path, names, exporter)) | {"outputs": names[1]}

    stem = write(PieceGraph(model.stem), (x,), "stem", ([INPUT_NAME], ["x"]))
    x = model.stem(x)
    spec, state_shape = recurrent_state(body.gates[0], x) if len(body.gates) else (None, [])
    state_names = [f"state_{i}" for i in range(spec.num_leaves)] if spec is not None else []
    state = [torch.zeros(x.shape[0], *state_shape) for _ in state_names]
    blocks, gates = [], []
    for k, block in enumerate(body.blocks):
        if k > 0:
            gate_inputs = (x, *state)
            p, *state = GateGraph(body.gates[k - 1], spec)(*gate_inputs)
            names = (["x", *state_names], ["p", *[f"next_{n}" for n in state_names]])
            gates.append(write(GateGraph(body.gates[k - 1], spec), gate_inputs, f"gate{k - 1}", names))
        shortcut = body.skip_path(k) if k > 0 else None
        entry = write(PieceGraph(block), (x,), f"block{k}", (["x"], ["out"]))
        entry["shortcut"] = (
            None if shortcut is None else write(PieceGraph(shortcut), (x,), f"shortcut{k}", (["x"], ["out"]))
        )
        blocks.append(entry)
        x = block(x)
    head = write(PieceGraph(model.exits[0]), (x,), "head", (["x"], ["logits"]))
    recurrent = {"names": state_names, "shape": state_shape, "initial": "zeros"}
    return {"stem": stem, "blocks": blocks, "gates": gates, "head": head, "recurrent_state": recurrent}


def _gated_manifest(
    example: torch.Tensor, graphs: dict[str, Any], threshold: float, costs: GatedCosts, extra: dict[str, Any]
) -> dict[str, Any]:
    image = {"name": INPUT_NAME, "shape": list(example.shape[1:]), "dtype": "float32", "layout": "NCHW"}
    return {
        "format": GATED_MANIFEST_FORMAT,
        "input": image | extra.pop("input", {}),
        "gate_threshold": float(threshold),
        "gate_rule": "gate<j> decides block<j+1>: it runs where p >= gate_threshold (float32), else its shortcut",
        "macs": {
            "always": costs.always,
            "gates": costs.gates,
            "blocks": list(costs.blocks),
            "shortcuts": list(costs.shortcuts),
            "full": costs.full,
        },
        "macs_units": "MACs (multiply-accumulates, conv+linear), batch 1, deploy model",
        "batchnorm": "folded into the convolutions (dynsila.deploy.fuse.fold_batchnorm)",
        "torch": torch.__version__,
        **graphs,
        **extra,
    }


def _verify(model: MultiExitNetwork, example: torch.Tensor, folder: Path) -> float:
    """Logits and gate probabilities of the written graphs against PyTorch's on ``example``, every block
    executed (threshold -1, so that no decision hides a piece); the largest difference. A wrong graph stops
    the export (nothing is published)."""
    body = gated_body(model)
    assert isinstance(body, GatedBody)
    saved, body.threshold = body.threshold, -1.0
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        body.threshold = saved
    expected = [out.logits[-1].numpy(), *(p.numpy() for p in out.gate_probs)]
    got_result = OnnxGatedRunner(folder, threshold=-1.0, thread_pool="session")(example.numpy())
    got = [got_result.logits, *got_result.probabilities.T]
    difference = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    if not all(
        np.allclose(g, e, rtol=VERIFY_TOLERANCE, atol=VERIFY_TOLERANCE) for g, e in zip(got, expected, strict=True)
    ):
        raise DynsilaError(
            f"the exported graphs disagree with PyTorch by up to {difference:.3g} on the example images; "
            "try --exporter torchscript and report the model"
        )
    return difference


# --- from a run directory -------------------------------------------------------------------------------------


def export_gated_run(
    model: MultiExitNetwork,
    splits: Splits,
    shape: tuple[int, int, int],
    out_dir: Path,
    threshold: float | None,
    budget: float | None,
    exporter: str,
    force: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """``python -m dynsila.export`` on a gated run: the gate threshold given, or the lowest whose average MACs on
    the validation split stay within ``budget`` (``threshold_for_budget``, as ``python -m dynsila.infer`` fits
    it), then the export. Returns the manifest."""
    if (threshold is None) == (budget is None):
        raise DynsilaError("a gated run needs exactly one of --gate-threshold T and --budget MACS")
    costs = gated_costs(model, shape)
    if threshold is None:
        assert budget is not None
        val = [normalize(x, splits.mean, splits.std) for x, _ in make_loader(splits.val, 256, False)]
        threshold = threshold_for_budget(GatedRunner(model, 0.5, costs), val, budget)
        extra["gate_threshold_fitted_on_val"] = {"budget": budget, "val_images": sum(len(x) for x in val)}
    images, _ = next(iter(make_loader(splits.val, 8, shuffle=False)))
    example = normalize(images, splits.mean, splits.std)
    return export_gated(model, out_dir, example, threshold, costs, exporter=exporter, force=force, extra=extra)


def format_gated_summary(manifest: dict[str, Any], out_dir: Path, seconds: float) -> str:
    """What the command prints for a gated export: the graphs, the threshold, the costs."""
    shortcuts = sum(b["shortcut"] is not None for b in manifest["blocks"])
    graphs = [manifest["stem"], *manifest["blocks"], *manifest["gates"], manifest["head"]]
    exporters = sorted({g["exporter"] for g in graphs})
    macs = manifest["macs"]
    cheapest = macs["always"] + macs["gates"] + sum(macs["shortcuts"])
    difference = manifest["verified_max_abs_difference"]
    fitted = manifest.get("gate_threshold_fitted_on_val")
    how = f" (fitted on {fitted['val_images']} val images for {fitted['budget'] / 1e6:.2f}M MACs)" if fitted else ""
    return "\n".join(
        [
            f"exported a gated network: stem, {len(manifest['blocks'])} block graphs ({shortcuts} with a projection "
            f"shortcut graph), {len(manifest['gates'])} gate graphs and the head to {out_dir} in {seconds:.1f} s "
            f"(exporter: {'; '.join(exporters)})",
            f"checked against PyTorch (every block run): max |difference| {difference:.2e}",
            f"gate threshold {manifest['gate_threshold']:.4f}{how}; MACs from {cheapest / 1e6:.2f}M"
            f" (every gated block skipped) to {macs['full'] / 1e6:.2f}M (every block run)",
        ]
    )
