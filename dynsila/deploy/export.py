"""Staged ONNX export of an early-exit network (``python -m dynsila.export RUN_DIR`` is ``deploy.run_export``).

An early-exit network cannot be one graph: the point is to stop between stages. The deploy model (batch-norm folded
into the convolutions) is exported as one ONNX graph per stage (``stage0.onnx`` includes the stem) and one per exit
head (``exit<k>.onnx``). Each stage graph reads the previous stage state and writes the next as named tensors,
``state<k>_<j>`` (stage k's output, tensor j: MSDNet's scales, finest first); the first reads ``image``. With
``--lazy`` a stage that declares a deferred split (``MultiExitNetwork.deferred_split``; MSDNet: the finer scales
only later exits read) is written as two graphs, as the PyTorch runner evaluates it lazily: ``stage<k>.onnx``
computes what its exits read (``exit_state<k>_<j>``) and what the rest needs (``pending<k>_<j>``);
``stage<k>_rest.onnx`` turns the pending tensors of the samples that go on into the stage's output (fewer MACs,
but not faster on ONNX Runtime in every exit mix on our CPU, so off by default). Every graph has a dynamic batch
axis. ``manifest.json`` holds the exit order, the tensor names, the thresholds fitted on the run's validation split
(as ``python -m dynsila.infer`` fits them), the criterion, the per-exit MACs and the preprocessing (per exit: MACs
exit only, as evaluated and lazy); with ``--int8``, the quantisation (``dynsila.deploy.quantize``).
``OnnxEarlyExitRunner(DIR)`` runs it on ONNX Runtime with numpy alone. A gated run (SkipNet: ``--gate-threshold T``
or ``--budget MACS``) is exported per block and gate instead (``dynsila.deploy.gated_export``) and runs with
``OnnxGatedRunner(DIR)``.

Graphs come from ``torch.onnx.export``: the torch.export-based ("dynamo") exporter by default; a graph that it fails
on is exported with the TorchScript exporter instead, and the manifest records which exporter wrote each graph and
why. After export every exit's logits are checked against PyTorch on validation images.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from dynsila.deploy.fuse import fold_batchnorm
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
from dynsila.deploy.onnx_gated_runner import OnnxGatedResult, OnnxGatedRunner
from dynsila.deploy.onnx_runner import (
    MANIFEST_FORMAT,
    OnnxEarlyExitResult,
    OnnxEarlyExitRunner,
)
from dynsila.errors import DynsilaError
from dynsila.methods.sila import unwrap
from dynsila.models import MultiExitNetwork, gated_body

__all__ = [
    "OnnxEarlyExitResult",
    "OnnxEarlyExitRunner",
    "OnnxGatedResult",
    "OnnxGatedRunner",
    "ThresholdFit",
    "export_onnx",
]

log = logging.getLogger(__name__)


# --- one graph per stage and per exit -------------------------------------------------------------------------


Layout = tuple[TreeSpec, list[bool]]  # a state's tree, and which of its leaves are tensors (the rest are None)


def flatten_state(tree: Any) -> tuple[list[torch.Tensor], Layout]:
    """A state's tensors in order, without its None entries (a graph has no None inputs or outputs)."""
    leaves, spec = tree_flatten(tree)
    present = [leaf is not None for leaf in leaves]
    return [leaf for leaf in leaves if leaf is not None], (spec, present)


def unflatten_state(tensors: Sequence[torch.Tensor], layout: Layout) -> Any:
    """Inverse of ``flatten_state``."""
    spec, present = layout
    remaining = iter(tensors)
    return tree_unflatten([next(remaining) if p else None for p in present], spec)


class StageGraph(nn.Module):
    """A stage (with the stem in front for the first) as a module of flat tensors: state leaves in, leaves out."""

    def __init__(self, stage: nn.Module, stem: nn.Module | None, spec: TreeSpec | None) -> None:
        super().__init__()
        self.stage, self.stem, self.spec = stage, stem, spec

    def state(self, *leaves: torch.Tensor) -> Any:
        """The stage's output as the model has it: a tensor or a list of tensors."""
        if self.stem is not None:
            return self.stage(self.stem(leaves[0]))
        assert self.spec is not None
        return self.stage(tree_unflatten(list(leaves), self.spec))

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tree_flatten(self.state(*leaves))[0])


class SplitExitsGraph(nn.Module):
    """The exit path of a stage with a deferred split (``DeferredSplit.for_exits``): state leaves in (the image
    for the first stage), the exits' state leaves and then the pending leaves out."""

    def __init__(self, split: Any, stem: nn.Module | None, spec: TreeSpec | None, modules: nn.Module) -> None:
        super().__init__()
        self.split, self.stem, self.spec, self.modules_ = split, stem, spec, modules  # modules_: for .eval()/.to()

    def parts(self, *leaves: torch.Tensor) -> tuple[Any, Any]:
        if self.stem is not None:
            state = self.stem(leaves[0])
        else:
            assert self.spec is not None
            state = tree_unflatten(list(leaves), self.spec)
        result: tuple[Any, Any] = self.split.for_exits(state)
        return result

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        exit_state, pending = self.parts(*leaves)
        return (*flatten_state(exit_state)[0], *flatten_state(pending)[0])


class SplitRestGraph(nn.Module):
    """The deferred part of a stage (``DeferredSplit.complete``): pending leaves in, the stage's output leaves out."""

    def __init__(self, split: Any, layout: Layout, modules: nn.Module) -> None:
        super().__init__()
        self.split, self.layout, self.modules_ = split, layout, modules

    def forward(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tree_flatten(self.split.complete(unflatten_state(leaves, self.layout)))[0])


class ExitGraph(nn.Module):
    """An exit head reading the flat leaves of the stage state it follows; returns its logits ``N x C``."""

    def __init__(self, head: nn.Module, layout: Layout) -> None:
        super().__init__()
        self.head, self.layout = head, layout

    def forward(self, *leaves: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(unflatten_state(leaves, self.layout))
        return logits


def refuse_gated(model: nn.Module) -> None:
    """Gated networks (SkipNet) have their own export (``dynsila.deploy.gated_export``): say so in one line."""
    if gated_body(model) is not None:
        raise DynsilaError(
            "export_onnx writes early-exit networks; a gated network (SkipNet) is exported per block and gate by "
            "dynsila.deploy.gated_export.export_gated (python -m dynsila.export does it for a SkipNet run)"
        )


# --- the export -----------------------------------------------------------------------------------------------


@dataclass
class ThresholdFit:
    """Thresholds for one budget, fitted on the validation split (``python -m dynsila.infer``'s rule)."""

    thresholds: list[float]  # per exit, on the criterion's scale; the last is -inf (everyone left exits)
    criterion: str
    q: float | None  # the exit distribution share_k ~ q^k that was fitted, or None for a budget
    budget: float | None  # average MACs per image asked for, or None for a q
    val_images: int
    val_exit_fractions: list[float]
    val_avg_macs: float


def export_onnx(
    model: nn.Module,
    out_dir: Path,
    example: torch.Tensor,
    costs: list[dict[str, int]],
    fit: ThresholdFit,
    *,
    exporter: str = "auto",
    force: bool = False,
    lazy: bool = False,
    extra: dict[str, Any] | None = None,
    finish: Callable[[Path, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Export ``model``'s stages and exits to ``out_dir`` (written to a temporary folder beside it, then renamed
    into place) and return the manifest. ``example``: a few normalised inputs ``N x C x H x W`` (N >= 2) to trace
    and verify with; ``costs``: per exit ``{"macs", "macs_cumulative"[, "macs_lazy"]}``; ``extra``: more manifest
    entries. ``lazy``: write stages with a deferred split as two graphs (see the module docstring); off by default:
    on ONNX Runtime the extra graph calls and the pending tensors' round trip through numpy can cost more than the
    skipped MACs save (b7, 2 CPU threads, the runner's sleeping pools: 0.73-1.18 x the default's time depending on
    the exit mix and batch, benchmarks/results/onnx_speed.md). ``finish``: a last step on the verified
    graphs (int8 quantisation) that may rewrite them and change the manifest, before anything is published."""
    bare = unwrap(model)
    refuse_gated(bare)
    if exporter not in EXPORTERS:
        raise DynsilaError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    require_packages("onnx", "onnxruntime", *(["onnxscript"] if exporter != "torchscript" else []))
    if example.shape[0] < 2:
        raise DynsilaError("export needs at least 2 example images (batch 1 would fix the batch axis)")
    if not len(costs) == len(fit.thresholds) == bare.num_exits:
        raise DynsilaError(
            f"{len(costs)} exit costs and {len(fit.thresholds)} thresholds for a model with {bare.num_exits} exits"
        )
    out_dir = Path(out_dir)
    folded = unwrap(fold_batchnorm(bare)).float().eval()
    staging = staging_folder(out_dir, force)
    try:
        with torch.no_grad():
            stages, exits = _export_graphs(folded, example.float(), staging, exporter, lazy)
        manifest = _manifest(example, stages, exits, costs, fit, dict(extra or {}))
        write_manifest(staging, manifest)
        manifest["verified_max_abs_logit_difference"] = _verify(folded, example, staging)
        if finish is not None:
            finish(staging, manifest)
        write_manifest(staging, manifest)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _export_graphs(
    model: MultiExitNetwork, example: torch.Tensor, folder: Path, exporter: str, lazy: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every stage graph and exit graph of ``model`` into ``folder``; their manifest entries. With ``lazy``, a
    stage that declares a deferred split is written as two graphs (exit path, deferred rest)."""
    leaves, names, spec = [example], [INPUT_NAME], None
    stages: list[dict[str, Any]] = []
    exits: list[dict[str, Any]] = [{} for _ in range(model.num_exits)]
    for s, stage in enumerate(model.stages):
        stem = model.stem if s == 0 else None
        split = model.deferred_split(s) if lazy else None
        if split is None:
            entry, exit_view, (leaves, names, spec) = _whole_stage(StageGraph(stage, stem, spec), s, leaves, names,
                                                                   folder, exporter)  # fmt: skip
        else:
            entry, exit_view, (leaves, names, spec) = _split_stage(split, stage, stem, spec, s, leaves, names,
                                                                   folder, exporter)  # fmt: skip
        stages.append(entry)
        exit_leaves, exit_names, exit_layout = exit_view
        for k in (k for k, after in enumerate(model.exit_after) if after == s):
            path = folder / f"exit{k}.onnx"
            graph = ExitGraph(model.exits[k], exit_layout)
            how = export_graph(graph, tuple(exit_leaves), path, (exit_names, [f"logits{k}"]), exporter)
            exits[k] = graph_entry(path, how) | {"after_stage": s, "output": f"logits{k}"}
    return stages, exits


Leaves = tuple[list[torch.Tensor], list[str], Any]  # a state's flat tensors, their graph names, its tree


def _whole_stage(
    graph: StageGraph, s: int, leaves: list[torch.Tensor], names: list[str], folder: Path, exporter: str
) -> tuple[dict[str, Any], Leaves, Leaves]:
    """Stage ``s`` as one graph; its manifest entry, what its exits read, and its output (the same)."""
    out_leaves, spec = tree_flatten(graph.state(*leaves))
    out_names = [f"state{s}_{j}" for j in range(len(out_leaves))]
    path = folder / f"stage{s}.onnx"
    how = export_graph(graph, tuple(leaves), path, (names, out_names), exporter)
    entry = graph_entry(path, how) | {"outputs": out_names}
    return entry, (out_leaves, out_names, (spec, [True] * len(out_leaves))), (out_leaves, out_names, spec)


def _split_stage(
    split: Any,
    stage: nn.Module,
    stem: nn.Module | None,
    spec: TreeSpec | None,
    s: int,
    leaves: list[torch.Tensor],
    names: list[str],
    folder: Path,
    exporter: str,
) -> tuple[dict[str, Any], Leaves, Leaves]:
    """Stage ``s`` as two graphs, the exits' path and the deferred rest (lazy evaluation, as the PyTorch runner
    does it); its manifest entry, what its exits read, and its output."""
    modules = nn.ModuleList([stage] + ([stem] if stem is not None else []))
    first = SplitExitsGraph(split, stem, spec, modules)
    exit_state, pending = first.parts(*leaves)
    exit_leaves, exit_layout = flatten_state(exit_state)
    pending_leaves, pending_layout = flatten_state(pending)
    exit_names = [f"exit_state{s}_{j}" for j in range(len(exit_leaves))]
    pending_names = [f"pending{s}_{j}" for j in range(len(pending_leaves))]
    path = folder / f"stage{s}.onnx"
    how = export_graph(first, tuple(leaves), path, (names, exit_names + pending_names), exporter)
    rest = SplitRestGraph(split, pending_layout, modules)
    out_leaves, out_spec = tree_flatten(split.complete(pending))
    out_names = [f"state{s}_{j}" for j in range(len(out_leaves))]
    rest_path = folder / f"stage{s}_rest.onnx"
    rest_how = export_graph(rest, tuple(pending_leaves), rest_path, (pending_names, out_names), exporter)
    entry = graph_entry(path, how) | {
        "outputs": out_names,
        "exit_outputs": exit_names,
        "pending_outputs": pending_names,
        "rest": graph_entry(rest_path, rest_how) | {"outputs": out_names},
    }
    return entry, (exit_leaves, exit_names, exit_layout), (out_leaves, out_names, out_spec)


def _manifest(
    example: torch.Tensor,
    stages: list[dict[str, Any]],
    exits: list[dict[str, Any]],
    costs: list[dict[str, int]],
    fit: ThresholdFit,
    extra: dict[str, Any],
) -> dict[str, Any]:
    for k, entry in enumerate(exits):
        entry.update(exit=k + 1, threshold=fit.thresholds[k], **costs[k])
    fitted = {k: v for k, v in fit.__dict__.items() if k not in ("thresholds", "criterion")}
    image = {"name": INPUT_NAME, "shape": list(example.shape[1:]), "dtype": "float32", "layout": "NCHW"}
    return {
        "format": MANIFEST_FORMAT,
        "input": image | extra.pop("input", {}),
        "criterion": fit.criterion,
        "thresholds_fitted_on_val": fitted,
        "macs_units": "MACs (multiply-accumulates, conv+linear), batch 1, deploy model; cumulative = as evaluated",
        "batchnorm": "folded into the convolutions (dynsila.deploy.fuse.fold_batchnorm)",
        "torch": torch.__version__,
        "stages": stages,
        "exits": exits,
        **extra,
    }


def _verify(model: MultiExitNetwork, example: torch.Tensor, folder: Path) -> float:
    """Every exit's logits from the written graphs against PyTorch's on ``example``; the largest difference.
    A wrong graph stops the export (nothing is published)."""
    with torch.no_grad():
        expected = torch.stack(model(example.float()), dim=1).numpy()
    got = OnnxEarlyExitRunner(folder, thread_pool="session").all_exit_logits(example.numpy())
    difference = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=VERIFY_TOLERANCE, atol=VERIFY_TOLERANCE):
        raise DynsilaError(
            f"the exported graphs disagree with PyTorch by up to {difference:.3g} on the example images; "
            "try --exporter torchscript and report the model"
        )
    return difference
