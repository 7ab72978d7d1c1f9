"""The run directory: what a run writes, and how the evaluator and other tools rebuild a model from it.

runs/<name>/config.yaml          resolved config (rebuilds the model)
runs/<name>/metrics.jsonl        one line per epoch
runs/<name>/last.pt, best.pt     checkpoints (weights_only-loadable dicts)
runs/<name>/deploy.safetensors   pruned deploy weights, config in the metadata
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from torch import nn

from dynsila import models
from dynsila.runs.checkpoint import atomic_write_text, load_checkpoint, load_weights, read_deploy
from dynsila.config import Config, config_from_yaml, config_to_dict
from dynsila.data import image_size_of, num_classes_of
from dynsila.errors import ConfigError, DynsilaError
from dynsila.budget.flops import gated_block_macs
from dynsila.methods.exit_chain import ChainedExits
from dynsila.methods.technique import deploy_form, network_configs, prepare_network, validate_networks
from dynsila.models import MultiExitNetwork, PretrainedWeightsUnavailable

CONFIG, METRICS, LAST, BEST, DEPLOY = "config.yaml", "metrics.jsonl", "last.pt", "best.pt", "deploy.safetensors"


def build_model(cfg: Config, num_classes: int | None = None) -> MultiExitNetwork:
    """The network the config deploys: the registry's, in every technique's ``deploy_form`` (no training-only parts
    such as SiLa heads; the modules a technique adds to the deploy network, such as IMTA's links, included)."""
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
    if body is not None and needs_block_costs(cfg):
        body.set_block_costs(gated_block_macs(model, input_shape(cfg)))
    return deploy_form(model, cfg)


def build_networks(cfg: Config, num_classes: int, resuming: bool) -> tuple[list[tuple[str | None, Config]], list[nn.Module]]:
    """The networks of a run, as the techniques train them: (folder in the run or None, config) of each, and each
    network built, initialised from ``train.init_from`` unless resuming, prepared by every technique, and checked
    together (``dynsila.methods.technique``)."""
    configs, nets = network_configs(cfg), []
    for folder, net_cfg in configs:
        model = build_model(net_cfg, num_classes)
        if cfg.train.init_from and not resuming:
            load_deploy_weights(model, Path(cfg.train.init_from), folder)
        nets.append(prepare_network(model, cfg))
    validate_networks(nets, cfg)
    return configs, nets


def needs_block_costs(cfg: Config) -> bool:
    """Whether a technique's settings weigh each gated block by its MACs (``needs_block_costs``), which are then
    counted here, where the cost code can be reached."""
    return any(getattr(value, "needs_block_costs", False) for value in cfg.settings.values())


def input_shape(cfg: Config) -> tuple[int, int, int]:
    size = image_size_of(cfg.data)
    return (cfg.model.get("in_chans", 3), size, size)


# keys a resumed run may change: where it is and how it reports, not what it trains (train.epochs extends it)
RESUME_MAY_CHANGE = frozenset({"name", "out_dir", "resume", "train.epochs", "train.log_every", "train.device",
                               "train.eval_test_every_epoch", "train.tensorboard", "data.root", "data.num_workers",
                               "data.eval_batch_size"})
# null in a config: read from the data, and recorded in the run's config.yaml
RESOLVED_FROM_DATA = frozenset({"data.num_classes", "data.image_size", "data.mean", "data.std", "data.class_names"})


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (the model section's keys included)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def refuse_changed_resume(cfg: Config) -> None:
    """One line when ``resume=true`` would continue a run with a key that shapes training changed from the value
    its config.yaml records (the record of how the run began would be lost, and the run would be neither)."""
    path = cfg.run_dir / CONFIG
    if not (cfg.resume and (cfg.run_dir / LAST).is_file() and path.is_file()):
        return
    before, now = flat(config_to_dict(read_run_config(cfg.run_dir))), flat(config_to_dict(cfg))
    for key in sorted(before.keys() | now.keys()):
        old, new = before.get(key), now.get(key)
        if old == new or key in RESUME_MAY_CHANGE or (key in RESOLVED_FROM_DATA and new is None):
            continue
        raise ConfigError(
            f"resume=true would change {key} from {old!r} (how {cfg.run_dir} began) to {new!r}; drop the change "
            f"to resume, or train a new run with name=... (or --force without resume=true to start this one over)"
        )


def read_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise DynsilaError(f"{run_dir} is not a dynsila run directory (no {CONFIG}); pass runs/<name>")
    return config_from_yaml(path.read_text(), str(path))


def load_deploy_model(run_dir: Path) -> tuple[MultiExitNetwork, Config]:
    """The pruned model of a finished run, in eval mode, with the config that built it."""
    run_dir = Path(run_dir)
    refuse_unfinished(run_dir)
    inside = network_dirs(run_dir)
    if not (run_dir / DEPLOY).exists() and inside:
        names = ", ".join(str(p) for p in inside)
        raise DynsilaError(f"{run_dir} trained several networks, each with its own deploy model; pass one of: {names}")
    state, config_yaml = read_deploy(run_dir / DEPLOY)
    cfg = config_from_yaml(config_yaml, f"the config in {run_dir / DEPLOY}'s metadata")
    model = build_model(cfg)  # the saved config has data.num_classes resolved
    load_weights(model, state, Path(run_dir) / DEPLOY)
    return model.eval(), cfg


def refuse_unfinished(run_dir: Path) -> None:
    """One line when ``run_dir`` is a file, or a run that has not finished (no deploy weights yet), rather than
    the generic "not found" that tells a user with a run to train one."""
    if run_dir.is_file():
        raise DynsilaError(f"{run_dir} is a file; pass a run's folder, e.g. {run_dir.parent}, or runs/<name>")
    started = run_dir.is_dir() and any((run_dir / f).is_file() for f in (CONFIG, LAST, METRICS))
    if started and not (run_dir / DEPLOY).exists() and not network_dirs(run_dir):
        epochs = len(read_metrics(run_dir))
        raise DynsilaError(
            f"{run_dir} has not finished training ({epochs} epoch(s) done, no {DEPLOY} yet); let it finish, or "
            "resume it with python -m dynsila.train CONFIG resume=true (its name and out_dir)"
        )


def network_dirs(run_dir: Path) -> list[Path]:
    """The folders of a run that trained several networks side by side, one deploy model each (empty otherwise)."""
    return sorted(p.parent for p in Path(run_dir).glob(f"*/{DEPLOY}"))


def load_deploy_weights(model: nn.Module, source: Path, folder: str | None = None) -> None:
    """Load the deploy weights of a finished run into ``model`` (its network ``folder`` when it trained several):
    e.g. the SP run a SkipNet HRL stage starts from. Training-only parts keep their initialisation, and so do the
    modules that declare ``starts_fresh`` (a later stage's addition, such as ZTW's ensembles), which the source may
    lack. A chained network (``exit_chain``) loads a run of the network it chains into that network."""
    if folder is not None and (source / folder).is_dir():
        source = source / folder
    path = source if source.suffix == ".safetensors" else source / DEPLOY
    state, _ = read_deploy(path)
    fresh = [name for name, module in model.named_modules() if getattr(module, "starts_fresh", False)]
    if isinstance(model, ChainedExits) and set(state) == set(model.inner.state_dict()):
        model = model.inner  # a run of the network inside the chain (IMTA's first stage): its links start fresh
    load_weights(model, state, path, may_lack=fresh)


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


def interrupted_line(cfg: Config | None, config: str, overrides: list[str]) -> str:
    """What Ctrl-C prints: where the run stands (its last finished epoch, where last.pt is) and the command that
    resumes it. Nothing is lost: every file was written atomically, and a resumed run ends as an uninterrupted
    one would."""
    kept = [shlex.quote(a) for a in [config, *overrides] if not a.startswith("resume=")]
    again = " ".join(["python -m dynsila.train", *kept])
    if cfg is None:
        return f"interrupted before training began; nothing was written; rerun: {again}"
    last = cfg.run_dir / LAST
    if not last.is_file():
        return f"interrupted before the first epoch finished; nothing to resume; rerun: {again}"
    try:
        epoch = int(load_checkpoint(last)["epoch"])
    except (DynsilaError, KeyError, TypeError, ValueError):
        epoch = len(read_metrics(cfg.run_dir))
    return (f"interrupted: {cfg.name} has {epoch} of {cfg.train.epochs} epochs in {last}; resume with: "
            f"{again} resume=true")  # fmt: skip
