"""Typed run configuration: YAML file + dotted command-line overrides, validated before anything runs.

The schema is the dataclasses below; the ``model:`` section is checked against the registered constructor's
signature (``models.model_parameters``), so a model's keyword arguments are its config keys. Every error is one
line naming the key: an unknown key with the nearest valid one, a wrong type with the expected type.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch
import yaml

from dynsila import models
from dynsila.errors import ConfigError

log = logging.getLogger(__name__)


def bounded(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Any:
    """A numeric config field with its valid range [low, high] (or (low, high] with ``low_open``), checked with
    the config: a value outside stops before anything runs, naming key, value and range. None = unbounded."""
    metadata = {"range": (low, high, low_open)}
    if isinstance(default, list):  # a mutable default needs a factory; every item is checked
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    name: Literal["digits", "cifar10", "cifar100", "npz", "imagefolder"] = "digits"
    root: str = "data"  # folder holding the dataset (the .npz file itself for ``npz``)
    image_size: int | None = bounded(None, 1)  # None: the dataset's usual size (digits 32, CIFAR 32, ImageNet 224)
    num_classes: int | None = bounded(None, 1)  # None: known for named datasets, read from the data (npz, folder)
    # held out of train for model selection and threshold fitting: a fraction, or a count if >= 1 (unused when
    # the data brings its own validation split: an npz file with x_val and x_test)
    val_size: float = bounded(0.1, 0.0)
    split_seed: int = bounded(0, 0)  # fixes the train/val(/test) split independently of the run's seed
    # a file listing the training-set indices of the validation split (instead of a draw with split_seed): a
    # permutation of the whole training set (the MSDNet authors' index.pth) keeps its last val_size entries
    val_indices: str | None = None
    # per-channel input normalisation; None: the dataset's usual statistics (a published network's own, e.g.
    # SkipNet's CIFAR std 0.2023 0.1994 0.2010, must be matched for its weights to give its outputs)
    # (a run's config.yaml holds the values it trained with, so a run reads its own normalisation back)
    mean: list[float] | None = bounded(None)
    std: list[float] | None = bounded(None, 0.0, low_open=True)
    # one name per class, in label order; None: the dataset's own where known (digits, CIFAR-10, folder names)
    class_names: list[str] | None = None
    batch_size: int = bounded(64, 1)
    eval_batch_size: int = bounded(256, 1)
    num_workers: int = bounded(0, 0)
    augment: Literal["auto", "none", "crop", "crop_flip", "rrc_flip"] = "auto"
    # training images held on the training device as uint8 and augmented there in batches (in-memory datasets)
    on_device: bool = False


@dataclass
class TrainConfig:
    epochs: int = bounded(10, 1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = bounded(0.1, 0.0, low_open=True)
    momentum: float = bounded(0.9, 0.0, 1.0)
    nesterov: bool = False
    weight_decay: float = bounded(1e-4, 0.0)
    # which parameters weight decay reaches: all (the MSDNet / SkipNet authors' SGD) or weights (not norms, biases,
    # nor the tokens and position embeddings a module names in its no_weight_decay(): the usual ViT recipe)
    decay: Literal["all", "weights"] = "all"
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[float] = bounded([0.5, 0.75], 0.0, 1.0)  # fractions of training
    gamma: float = bounded(0.1, 0.0, 1.0, low_open=True)
    warmup_epochs: float = bounded(0.0, 0.0)
    # a constant lr for the first steps, then the schedule: SkipNet-110's 400 iterations at 0.01 (0 = off)
    constant_warmup_steps: int = bounded(0, 0)
    constant_warmup_lr: float = bounded(0.01, 0.0, low_open=True)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 (or fp16 + GradScaler) on CUDA, off on CPU
    channels_last: bool = False  # NHWC memory layout for model and inputs
    compile: bool = False  # torch.compile the step's forward, loss terms and statistics (not the optimizer)
    sync_bn: bool = False  # SyncBatchNorm across DDP ranks (CUDA only)
    accumulate_steps: int = bounded(1, 1)  # split each (global) batch into this many micro-batches, one step
    init_from: str | None = None  # a finished run directory whose deploy weights initialise the model (SP -> HRL)
    log_every: int = bounded(20, 1)  # steps between progress lines
    eval_test_every_epoch: bool = True  # test top-1 per epoch in metrics.jsonl (logged only, never used to select)
    # TensorBoard event files in runs/<name>/tensorboard (from the metrics.jsonl rows; needs the tensorboard package)
    tensorboard: bool = True


@dataclass
class LossConfig:
    exit_weights: list[float] | None = bounded(None, 0.0)  # w_k per exit; None: all 1
    ce_weight: float = bounded(1.0, 0.0)  # scales the exit cross-entropy (SiLa joint_only: the joint CE in its place)


@dataclass(frozen=True)
class TechniqueSection:
    """Config keys a training technique brings: its dataclass ``schema`` and the YAML section they live in, its own
    (``sila:``) or one every run has (``loss:``, ``train:``, whose keys it then adds to)."""

    owner: str  # the technique's name
    section: str
    schema: type
    active: Callable[[Config], bool] | None = field(default=None, compare=False)  # whether a run uses it


# every technique's keys, in registration order (the order they appear in config.yaml): filled by the techniques
# themselves (``dynsila.methods.technique.register_technique``) and by ``discover_techniques``
TECHNIQUE_SECTIONS: list[TechniqueSection] = []
CORE_SECTIONS = ("data", "train", "loss")  # the sections every run has (besides the top-level keys and model)
ENTRY_POINTS = "dynsila.techniques"  # where installed packages name the modules that register their techniques
_discovered = False


def register_section(entry: TechniqueSection) -> None:
    """Add a technique's keys to the schema; a key or section that exists already is refused."""
    if not (dataclasses.is_dataclass(entry.schema) and isinstance(entry.schema, type)):
        raise TypeError(f"technique {entry.owner!r}: its settings must be a dataclass, not {entry.schema!r}")
    if entry.section in CORE_SECTIONS:
        clash = set(keys_of(entry.section)) & {f.name for f in dataclasses.fields(entry.schema)}
    else:
        clash = {entry.section} & {*(f.name for f in dataclasses.fields(Config)), *technique_sections()}
    if clash:
        raise ValueError(f"technique {entry.owner!r}: config key(s) {sorted(clash)} in '{entry.section}' exist already")
    TECHNIQUE_SECTIONS.append(entry)


def technique_sections() -> list[str]:
    """The top-level sections the techniques bring (``sila``, ``dml``, ...)."""
    return [s.section for s in TECHNIQUE_SECTIONS if s.section not in CORE_SECTIONS]


def keys_of(section: str) -> list[str]:
    """Every key of a section: the core dataclass's, then those the techniques add to it."""
    core = {"data": DataConfig, "train": TrainConfig, "loss": LossConfig}.get(section)
    own = [f.name for f in dataclasses.fields(core)] if core else []
    return own + [f.name for s in TECHNIQUE_SECTIONS if s.section == section for f in dataclasses.fields(s.schema)]


def discover_techniques() -> None:
    """Import, once, every module an installed package names under the ``dynsila.techniques`` entry point (the
    built-in techniques among them): importing a technique module registers it, config keys included."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINTS):
        entry_point.load()


def import_technique_file(path: str) -> str:
    """Import, once, a Python file that registers training techniques (``register_technique``: config keys
    included); returns its absolute path, which a run's config records so that the run can be rebuilt."""
    file = Path(path).expanduser().resolve()
    if file.suffix != ".py" or not file.is_file():
        raise ConfigError(
            f"technique file {path} not found or not a .py file; pass a Python file that calls register_technique"
        )
    name = f"dynsila_technique_{file.stem}_{hashlib.sha256(str(file).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return str(file)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None  # a .py file always has a source loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any failure is reported as one line naming the file
        del sys.modules[name]
        raise ConfigError(f"technique file {file} failed to import ({type(e).__name__}: {e}); fix the file") from None
    return str(file)


def import_technique_files(paths: Any) -> list[str]:
    """The ``techniques:`` key: each file imported (``import_technique_file``), as absolute paths."""
    if paths is None:
        return []
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ConfigError(f"config key 'techniques' expects a list of .py file paths, got {paths!r}")
    return list(dict.fromkeys(import_technique_file(p) for p in paths))


def default_settings() -> dict[type, Any]:
    discover_techniques()
    return {s.schema: s.schema() for s in TECHNIQUE_SECTIONS}


@dataclass
class Config:
    name: str = "run"
    seed: int = bounded(0, 0)
    out_dir: str = "runs"
    resume: bool = False
    techniques: list[str] = field(default_factory=list)  # Python files that register training techniques
    model: dict[str, Any] = field(default_factory=lambda: {"name": "msdnet"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # each technique's settings, by its schema: read with ``section``; in YAML where the technique's section says
    settings: dict[type, Any] = field(default_factory=default_settings, metadata={"yaml": False})

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def model_kwargs(self) -> dict[str, Any]:
        """The ``model:`` section minus ``name``: keyword arguments for ``models.build``."""
        return {k: v for k, v in self.model.items() if k != "name"}

    def section(self, schema: type[S]) -> S:
        """A technique's settings (``cfg.section(SiLaConfig).weight``)."""
        return cast(S, self.settings[schema])

    def with_section(self, value: Any) -> Config:
        """A copy of this config whose settings of ``type(value)`` are ``value`` (the rest shared)."""
        return dataclasses.replace(self, settings={**self.settings, type(value): value})

    def __getattr__(self, name: str) -> Any:
        """A technique's own section by its YAML name, as the YAML reads: ``cfg.sila.enabled``."""
        if name != "settings":
            for entry in TECHNIQUE_SECTIONS:
                if entry.section == name and entry.schema in self.__dict__.get("settings", {}):
                    return self.__dict__["settings"][entry.schema]
        raise AttributeError(f"'Config' object has no attribute {name!r}")


S = TypeVar("S")


# --- loading ------------------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), techniques: Sequence[str] = ()
) -> Config:
    """Read a YAML config (or start from defaults), apply ``key.sub=value`` overrides, add the ``techniques``
    files (``--technique``) to the config's own, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found; pass the path of a YAML file such as configs/msdnet_sila.yaml"
            )
        raw = parse_yaml(path.read_text(), str(path))
        if not raw:  # empty, comments only, or {}: it would train a default network for hours
            raise ConfigError(
                f"config file {path} is empty; copy a preset such as configs/msdnet_sila.yaml and edit it"
            )
        raw.setdefault("name", path.stem)
    for item in overrides:
        apply_override(raw, item)
    if techniques:
        listed = raw.get("techniques") or []
        raw["techniques"] = [*listed, *techniques] if isinstance(listed, list) else listed  # a bad value: told below
    return config_from_dict(raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``2``, ``false``, ``[1,2]``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=2)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def config_from_dict(raw: dict[str, Any], recorded: bool = False) -> Config:
    """A validated config from a raw mapping. ``recorded``: the mapping is a run's own record (its config.yaml, a
    deploy file's metadata), where a section of a technique no longer installed is tolerated when disabled."""
    discover_techniques()
    raw = {**raw, "techniques": import_technique_files(raw.get("techniques"))}  # before their keys are read
    if recorded:
        raw = drop_uninstalled_sections(raw)
    core, settings = split_technique_keys(raw)
    cfg = _build_dataclass(Config, core, prefix="")
    cfg.settings = settings
    if (problem := name_problem(cfg.name)) is not None:
        raise ConfigError(f"config key 'name' is {cfg.name!r}: {problem}; a run name is a folder name, e.g. sila_seed0")
    cfg.model = validate_model_section(cfg.model, "model")
    for value in settings.values():  # a technique's own checks of its keys against the rest (DML's model sections)
        if callable(check := getattr(value, "check", None)):
            check(cfg)
    _check_exit_weights(cfg)
    return cfg


def drop_uninstalled_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without the sections of techniques that are not installed, when the run did not use them (their
    ``enabled`` is false or absent), each with a logged warning; one line when the run used one."""
    known = {f.name for f in dataclasses.fields(Config)} | set(technique_sections())
    kept = {}
    for key, value in raw.items():
        if key in known or not isinstance(value, dict):
            kept[key] = value
        elif value.get("enabled", False) is not False:
            raise ConfigError(
                f"the run used technique section '{key}' (enabled: true), but no installed package registers it "
                f"(entry points '{ENTRY_POINTS}'); install the package that provides technique '{key}'"
            )
        else:
            log.warning("config section '%s' belongs to a technique that is not installed; the run did not use it, "
                        "so it is ignored", key)  # fmt: skip
    return kept


def split_technique_keys(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[type, Any]]:
    """(the raw config without the techniques' keys, each technique's settings built and checked from its keys)."""
    core = {k: dict(v) if k in CORE_SECTIONS and isinstance(v, dict) else v for k, v in raw.items()}
    settings: dict[type, Any] = {}
    for entry in TECHNIQUE_SECTIONS:
        names = {f.name for f in dataclasses.fields(entry.schema)}
        if entry.section in CORE_SECTIONS:
            section = core.get(entry.section)
            mine = {k: section.pop(k) for k in list(section) if k in names} if isinstance(section, dict) else {}
        else:
            mine = core.pop(entry.section, {})
        settings[entry.schema] = _build_dataclass(entry.schema, mine, f"{entry.section}.")
    return core, settings


def trained_model_sections(cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    """(where, model section) of every network the run trains: ``model``, unless a technique trains others
    (its settings' ``model_sections``, e.g. one per DML peer)."""
    for value in cfg.settings.values():
        if callable(sections := getattr(value, "model_sections", None)) and (found := sections(cfg)):
            return cast(list[tuple[str, dict[str, Any]]], found)
    return [("model", cfg.model)]


def config_to_dict(cfg: Config, every_section: bool = False) -> dict[str, Any]:
    """The config as YAML reads it: the core sections, and the keys of each technique the run uses (active, or set
    away from its defaults). A technique the run does not use is left out unless ``every_section``: a run's
    config.yaml then names only what it used (read back, it is at its defaults, which is what the run had), and
    stays loadable when an unused technique's package is gone."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("yaml", True):
            value = getattr(cfg, f.name)
            is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
            out[f.name] = dataclasses.asdict(value) if is_section else copy.deepcopy(value)
    for entry in sorted(TECHNIQUE_SECTIONS, key=lambda e: e.owner):  # the same text whatever the import order
        value = cfg.settings.get(entry.schema) or entry.schema()
        active = entry.active is not None and entry.schema in cfg.settings and entry.active(cfg)
        used = active or value != entry.schema() or getattr(value, "enabled", False) is True
        if every_section or used:
            out.setdefault(entry.section, {}).update(dataclasses.asdict(value))
    return out


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_yaml(text: str, source: str = "the config") -> Config:
    """A config from YAML text we may not have written (a run's config.yaml, a deploy file's metadata): parsed
    and validated exactly as a config file is, so a tampered name, key or value stops with one line. A section of
    a technique that is not installed is ignored (with a warning) when the run did not use it."""
    return config_from_dict(parse_yaml(text, source), recorded=True)


class DuplicateKeyError(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # ``<<: *anchor`` merges are YAML's own way of repeating keys; keys are scalars here
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"key '{key}' appears twice (lines {seen[key]} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """``yaml.safe_load`` of a config's text (empty: {}); one line when it is not YAML or not a mapping."""
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader that refuses repeated keys)
    except DuplicateKeyError as e:
        raise ConfigError(f"{source}: {e}; keep one of them (a second one would silently win)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of config sections, not a {type(raw).__name__}")
    return raw


# --- validation ---------------------------------------------------------------------------------------------


def name_problem(text: str) -> str | None:
    """Why ``text`` cannot name a folder inside another (a run in out_dir, a result in benchmarks/results), or
    None. A name joined as a path must not climb out (``..``), go elsewhere (``/``, ``\\``) or hide control
    characters; anything else a file system accepts is kept (spaces, dots, unicode)."""
    if text.strip() in ("", ".", ".."):
        return "it is empty or a dot path"
    if any(c in text for c in "/\\") or any(ord(c) < 32 for c in text):
        return "it contains a path separator or a control character"
    if len(text.encode()) > 255:
        return "it is longer than a file name may be (255 bytes)"
    return None


def _unknown_key(key: str, valid: Sequence[str], prefix: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {type(raw).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    names = list(fields)
    for key in raw:
        if key not in names:
            raise _unknown_key(str(key), names + elsewhere(cls, prefix), prefix)
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build_dataclass(hint, raw[name], f"{prefix}{name}.")
        else:
            values[name] = check_type(raw[name], hint, f"{prefix}{name}")
            if "range" in fields[name].metadata:
                check_range(values[name], fields[name].metadata["range"], f"{prefix}{name}")
    return cls(**values)


def elsewhere(cls: type, prefix: str) -> list[str]:
    """Keys valid at this place that another dataclass holds: the techniques' sections at the top level, their keys
    in a core section (so that an unknown key's suggestion can name them)."""
    if cls is Config:
        return technique_sections()
    section = prefix.rstrip(".")
    return [k for k in keys_of(section) if k not in {f.name for f in dataclasses.fields(cls)}]


def check_range(value: Any, valid: tuple[float | None, float | None, bool], key: str) -> None:
    """Raise naming key, value and range when a number (or any number of a list) lies outside ``valid``."""
    low, high, low_open = valid
    for number in value if isinstance(value, list) else [value]:
        if number is None:
            continue
        below = low is not None and (number <= low if low_open else number < low)
        if below or (high is not None and number > high):
            left = "(" if low_open else "["
            shown = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise ConfigError(f"config key '{key}' must lie in {shown}, got {number!r}")


def _check_exit_weights(cfg: Config) -> None:
    """One weight per exit, for every network the run trains: checked with the config (before anything is
    written), only when ``loss.exit_weights`` is set, by building the network on the meta device (no memory, no
    initialisation; a few tenths of a second for the largest preset)."""
    weights = cfg.loss.exit_weights
    if weights is None:
        return
    for where, section in trained_model_sections(cfg):
        exits = count_exits(section, where, cfg.data.num_classes or 2)
        if len(weights) != exits:
            raise ConfigError(
                f"config key 'loss.exit_weights' has {len(weights)} entries but {where} ({section['name']}) has "
                f"{exits} exits; give one weight per exit, or null for all 1"
            )


def count_exits(section: dict[str, Any], where: str, num_classes: int) -> int:
    """Exits of the network a validated model section builds (the class count does not change it)."""
    kwargs = {k: v for k, v in section.items() if k != "name"}
    if "pretrained" in kwargs:
        kwargs["pretrained"] = False  # counting needs no weights (and must not look for them)
    try:
        with torch.device("meta"):
            model = models.build(section["name"], num_classes=num_classes, **kwargs)
    except ValueError as e:  # bad values in the model section
        raise ConfigError(f"{where}.name={section['name']}: {e}") from None
    return int(getattr(model, "num_exits", 1))


def validate_model_section(section: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ConfigError(f"config section '{where}' must be a mapping, got {type(section).__name__}")
    name = section.get("name", "msdnet")
    if name not in models.list_models():
        near = difflib.get_close_matches(str(name), models.list_models(), n=1, cutoff=0.0)
        raise ConfigError(
            f"unknown model '{name}' in {where}.name; did you mean '{near[0]}'? "
            f"(registered: {', '.join(models.list_models())})"
        )
    params = models.model_parameters(name)
    params.pop("num_classes", None)  # comes from the data
    resolved: dict[str, Any] = {"name": name}
    hints = typing.get_type_hints(models.model_constructor(name))
    for key in section:
        if key != "name" and key not in params:
            raise _unknown_key(str(key), ["name", *params], f"{where}.")
    for key, param in params.items():
        if key in section:
            resolved[key] = check_type(section[key], hints.get(key, Any), f"{where}.{key}")
        elif param.default is not param.empty:
            resolved[key] = list(param.default) if isinstance(param.default, tuple) else param.default
        else:
            raise ConfigError(f"config key '{where}.{key}' is required for model '{name}'")
    return resolved


def type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def check_type(value: Any, hint: Any, key: str) -> Any:
    """Return ``value`` (ints widened to float where a float is expected) or raise naming key and type."""
    ok, converted = _match(value, hint)
    if not ok:
        raise ConfigError(f"config key '{key}' expects {type_name(hint)}, got {value!r}")
    return converted


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            ok, converted = _match(value, arm)
            if ok:
                return True, converted
        return False, value
    if origin in (list, Sequence, tuple):
        if not isinstance(value, list | tuple):
            return False, value
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        items = [_match(v, item_hint) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return True, float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        return numeric, float(value) if numeric else value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, hint), value
