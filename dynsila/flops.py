"""``python -m dynsila.flops CONFIG [overrides] [--json]``: per-exit MACs and parameters of the model a config
describes, counted by :mod:`dynsila.budget.flops` on the model :mod:`dynsila.runs.rundir` builds.

The command line lives here rather than in ``dynsila.budget.flops`` because it builds a model from a config, which is
the run directory's job, a layer above the counting."""

from __future__ import annotations

import dataclasses
import json
import sys

from torch import nn

from dynsila.budget.flops import costs_as_json, exit_costs, format_cost_table, format_gated_costs, gated_costs
from dynsila.cli import USER_ERRORS, OneLineParser, fail
from dynsila.config import load_config
from dynsila.methods.technique import deploy_network, prepare_network
from dynsila.runs.rundir import build_model, input_shape


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m dynsila.flops", description="Per-exit MACs and parameters of the model a config describes."
    )
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_blocks=3")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.config, args.overrides)
        bare = build_model(cfg)
        model: nn.Module = prepare_network(bare, cfg)  # as trained; counted after pruning
        if deploy_network(model).gated_body() is not None:
            gated = gated_costs(model, input_shape(cfg))
            print(json.dumps(dataclasses.asdict(gated), indent=1) if args.json else format_gated_costs(gated))
            return 0
        costs = exit_costs(model, input_shape(cfg))
    except USER_ERRORS as e:
        return fail(e)
    print(json.dumps(costs_as_json(costs), indent=1) if args.json else format_cost_table(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
