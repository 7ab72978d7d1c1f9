"""The run directory: what a run writes, and how the evaluator and other tools rebuild a model from it.

runs/<name>/config.yaml          resolved config (rebuilds the model)
runs/<name>/metrics.jsonl        one line per epoch
runs/<name>/last.pt, best.pt     checkpoints (weights_only-loadable dicts)
runs/<name>/deploy.safetensors   pruned deploy weights, config in the metadata
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynsila import models
from dynsila.runs.checkpoint import atomic_write_text, load_weights, read_deploy
from dynsila.config import Config, config_from_yaml
from dynsila.data import image_size_of, num_classes_of
from dynsila.errors import ConfigError, DynsilaError
from dynsila.budget.flops import gated_block_macs
from dynsila.models import MultiExitNetwork, PretrainedWeightsUnavailable

CONFIG, METRICS, LAST, BEST, DEPLOY = "config.yaml", "metrics.jsonl", "last.pt", "best.pt", "deploy.safetensors"


def build_model(cfg: Config, num_classes: int | None = None) -> MultiExitNetwork:
    """The bare network the config describes (no SiLa heads)."""
    num_classes = num_classes or num_classes_of(cfg.data)
    if num_classes is None:
        raise ConfigError(
            f"the number of classes of data.name={cfg.data.name} is unknown without the data; set data.num_classes"
        )
    try:
        model = models.build(cfg.model["name"], num_classes=num_classes, **cfg.model_kwargs())
    except (ValueError, PretrainedWeightsUnavailable) as e:  # bad values in the model section
        raise ConfigError(f"model.name={cfg.model['name']}: {e}") from None
    if not isinstance(model, MultiExitNetwork):
        raise TypeError(f"model {cfg.model['name']!r} does not follow the multi-exit protocol (MultiExitNetwork)")
    body = model.gated_body()
    if body is not None and cfg.loss.gate_cost != 0:  # that loss term weighs each gated block by its MACs
        body.set_block_costs(gated_block_macs(model, input_shape(cfg)))
    return model


def input_shape(cfg: Config) -> tuple[int, int, int]:
    size = image_size_of(cfg.data)
    return (cfg.model.get("in_chans", 3), size, size)


def read_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DynsilaError(f"{run_dir} is not a dynsila run directory (no {CONFIG}); pass runs/<name>")
    return config_from_yaml(path.read_text(), str(path))


def load_deploy_model(run_dir: Path) -> tuple[MultiExitNetwork, Config]:
    """The pruned model of a finished run, in eval mode, with the config that built it."""
    run_dir = Path(run_dir)
    if not (run_dir / DEPLOY).exists() and (run_dir / "peer0" / DEPLOY).exists():
        peers = ", ".join(str(p) for p in sorted(run_dir.glob("peer*")))
        raise DynsilaError(f"{run_dir} is a DML run with one deploy model per peer; pass one of: {peers}")
    state, config_yaml = read_deploy(run_dir / DEPLOY)
    cfg = config_from_yaml(config_yaml, f"the config in {run_dir / DEPLOY}'s metadata")
    model = build_model(cfg)  # the saved config has data.num_classes resolved
    load_weights(model, state, Path(run_dir) / DEPLOY)
    return model.eval(), cfg


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DynsilaError(f"{path} line {number} is not JSON; restore the file or delete the line") from None
    return rows


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
