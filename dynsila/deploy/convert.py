"""Bring the MSDNet or SkipNet authors' checkpoint into dynsila, or dynsila weights back: ``python -m dynsila.convert``.

    python -m dynsila.convert msdnet CHECKPOINT --config CONFIG --out RUN_DIR [--evaluate]
    python -m dynsila.convert skipnet RUN_DIR --to authors --out CHECKPOINT

The first writes a run directory every other command accepts (``config.yaml``, ``deploy.safetensors``, and
``eval.json`` with ``--evaluate``), so a published network is evaluated, run and exported like one trained here.
The second writes dynsila weights in the authors' layout (``{"state_dict": ...}`` with DataParallel's ``module.``
prefix, as their scripts load it), so a network trained here can be checked with their scripts.

Why so strict: a conversion that silently drops or zero-fills a weight gives a network that runs and is wrong.
Every checkpoint key is mapped or named as unused; every dynsila weight is filled or the conversion stops naming
what is missing; a shape that differs stops it. The files are pickles: they are loaded with
``torch.load(weights_only=True)``. The authors' scripts save dicts of strings, numbers, tensors and optimizer
state, which that load's own allow-list covers, so nothing else is allow-listed: any other object is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import pickle
import re
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynsila.config import Config, config_to_yaml, load_config
from dynsila.errors import CheckpointError, ConfigError, DynsilaError
from dynsila.models.msdnet import MSDNet
from dynsila.models.skipnet import SkipNet
from dynsila.runs.authors_keys import BN_COUNTER, KeyTable, msdnet_table, skipnet_table
from dynsila.runs.checkpoint import atomic_write, atomic_write_text, load_weights, save_deploy
from dynsila.runs.rundir import CONFIG, DEPLOY, build_model, load_deploy_model

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    label: str
    model_class: type[nn.Module]
    signature: re.Pattern[str]  # a key only this family's checkpoints hold


FAMILIES = {
    "msdnet": Family("MSDNet", MSDNet, re.compile(r"(blocks\.\d+\.\d+\.layers\.|classifier\.\d+\.linear\.)")),
    "skipnet": Family("SkipNet", SkipNet, re.compile(r"group\d+_(layer|gate|ds)\d+\.")),
}


def key_table(model: nn.Module) -> KeyTable:
    if isinstance(model, MSDNet):
        return msdnet_table(model)
    if isinstance(model, SkipNet):
        return skipnet_table(model)
    raise ConfigError(f"the config builds {type(model).__name__}; only msdnet and skipnet have an authors' layout")


# --- reading the authors' file ----------------------------------------------------------------------------------


def load_authors_state(path: Path) -> Tensors:
    """The state dict inside an authors' checkpoint, every DataParallel ``module.`` component removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; download the published .pth.tar file and pass its path")
    checkpoint = _weights_only_load(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path} holds no state dict of tensors (neither a 'state_dict' entry nor tensors at the top); "
            "pass the authors' saved checkpoint"
        )
    stripped: Tensors = {}
    for key, tensor in state.items():
        name = ".".join(part for part in str(key).split(".") if part != "module")
        if name in stripped:
            raise CheckpointError(f"{path} holds {name} twice (with and without a 'module.' prefix); re-save one copy")
        stripped[name] = tensor
    return stripped


def _weights_only_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "a Python object"
        raise CheckpointError(
            f"{path} holds {what}, which a weights-only load refuses (only tensors, numbers, strings and "
            "containers are allowed); re-save its state_dict alone with torch.save"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:80]}); download it again"
        ) from None


# --- the mapping -------------------------------------------------------------------------------------------------


@dataclass
class Conversion:
    state: Tensors  # dynsila key -> tensor, ready for load_state_dict
    aliases: list[str]  # authors' keys that duplicate a mapped one (checked equal)
    unused: list[str]  # authors' keys nothing reads
    filled: list[str]  # dynsila batch-norm counters the checkpoint lacked (set to 0)

    def summary(self) -> str:
        parts = [f"mapped {len(self.state) - len(self.filled)} tensors"]
        if self.aliases:
            parts.append(f"{len(self.aliases)} duplicates of mapped tensors checked equal (e.g. {self.aliases[0]})")
        parts.append(f"unused: {', '.join(self.unused)} (read by nothing)" if self.unused else "unused: none")
        if self.filled:
            parts.append(f"{len(self.filled)} batch-norm {BN_COUNTER} counters absent (older PyTorch), set to 0")
        return "; ".join(parts)


def check_family(family: str, authors: Tensors, source: Path) -> None:
    """Stop with one line when the checkpoint is the other family's."""
    own = FAMILIES[family]
    if any(own.signature.match(k) for k in authors):
        return
    for name, other in FAMILIES.items():
        if name != family and any(other.signature.match(k) for k in authors):
            raise CheckpointError(
                f"{source} holds {other.label} weights, not {own.label} ones; run "
                f"python -m dynsila.convert {name} with a {name} config"
            )


def _few(keys: list[str]) -> str:
    return f"{len(keys)} (e.g. {', '.join(keys[:3])})"


def to_dynsila(family: str, authors: Tensors, model: nn.Module, source: Path) -> Conversion:
    """Map an authors' state dict onto ``model`` (any device, meta included): one-line errors for keys that have
    no place, weights the checkpoint lacks, and shapes that differ."""
    check_family(family, authors, source)
    table, own = key_table(model), model.state_dict()
    known = set(table.from_authors) | set(table.aliases) | set(table.unused)
    unknown = [k for k in authors if k not in known]
    if unknown:
        raise CheckpointError(
            f"{source}: keys with no place in the model the config builds: {_few(unknown)}; pass the config "
            "of the published network (model depth, steps, widths, gate, stem, classes)"
        )
    missing = [f"{a} ({o})" for o, a in table.to_authors.items() if a not in authors and BN_COUNTER not in o]
    if missing:
        raise CheckpointError(
            f"{source} lacks weights the model needs: {_few(missing)}; pass the config of the published network"
        )
    state: Tensors = {}
    filled: list[str] = []
    for ours, theirs in table.to_authors.items():
        if theirs not in authors:
            state[ours] = torch.zeros_like(own[ours])
            filled.append(ours)
            continue
        state[ours] = _fitted(authors[theirs], own[ours], theirs, ours in table.reshaped, source)
    for alias, primary in table.aliases.items():
        if alias in authors and not torch.equal(authors[alias], authors[primary]):
            raise CheckpointError(f"{source}: {alias} differs from {primary}, which it duplicates; the file is damaged")
    return Conversion(
        state, sorted(set(authors) & set(table.aliases)), sorted(set(authors) & set(table.unused)), filled
    )


def _fitted(tensor: torch.Tensor, own: torch.Tensor, name: str, reshaped: bool, source: Path) -> torch.Tensor:
    expected = (*own.shape, 1, 1) if reshaped else tuple(own.shape)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"{source}: {name} has shape {tuple(tensor.shape)} where the model needs {expected}; pass the config of "
            "the published network (model depth, steps, widths, gate, stem, classes)"
        )
    return tensor.reshape(own.shape).to(own.dtype)


def to_authors(model: nn.Module, state: Tensors | None = None) -> Tensors:
    """``model``'s weights (or ``state``, keyed as ``model``'s) under the authors' keys, with their duplicates,
    their 1x1-conv layout and their unused gate (zeros, batch-norm variances one: nothing reads it)."""
    table, own = key_table(model), state if state is not None else model.state_dict()
    out = {
        theirs: own[ours].reshape(*own[ours].shape, 1, 1) if ours in table.reshaped else own[ours]
        for ours, theirs in table.to_authors.items()
    }
    for alias, primary in table.aliases.items():
        out[alias] = out[primary]
    for name, like in table.unused.items():
        out[name] = torch.ones_like(own[like]) if name.endswith("running_var") else torch.zeros_like(own[like])
    return out


# --- the commands ------------------------------------------------------------------------------------------------


def convert_checkpoint(
    family: str, checkpoint: Path, config: Path, out: Path, overrides: Sequence[str] = (), force: bool = False
) -> tuple[Config, Conversion]:
    """Authors' checkpoint -> run directory ``out`` (config.yaml, deploy.safetensors)."""
    out = Path(out)
    cfg = load_config(config, list(overrides))
    cfg = dataclasses.replace(cfg, name=out.name, out_dir=str(out.parent))
    if cfg.model["name"] != family:
        raise ConfigError(f"{config} builds model.name={cfg.model['name']}, not {family}; pass a {family} config")
    if (out / DEPLOY).exists() and not force:
        raise DynsilaError(f"{out / DEPLOY} exists; choose another --out or pass --force to replace it")
    model = build_model(cfg).eval()
    conversion = to_dynsila(family, load_authors_state(checkpoint), model, Path(checkpoint))
    load_weights(model, conversion.state, checkpoint)
    text = config_to_yaml(cfg)
    atomic_write_text(out / CONFIG, text)
    save_deploy(out / DEPLOY, model, text)
    return cfg, conversion


def write_authors_checkpoint(family: str, run_dir: Path, out: Path) -> None:
    """A run directory's deploy weights -> the authors' checkpoint layout at ``out``."""
    model, cfg = load_deploy_model(run_dir)
    if cfg.model["name"] != family:
        raise ConfigError(f"{run_dir} holds a {cfg.model['name']} model, not {family}; pass the matching family")
    state = {f"module.{k}": v.contiguous() for k, v in to_authors(model).items()}  # their scripts wrap DataParallel
    # the bookkeeping their test scripts read besides the weights; no accuracy was measured here
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "epoch": 0, "iter": 0, "best_prec1": float("nan")}, buffer)
    atomic_write(Path(out), lambda f: f.write(buffer.getbuffer()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynsila.convert", description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("source", type=Path, help="the authors' checkpoint (or, with --to authors, a run directory)")
    parser.add_argument("--config", type=Path, help="YAML config of the published network, e.g. a preset in configs/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/imagenet")
    parser.add_argument("--out", type=Path, required=True, help="run directory (or, with --to authors, a file)")
    parser.add_argument("--to", choices=("dynsila", "authors"), default="dynsila")
    parser.add_argument("--evaluate", action="store_true", help="then evaluate on the config's data (eval.json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--force", action="store_true", help="replace deploy weights already in --out")
    args = parser.parse_intermixed_args(argv)  # overrides may come after --config or --out
    try:
        _run(args)
    except DynsilaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> None:
    if args.to == "authors":
        write_authors_checkpoint(args.family, args.source, args.out)
        print(f"wrote {args.out} (the authors' layout; load it with their scripts)")
        return
    if args.config is None:
        raise ConfigError("--config is required to convert a checkpoint: the preset of the published network")
    _, conversion = convert_checkpoint(args.family, args.source, args.config, args.out, args.overrides, args.force)
    print(conversion.summary())
    print(f"wrote {args.out / CONFIG} and {args.out / DEPLOY}")
    if args.evaluate:
        from dynsila.evaluation.evaluate import EVAL_FILE, evaluate_run, format_report

        print(format_report(evaluate_run(args.out, device=args.device)))
        print(f"wrote {args.out / EVAL_FILE}")


if __name__ == "__main__":
    sys.exit(main())
