"""Costs of the deploy model, per exit: multiply-accumulates (fvcore) and parameters.

The model is pruned first (every technique's training-only parts and the wrappers removed), then fvcore's
``FlopCountAnalysis`` counts each truncated forward ``forward(x, upto=k)`` at batch 1. Units are
multiply-accumulates (one multiply-add = 1), as in the MSDNet and SkipNet papers.

Two columns per exit:
- ``conv+linear``: the field's convention (convolutions and fully connected layers only);
- fvcore ``total``: also batch-norm and the pooling ops fvcore knows.

Readings per exit k:
- *exit only*: stem + stages up to exit k + exit k's classifier;
- *as evaluated*: the same plus classifiers 1..k-1, which an early-exit run also computes (``_cumulative``); the
  MSDNet paper's convention (every stage computed whole), the default everywhere;
- *lazy* (``macs_lazy``): what a sample that leaves at exit k pays when the stages a network can split
  (``MultiExitNetwork.deferred_split``, MSDNet's finer scales) run only their exits' dependency path before the
  exit decision and the rest only for the samples that go on, as ``dynsila.runner.EarlyExitRunner`` does; a
  sample that goes on pays ``macs_deferred`` on top. ``macs_lazy + macs_deferred = macs_cumulative``; for a
  network without splits ``macs_deferred`` is 0.

fvcore traces the model with the JIT, which drops ops whose results are unused: in a truncated MSDNet the finer
scales computed for later exits would vanish from the count although ``forward`` computes them. The counted
forward therefore also returns every stage's output, so the count is what actually runs.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from dynsila.methods.technique import deploy_network
from dynsila.models import DynamicOutput, MultiExitNetwork, exit_logits

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore's import-time torch.jit.script deprecation notices
    from fvcore.nn import FlopCountAnalysis

# fvcore operator keys that are convolutions or fully connected layers (the "conv+linear" column)
# (attention's two matrix products count here too, fused or not: see ``attention_macs``)
CONV_LINEAR_OPS = frozenset(
    {"conv", "linear", "addmm", "mm", "matmul", "bmm", "einsum", "lstm", "scaled_dot_product_attention"}
)

# Ops fvcore has no handler for and we knowingly count as free (elementwise, shape and indexing ops, activations,
# poolings without a handler). Any other unsupported op is reported once per process.
KNOWN_FREE_OPS = frozenset(
    {
        "aten::add",
        "aten::add_",
        "aten::sub",
        "aten::mul",
        "aten::mul_",
        "aten::div",
        "aten::div_",
        "aten::cat",
        "aten::relu",
        "aten::relu_",
        "aten::relu6",
        "aten::hardtanh",
        "aten::hardtanh_",
        "aten::sigmoid",
        "aten::sigmoid_",
        "aten::hardsigmoid",
        "aten::hardsigmoid_",
        "aten::hardswish",
        "aten::hardswish_",
        "aten::silu",
        "aten::silu_",
        "aten::gelu",
        "aten::tanh",
        "aten::softmax",
        "aten::log_softmax",
        "aten::max_pool2d",
        "aten::avg_pool2d",
        "aten::mean",
        "aten::flatten",
        "aten::dropout",
        "aten::clone",
        "aten::contiguous",
        "aten::permute",
        "aten::reshape",
        "aten::view",
        "aten::index",
        "aten::index_select",
        "aten::scatter",
        "aten::index_put_",
        "aten::zeros",
        "aten::zeros_like",
        "aten::ones_like",
        "aten::new_zeros",
        "aten::expand",
        "aten::gt",
        "aten::ge",
        "aten::lt",
        "aten::where",
        "aten::pad",
        "aten::constant_pad_nd",
        "aten::sum",
        "aten::rsub",
        "aten::neg",
        "aten::exp",
        "aten::log",
        "aten::sqrt",
        "aten::pow",
        "aten::to",
        "aten::type_as",
        "aten::nonzero",
        "aten::squeeze",
        "aten::unsqueeze",
        "aten::select",
        "aten::slice",
        "aten::size",
        "aten::new_empty",
        "aten::empty",
        "aten::copy_",
        "aten::index_put",
        "aten::unbind",
        "aten::transpose",
        "aten::t",
    }
)
_REPORTED_OPS: set[str] = set()


@dataclass
class ExitCost:
    exit: int  # 1-based
    macs: int  # conv+linear MACs, exit only
    macs_cumulative: int  # conv+linear MACs as evaluated (earlier classifiers included)
    fvcore_total: int  # all ops fvcore counts, exit only
    fvcore_total_cumulative: int
    params: int  # exit only
    params_cumulative: int  # earlier classifiers included
    macs_lazy: int  # conv+linear MACs a sample that leaves here pays with deferred parts left out (see above)
    macs_deferred: int  # what a sample that goes on pays on top: the exit's stage's deferred part


class _CountedForward(nn.Module):
    """``model(x, upto=k)`` that also returns every stage's output, so the JIT trace keeps all computed ops."""

    def __init__(self, model: MultiExitNetwork, upto: int) -> None:
        super().__init__()
        self.model, self.upto = model, upto

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states: list[Any] = []
        handles = [s.register_forward_hook(lambda m, i, out: states.append(out)) for s in self.model.stages]
        try:
            logits = self.model(x, upto=self.upto)
        finally:
            for h in handles:
                h.remove()
        return (*exit_logits(logits), *tree_leaves(states))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def exit_params(model: MultiExitNetwork) -> list[int]:
    """Parameters needed to reach exit k: stem + stages up to k + that exit's classifier (exit only)."""
    stem = count_params(model.stem)
    stage_cum, total = [], stem
    for stage in model.stages:
        total += count_params(stage)
        stage_cum.append(total)
    return [stage_cum[model.exit_after[k]] + count_params(e) for k, e in enumerate(model.exits)]


def exit_params_cumulative(model: MultiExitNetwork) -> list[int]:
    """Parameters of everything up to exit k, classifiers 1..k included (what an early-exit run holds)."""
    only = exit_params(model)
    heads = [count_params(e) for e in model.exits]
    return [only[k] + sum(heads[:k]) for k in range(len(only))]


def exit_costs(model: nn.Module, input_shape: tuple[int, int, int]) -> list[ExitCost]:
    """MACs and parameters of every exit of the pruned ``model`` for one ``C x H x W`` input (batch 1)."""
    bare = deploy_network(model).eval()  # the deploy model: never count SiLa heads
    params, params_cum = exit_params(bare), exit_params_cumulative(bare)
    x = torch.zeros(1, *input_shape)
    costs = []
    for k in range(bare.num_exits):
        by_module = _count(_CountedForward(bare, k), x)
        total = by_module[""]
        earlier = [by_module.get(f"model.exits.{j}", Counter()) for j in range(k)]
        conv_linear = _conv_linear(total)
        deferred = _deferred_macs(bare, k, by_module)
        costs.append(
            ExitCost(
                exit=k + 1,
                macs=conv_linear - sum(_conv_linear(c) for c in earlier),
                macs_cumulative=conv_linear,
                fvcore_total=sum(total.values()) - sum(sum(c.values()) for c in earlier),
                fvcore_total_cumulative=sum(total.values()),
                params=params[k],
                params_cumulative=params_cum[k],
                macs_lazy=conv_linear - deferred,
                macs_deferred=deferred,
            )
        )
    return costs


def _deferred_macs(model: MultiExitNetwork, k: int, by_module: dict[str, Counter[str]]) -> int:
    """conv+linear MACs of the deferred part of exit ``k``'s stage (0 when it has none), from the counts per
    module of the truncated forward: the modules only the deferred part runs (``DeferredSplit.deferred_modules``;
    each runs once per sample there, as in the forward that was counted)."""
    split = model.deferred_split(model.exit_after[k])
    if split is None:
        return 0
    names = {id(m): f"model.{name}" for name, m in model.named_modules()}
    return sum(_conv_linear(by_module.get(names[id(m)], Counter())) for m in split.deferred_modules())


def module_macs(module: nn.Module, *inputs: Any) -> tuple[int, int]:
    """(conv+linear, fvcore total) MACs of one call ``module(*inputs)``: for blocks and gates of gated nets."""
    counts = _count(module.eval(), inputs)[""]
    return _conv_linear(counts), sum(counts.values())


def lstm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::lstm (fvcore has none): 4 gates x hidden x (input + hidden) per step and sample,
    for a single-layer, one-directional LSTM (the SkipNet recurrent gate)."""
    from fvcore.nn.jit_handles import get_shape

    steps, batch, in_features = get_shape(inputs[0])
    hidden = get_shape(outputs[0])[-1]
    return int(steps * batch * 4 * hidden * (in_features + hidden))


def attention_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention (fvcore has none and would count 0): its two matrix
    products, Q K^T (batch x heads x L x S x E) and the weights times V (batch x heads x L x S x Ev); softmax and
    scaling are free as elsewhere. torch.utils.flop_counter counts the same two products when SDPA runs as
    matrix products (its math backend); it counts nothing for the fused CPU kernel either."""
    from fvcore.nn.jit_handles import get_shape

    *batch, length, embed = get_shape(inputs[0])
    source = get_shape(inputs[1])[-2]
    value_embed = get_shape(inputs[2])[-1]
    heads = 1
    for n in batch:
        heads *= n
    return int(heads * length * source * (embed + value_embed))


# Cost handles dynsila adds to fvcore's table (fvcore's own design: one small function per op).
EXTRA_OP_HANDLES = {"aten::lstm": lstm_macs, "aten::scaled_dot_product_attention": attention_macs}


def _count(module: nn.Module, inputs: Any) -> dict[str, Counter[str]]:
    """fvcore counts per module name ("" is the whole), each a Counter of operator -> MACs."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; unsupported ops are reported below
        analysis = FlopCountAnalysis(module, inputs).set_op_handle(**EXTRA_OP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        counts = {name: Counter(ops) for name, ops in analysis.by_module_and_operator().items()}
        unsupported = analysis.unsupported_ops()
    for op in sorted(set(unsupported) - KNOWN_FREE_OPS - _REPORTED_OPS):
        _REPORTED_OPS.add(op)
        warnings.warn(f"fvcore has no cost handler for {op}; it is counted as 0 MACs", stacklevel=3)
    return counts


@dataclass
class GatedCosts:
    """conv+linear MACs of a gated network's parts, batch 1, each counted once with fvcore."""

    always: int  # stem + first block + classifier (every sample runs them)
    gates: int  # all gates (every gate runs for every sample)
    blocks: list[int]  # gated block k when executed (its projection shortcut included)
    shortcuts: list[int]  # gated block k when skipped: its projection shortcut, or 0 for identity
    plain: int  # the same network without gates, every block executed

    @property
    def full(self) -> int:
        """Every gated block executed (the upper end of the per-sample cost)."""
        return self.always + self.gates + sum(self.blocks)

    def per_sample(self, executed: torch.Tensor) -> torch.Tensor:
        """MACs of each sample from its gate decisions ``executed`` (N x G, 1 = block ran) -> N."""
        run = executed.double()  # on its device: a runner on the GPU need not wait for the decisions
        blocks = torch.tensor(self.blocks, dtype=torch.float64, device=run.device)
        shortcuts = torch.tensor(self.shortcuts, dtype=torch.float64, device=run.device)
        return self.always + self.gates + run @ blocks + (1 - run) @ shortcuts


class _AllOutputs(nn.Module):
    """A gated network's forward returning its logits and gate probabilities, so the JIT trace keeps the gates
    (their decisions only steer Python control flow, which a trace does not record)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        probs = out.gate_probs if isinstance(out, DynamicOutput) else []
        return (*exit_logits(out), *probs)


def gated_costs(model: nn.Module, input_shape: tuple[int, int, int]) -> GatedCosts:
    """Per-part MACs of a gated network (the deploy model), from one fvcore count of a forward with every block
    executed: each block, its skip path (``GatedBody.skip_path``: a projection shortcut, or nothing) on the same
    input, the stem and exit, and the gates as everything else (their convolutions, LSTM steps, linears)."""
    bare = deploy_network(model).eval()
    body = bare.gated_body()
    if body is None:
        raise TypeError(f"{type(bare).__name__} has no gated body; use exit_costs")
    counted = _AllOutputs(bare)
    threshold, body.threshold = body.threshold, -1.0  # every gate says execute
    try:
        by_module = _count(counted, torch.zeros(1, *input_shape))
    finally:
        body.threshold = threshold
    names = {id(m): name for name, m in counted.named_modules()}

    def macs(module: nn.Module | None) -> int:
        return 0 if module is None else _conv_linear(by_module.get(names[id(module)], Counter()))

    blocks = [macs(b) for b in body.blocks]
    shortcuts = [macs(body.skip_path(i)) for i in range(len(body.blocks))]
    stem, classifier = macs(bare.stem), sum(macs(e) for e in bare.exits)
    plain = stem + sum(blocks) + classifier
    return GatedCosts(
        always=stem + blocks[0] + classifier,
        gates=_conv_linear(by_module[""]) - plain,
        blocks=blocks[1:],
        shortcuts=shortcuts[1:],
        plain=plain,
    )


def gated_block_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> list[int]:
    """MACs of each gated block when it runs (``GatedBody.blocks[1:]``), for ``GatedBody.set_block_costs``."""
    return gated_costs(model, input_shape).blocks


def _conv_linear(ops: Counter[str]) -> int:
    return sum(v for k, v in ops.items() if k in CONV_LINEAR_OPS)


def format_cost_table(costs: list[ExitCost]) -> str:
    """A plain-text table; MACs in millions (multiply-accumulates), parameters in millions."""
    lines = [
        "MACs = multiply-accumulates (1 multiply-add = 1), batch 1, deploy model (training-only heads pruned);",
        "as evaluated = the paper's convention (every stage whole, earlier exits included); lazy = what a sample",
        "leaving at the exit pays when deferred parts run only for the samples that go on, who pay 'going on +'",
        f"{'exit':>4}  {'MACs conv+linear':>16}  {'as evaluated':>12}  {'lazy':>9}  {'going on +':>10}  "
        f"{'MACs fvcore total':>17}  {'as evaluated':>12}  {'params':>9}  {'as evaluated':>12}",
    ]
    for c in costs:
        lines.append(
            f"{c.exit:>4}  {c.macs / 1e6:>15.2f}M  {c.macs_cumulative / 1e6:>11.2f}M  {c.macs_lazy / 1e6:>8.2f}M  "
            f"{c.macs_deferred / 1e6:>9.2f}M  {c.fvcore_total / 1e6:>16.2f}M  "
            f"{c.fvcore_total_cumulative / 1e6:>11.2f}M  {c.params / 1e6:>8.3f}M  {c.params_cumulative / 1e6:>11.3f}M"
        )
    return "\n".join(lines)


def costs_as_json(costs: list[ExitCost]) -> list[dict[str, int]]:
    """The CLI's ``--json`` rows: conv+linear MACs, cumulative = as evaluated (the paper's convention), lazy = what
    a sample leaving there pays with deferred parts left out, deferred = what a sample going on pays on top."""
    return [
        {
            "exit": c.exit,
            "macs": c.macs,
            "macs_cumulative": c.macs_cumulative,
            "macs_lazy": c.macs_lazy,
            "macs_deferred": c.macs_deferred,
            "params": c.params,
            "params_cumulative": c.params_cumulative,
        }
        for c in costs
    ]


def format_gated_costs(costs: GatedCosts) -> str:
    """A gated network's parts in MACs (conv+linear, batch 1, deploy model)."""
    executed = sum(costs.blocks)
    return "\n".join(
        [
            "MACs = multiply-accumulates (conv+linear), batch 1, deploy model (training-only heads pruned)",
            f"always run (stem, first block, classifier): {costs.always / 1e6:.2f}M",
            f"all gates: {costs.gates / 1e6:.3f}M",
            f"gated blocks, {len(costs.blocks)}: {executed / 1e6:.2f}M when all run "
            f"(each {min(costs.blocks) / 1e6:.2f}M to {max(costs.blocks) / 1e6:.2f}M); "
            f"skipped projection shortcuts {sum(costs.shortcuts) / 1e6:.3f}M",
            f"per sample: {(costs.always + costs.gates + sum(costs.shortcuts)) / 1e6:.2f}M (all skipped) to "
            f"{costs.full / 1e6:.2f}M (all run); the same network without gates: {costs.plain / 1e6:.2f}M",
        ]
    )
