"""The authors' MSDNet and SkipNet checkpoints in dynsila (``dynsila.convert``): every published preset maps key
for key and back exactly, bad checkpoints stop with one line, a converted model runs through every command."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from dynsila.config import load_config
from dynsila.deploy.convert import load_authors_state, to_authors, to_dynsila
from dynsila.deploy.convert import main as convert_main
from dynsila.errors import CheckpointError
from dynsila.runs.rundir import build_model, load_deploy_model
from tests.conftest import TINY_MSDNET, deploy_installed

CIFAR_PRESETS = [
    "configs/cifar10/skipnet38_authors.yaml",
    "configs/cifar10/skipnet74_authors.yaml",
    "configs/cifar10/skipnet110_authors.yaml",
]
IMAGENET_PRESETS = [
    "configs/imagenet/msdnet_step4_authors.yaml",
    "configs/imagenet/msdnet_step7_authors.yaml",
    "configs/imagenet/skipnet50_authors.yaml",
    "configs/imagenet/skipnet101_authors.yaml",
]
ROOT = Path(__file__).resolve().parents[1]


def random_authors_state(model: nn.Module, lazy: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint in the authors' layout with random tensors of the right shapes: the keys and shapes from the
    key table (``to_authors``), duplicates sharing their tensor. ``lazy``: each tensor one distinct value
    broadcast to its shape (no memory, still tells every tensor apart), for ImageNet-size networks."""
    template, state, seen = to_authors(model), {}, {}
    for i, (key, t) in enumerate(template.items()):
        if id(t) in seen:  # an alias of a key already drawn
            state[key] = state[seen[id(t)]]
            continue
        seen[id(t)] = key
        if lazy:
            state[key] = torch.tensor(i if not t.is_floating_point() else i + 0.5, dtype=t.dtype).expand(t.shape)
        elif t.is_floating_point():
            state[key] = torch.randn(t.shape)
        else:
            state[key] = torch.randint(0, 1000, t.shape, dtype=t.dtype)
    return state


def save_authors(state: dict[str, torch.Tensor], path: Path, legacy: bool = False, **extra: object) -> Path:
    """As the authors' scripts save: DataParallel's ``module.`` prefix, bookkeeping beside the weights;
    ``legacy``: the pre-1.6 serialization their PyTorch 0.2-0.4 files use."""
    prefixed = {f"module.{k}": v for k, v in state.items()}
    checkpoint = {"epoch": 90, "arch": "x", "state_dict": prefixed, "best_prec1": torch.tensor(75.0), **extra}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path


def assert_round_trip(model: nn.Module, authors: dict[str, torch.Tensor], back: dict[str, torch.Tensor]) -> None:
    assert set(back) == set(authors)
    unused = {k for k in authors if k.startswith("group") and k.split(".")[0] == last_gate_name(authors)}
    for key, tensor in authors.items():
        if key not in unused:
            assert back[key].shape == tensor.shape and torch.equal(back[key], tensor), key


def last_gate_name(authors: dict[str, torch.Tensor]) -> str:
    gates = sorted(
        {k.split(".")[0] for k in authors if "_gate" in k.split(".")[0]},
        key=lambda n: tuple(int(x) for x in n.removeprefix("group").split("_gate")),
    )
    return gates[-1] if gates else ""


# --- every published preset ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", CIFAR_PRESETS)
def test_cifar_preset_converts_through_the_cli_and_back_exactly(preset, tmp_path, capsys):
    model = build_model(load_config(ROOT / preset))
    authors = random_authors_state(model)
    checkpoint = save_authors(authors, tmp_path / "published.pth.tar", legacy=True)
    run_dir = tmp_path / "run"
    args = ["skipnet", str(checkpoint), "--config", str(ROOT / preset), "data.root=elsewhere", "--out", str(run_dir)]
    assert convert_main(args) == 0
    out = capsys.readouterr().out
    assert "unused: " + ", ".join(sorted(k for k in authors if k.startswith(last_gate_name(authors) + "."))) in out
    loaded, cfg = load_deploy_model(run_dir)
    assert cfg.name == "run" and cfg.model == load_config(ROOT / preset).model and cfg.data.root == "elsewhere"
    back_file = tmp_path / "back.pth.tar"
    assert convert_main(["skipnet", str(run_dir), "--to", "authors", "--out", str(back_file)]) == 0
    back = load_authors_state(back_file)
    assert_round_trip(loaded, authors, back)
    assert torch.equal(loaded.state_dict()["exits.0.fc.weight"], authors["fc.weight"])


@pytest.mark.parametrize("preset", IMAGENET_PRESETS)
def test_imagenet_preset_maps_every_key_and_shape_and_back_exactly(preset):
    with torch.device("meta"):  # keys and shapes only: nothing of ImageNet size is allocated
        model = build_model(load_config(ROOT / preset))
    authors = random_authors_state(model, lazy=True)
    family = load_config(ROOT / preset).model["name"]
    conversion = to_dynsila(family, authors, model, Path(preset))
    own = model.state_dict()
    assert set(conversion.state) == set(own) and not conversion.filled
    assert all(conversion.state[k].shape == own[k].shape for k in own)
    assert_round_trip(model, authors, to_authors(model, conversion.state))


def test_imagenet_skipnet_gate_projection_is_a_1x1_convolution():
    with torch.device("meta"):
        model = build_model(load_config(ROOT / "configs/imagenet/skipnet50_authors.yaml"))
    authors = random_authors_state(model, lazy=True)
    assert authors["control.proj.weight"].shape == (1, 10, 1, 1)  # the authors' nn.Conv2d(hidden, 1, 1)
    assert model.state_dict()["controller.proj.weight"].shape == (1, 10)  # ours: nn.Linear(hidden, 1)
    with torch.device("meta"):
        cifar = build_model(load_config(ROOT / "configs/cifar10/skipnet38_authors.yaml"))
    assert to_authors(cifar)["control.proj.weight"].shape == (1, 10)  # the CIFAR code's nn.Linear


# --- bad checkpoints stop with one line -------------------------------------------------------------------------

SMALL = {"msdnet": dict(TINY_MSDNET), "skipnet": {"name": "skipnet", "depth": 20, "gate": "rnn", "stem": "cifar"}}


def small_config(family: str, tmp_path: Path) -> Path:
    """The family's small network on 48 random 8x8 images (16 each for train, val and test)."""
    import numpy as np
    import yaml

    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"x_{split}"] = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
        arrays[f"y_{split}"] = np.arange(16) % 10
    np.savez(tmp_path / "tiny.npz", **arrays)
    data = {"name": "npz", "root": str(tmp_path / "tiny.npz"), "image_size": 8, "num_classes": 10}
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump({"model": SMALL[family], "data": data, "sila": {"enabled": False}}))
    return path


def convert_error(family: str, state_or_file: dict | Path, tmp_path: Path, capsys, **extra: object) -> str:
    checkpoint = (
        state_or_file
        if isinstance(state_or_file, Path)
        else save_authors(state_or_file, tmp_path / "bad.pth.tar", **extra)
    )
    config = small_config(family, tmp_path)
    run_dir = tmp_path / "run"
    assert convert_main([family, str(checkpoint), "--config", str(config), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (run_dir / "deploy.safetensors").exists()
    return err


def small_authors(family: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    return random_authors_state(build_model(load_config(small_config(family, tmp_path))))


@pytest.mark.parametrize("family", ["msdnet", "skipnet"])
def test_unmapped_missing_and_misshapen_keys_stop_with_one_line(family, tmp_path, capsys):
    good = small_authors(family, tmp_path)
    extra = {**good, "classifier_extra.weight": torch.zeros(3)}
    assert "no place in the model" in convert_error(family, extra, tmp_path, capsys)
    dropped = next(k for k in good if k.endswith("conv1.weight") or k.endswith("net.0.weight"))
    missing = {k: v for k, v in good.items() if k != dropped}
    assert f"lacks weights the model needs: 1 (e.g. {dropped}" in convert_error(family, missing, tmp_path, capsys)
    reshaped = {**good, dropped: torch.zeros(*good[dropped].shape[:-1], 5)}
    assert f"{dropped} has shape" in convert_error(family, reshaped, tmp_path, capsys)


def test_a_pickle_holding_a_python_object_is_refused(tmp_path, capsys):
    good = small_authors("skipnet", tmp_path)
    err = convert_error("skipnet", good, tmp_path, capsys, args=argparse.Namespace(lr=0.1))
    assert "argparse.Namespace" in err and "weights-only" in err


@pytest.mark.parametrize(("family", "other"), [("msdnet", "skipnet"), ("skipnet", "msdnet")])
def test_a_checkpoint_of_the_other_family_stops_with_one_line(family, other, tmp_path, capsys):
    err = convert_error(family, small_authors(other, tmp_path), tmp_path, capsys)
    assert f"python -m dynsila.convert {other}" in err


def test_checkpoint_without_batchnorm_counters_converts_with_them_zeroed(tmp_path):
    model = build_model(load_config(small_config("msdnet", tmp_path)))
    authors = {k: v for k, v in random_authors_state(model).items() if not k.endswith("num_batches_tracked")}
    conversion = to_dynsila("msdnet", authors, model, tmp_path / "old.pth.tar")
    assert conversion.filled and all(int(conversion.state[k]) == 0 for k in conversion.filled)
    assert "num_batches_tracked counters absent" in conversion.summary()


def test_a_damaged_duplicate_is_refused(tmp_path):
    model = build_model(load_config(small_config("skipnet", tmp_path)))
    authors = random_authors_state(model)
    alias = next(k for k in authors if "_ds" in k and k.endswith("weight"))
    authors[alias] = authors[alias] + 1
    with pytest.raises(CheckpointError, match="differs from"):
        to_dynsila("skipnet", authors, model, tmp_path / "x.pth.tar")


# --- a converted model through every command ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["msdnet", "skipnet"])
def test_converted_model_runs_through_evaluate_infer_and_export(family, tmp_path, capsys):
    from dynsila.export import main as export_main
    from dynsila.infer import main as infer_main

    config = small_config(family, tmp_path)
    model = build_model(load_config(config)).eval()
    authors = random_authors_state(model)
    for key, tensor in authors.items():  # a usable network: positive variances, small weights
        if key.endswith("running_var"):
            tensor.abs_().add_(0.5)
        elif tensor.is_floating_point():
            tensor.mul_(0.3)
    checkpoint = save_authors(authors, tmp_path / "published.pth.tar")
    run_dir = tmp_path / "run"
    args = [family, str(checkpoint), "--config", str(config), "--out", str(run_dir), "--evaluate", "--device", "cpu"]
    assert convert_main(args) == 0
    assert (run_dir / "eval.json").is_file()  # written by dynsila.evaluate's evaluate_run
    converted, _ = load_deploy_model(run_dir)
    x = torch.randn(2, 3, 8, 8)
    model.load_state_dict({k: v for k, v in converted.state_dict().items()})
    with torch.no_grad():
        for a, b in zip(_logits(model(x)), _logits(converted(x)), strict=True):
            assert torch.equal(a, b)
    if family == "msdnet":  # early exit and ONNX export are for multi-exit networks
        assert infer_main([str(run_dir), "--q", "1.0", "--batch-size", "64"]) == 0
        if deploy_installed():  # the ONNX export needs the deploy extra; without it, the dev install skips this part
            assert export_main([str(run_dir), "--q", "1.0"]) == 0
            assert (run_dir / "onnx" / "manifest.json").is_file()


def _logits(out: object) -> list[torch.Tensor]:
    from dynsila.models import exit_logits

    return exit_logits(out)


def test_a_published_networks_input_normalisation_is_configurable(tmp_path):
    """SkipNet's CIFAR code normalises with std 0.2023 0.1994 0.2010, not CIFAR-10's true std: its presets say so."""
    from dynsila.data import build_splits
    from dynsila.errors import ConfigError

    cfg = load_config(small_config("skipnet", tmp_path))
    preset = load_config(ROOT / "configs/cifar10/skipnet38_authors.yaml").data
    assert preset.std == [0.2023, 0.1994, 0.2010]
    data = dataclasses.replace(cfg.data, mean=preset.mean, std=preset.std)
    splits = build_splits(data)
    assert splits.mean == tuple(preset.mean) and splits.std == tuple(preset.std)
    with pytest.raises(ConfigError, match="data.std"):
        build_splits(dataclasses.replace(cfg.data, std=[0.2, 0.2]))
    with pytest.raises(ConfigError, match="data.std"):  # the config's own range check
        load_config(small_config("skipnet", tmp_path), ["data.std=[0.2,0.0,0.2]"])
