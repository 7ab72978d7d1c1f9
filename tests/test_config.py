import dataclasses
import time
import typing
from pathlib import Path

import pytest

from dynsila import models
from dynsila.config import (
    TECHNIQUE_SECTIONS,
    Config,
    check_range,
    config_from_yaml,
    config_to_dict,
    config_to_yaml,
    count_exits,
    load_config,
)
from dynsila.errors import ConfigError
from dynsila.runs.rundir import build_model


def test_defaults_and_overrides(tiny_config):
    cfg = load_config(
        tiny_config(),
        ["train.epochs=7", "sila.enabled=false", "model.growth_rate=2", "train.milestones=[0.3,0.6]", "train.lr=1"],
    )
    assert cfg.train.epochs == 7
    assert cfg.sila.enabled is False
    assert cfg.model["growth_rate"] == 2
    assert cfg.train.milestones == [0.3, 0.6]
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int widened to float
    assert cfg.name == "tiny"
    # defaults of the model constructor are filled in, so the saved config is complete
    assert cfg.model["in_chans"] == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=0.1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("sila.wieght=2", "unknown config key 'sila.wieght'; did you mean 'sila.weight'?"),
        ("model.growth=3", "unknown config key 'model.growth'; did you mean 'model.growth_rate'?"),
        ("trian.epochs=3", "unknown config key 'trian'; did you mean 'train'?"),
        ("train.epochs=ten", "config key 'train.epochs' expects int, got 'ten'"),
        ("train.epochs=2.5", "config key 'train.epochs' expects int, got 2.5"),
        ("sila.enabled=3", "config key 'sila.enabled' expects bool, got 3"),
        ("sila.attach=pixels", "config key 'sila.attach' expects 'features' | 'logits', got 'pixels'"),
        ("model.gr_factor=[1,x]", "config key 'model.gr_factor' expects list of int, got [1, 'x']"),
        ("model.name=msdnt", "unknown model 'msdnt' in model.name; did you mean 'msdnet'?"),
        ("train.epochs", "is not of the form key=value"),
    ],
)
def test_bad_keys_and_types_fail_with_one_line(tiny_config, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(), [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_resolved_config_round_trips_and_rebuilds_the_model(tiny_config):
    cfg = load_config(tiny_config())
    again = config_from_yaml(config_to_yaml(cfg))
    assert again == cfg
    a, b = build_model(cfg), build_model(again)
    assert list(a.state_dict()) == list(b.state_dict())
    assert isinstance(a, models.MultiExitNetwork)


def shipped_configs() -> list[Path]:
    return sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.yaml"))


def test_every_shipped_config_validates():
    paths = shipped_configs()
    assert len(paths) >= 6
    for path in paths:
        load_config(path)


def test_sila_and_baseline_twins_differ_only_in_sila_enabled():
    pairs = [
        (p, p.with_name(p.name.replace("_sila.yaml", "_baseline.yaml")))
        for p in shipped_configs()
        if p.name.endswith("_sila.yaml")
    ]
    pairs += [
        (p, p.with_name(p.name.replace("_sila_dml", "_dml")))
        for p in shipped_configs()
        if p.name.endswith("_sila_dml.yaml")
    ]
    checked = 0
    for sila_path, base_path in pairs:
        if not base_path.exists():
            continue
        checked += 1
        a, b = load_config(sila_path), load_config(base_path)
        assert a.sila.enabled and not b.sila.enabled
        b = dataclasses.replace(b, name=a.name).with_section(a.sila)  # run names differ on purpose
        assert a == b, sila_path
    assert checked >= 6


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a float key accepts it all the same
    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=5E-4"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-2\n")
    assert load_config(path).train.lr == 0.02
    with pytest.raises(ConfigError, match="expects int"):
        load_config(None, ["train.epochs=1e3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=-1", "config key 'train.epochs' must lie in [1, inf], got -1"),
        ("train.epochs=0", "config key 'train.epochs' must lie in [1, inf], got 0"),
        ("data.batch_size=0", "config key 'data.batch_size' must lie in [1, inf], got 0"),
        ("train.lr=-1", "config key 'train.lr' must lie in (0.0, inf], got -1.0"),
        ("train.lr=0", "config key 'train.lr' must lie in (0.0, inf], got 0.0"),
        ("sila.weight=-5", "config key 'sila.weight' must lie in [0.0, inf], got -5.0"),
        ("train.momentum=1.5", "config key 'train.momentum' must lie in [0.0, 1.0], got 1.5"),
        ("train.gamma=0", "config key 'train.gamma' must lie in (0.0, 1.0], got 0.0"),
        ("train.weight_decay=-1e-4", "config key 'train.weight_decay' must lie in [0.0, inf], got -0.0001"),
        ("train.warmup_epochs=-1", "config key 'train.warmup_epochs' must lie in [0.0, inf], got -1.0"),
        ("train.accumulate_steps=0", "config key 'train.accumulate_steps' must lie in [1, inf], got 0"),
        ("train.log_every=0", "config key 'train.log_every' must lie in [1, inf], got 0"),
        ("train.milestones=[0.5,1.5]", "config key 'train.milestones' must lie in [0.0, 1.0], got 1.5"),
        ("data.val_size=-0.1", "config key 'data.val_size' must lie in [0.0, inf], got -0.1"),
        ("sila.temperature=0", "config key 'sila.temperature' must lie in (0.0, inf], got 0.0"),
        ("dml.peers=0", "config key 'dml.peers' must lie in [1, inf], got 0"),
        ("dml.temperature=-2", "config key 'dml.temperature' must lie in (0.0, inf], got -2.0"),
        ("loss.exit_weights=[1,-1,1]", "config key 'loss.exit_weights' must lie in [0.0, inf], got -1.0"),
        ("seed=-3", "config key 'seed' must lie in [0, inf], got -3"),
    ],
)
def test_values_out_of_range_fail_with_one_line(tiny_config, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(), [override])
    assert str(err.value) == message


def numeric_fields(cls, prefix=""):
    """(key, field) of every int / float config field (optional, or a list of numbers), sections recursed."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from numeric_fields(hint, f"{prefix}{f.name}.")
            continue
        arms = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in typing.get_args(hint) or [hint]]
        if any(a in (int, float) for a in arms):  # bool is not int here: identity, not subclass
            yield f"{prefix}{f.name}", f


def test_every_numeric_key_has_a_range():
    keys = dict(numeric_fields(Config))
    for entry in TECHNIQUE_SECTIONS:  # the techniques' keys, in the sections they live in
        keys.update(numeric_fields(entry.schema, f"{entry.section}."))
    assert {"train.epochs", "train.milestones", "loss.exit_weights", "data.val_size", "sila.weight"} <= set(keys)
    unbounded = [key for key, f in keys.items() if "range" not in f.metadata]
    assert not unbounded, f"numeric config keys without a range (use config.bounded): {unbounded}"
    # and every default lies in its own range
    cfg = load_config(None)
    full = config_to_dict(cfg)  # a run's config.yaml: the sections of the techniques it uses
    for entry in TECHNIQUE_SECTIONS:  # and every other technique's, at its defaults
        full.setdefault(entry.section, {}).update(dataclasses.asdict(cfg.section(entry.schema)))
    for key, f in keys.items():
        section, _, name = key.rpartition(".")
        value = config_to_dict(cfg, every_section=True)[section][name] if section else getattr(cfg, name)
        check_range(value, f.metadata["range"], key)


def test_exit_weights_of_the_wrong_length_fail_with_the_config(tiny_config):
    cfg = load_config(tiny_config(), ["loss.exit_weights=[1,2,3]"])  # the tiny MSDNet has 3 exits
    assert cfg.loss.exit_weights == [1.0, 2.0, 3.0]
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config(), ["loss.exit_weights=[1,2]"])
    assert str(err.value) == (
        "config key 'loss.exit_weights' has 2 entries but model (msdnet) has 3 exits; "
        "give one weight per exit, or null for all 1"
    )
    # every DML peer is checked: a 4-exit second peer does not fit 3 weights
    four = {**load_config(tiny_config()).model, "n_blocks": 4}
    with pytest.raises(ConfigError, match=r"dml.models\[1\] \(msdnet\) has 4 exits"):
        load_config(
            tiny_config(dml={"peers": 2, "align": "tail", "models": [load_config(tiny_config()).model, four]}),
            ["loss.exit_weights=[1,1,1]"],
        )


def test_exit_count_comes_from_the_meta_device_without_allocating():
    # the paper-scale ImageNet MSDNet: counted without initialising its 24M parameters
    start = time.perf_counter()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/imagenet/msdnet_sila.yaml")
    assert count_exits(cfg.model, "model", 1000) == 5
    assert time.perf_counter() - start < 30
