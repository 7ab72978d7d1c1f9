"""A validation split read from a file of training-set indices (``data.val_indices``), e.g. the MSDNet authors'
index.pth, so a published network's thresholds are fitted on exactly the images its authors held out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynsila.config import DataConfig
from dynsila.data import build_splits
from dynsila.errors import ConfigError, DataError


def npz_without_validation(tmp_path: Path, n: int = 40) -> Path:
    """Training images whose first pixel is their own index, so a split's indices can be read off its images."""
    x = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x, y_train=np.arange(n) % 10, x_test=x[:8], y_test=np.arange(8) % 10)
    return path


def split_indices(cfg: DataConfig) -> tuple[list[int], list[int]]:
    splits = build_splits(cfg)
    return tuple(
        sorted(int(splits_of[i][0][0, 0, 0]) for i in range(len(splits_of)))  # type: ignore[return-value]
        for splits_of in (splits.train, splits.val)
    )


def config(tmp_path: Path, **changes: object) -> DataConfig:
    return DataConfig(
        name="npz", root=str(npz_without_validation(tmp_path)), image_size=8, num_classes=10, augment="none", **changes
    )


def test_a_permutation_of_the_training_set_keeps_its_last_entries_as_validation(tmp_path):
    """The MSDNet authors' layout: torch.randperm over the training set, validation its last val_size entries."""
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    torch.save(perm, tmp_path / "index.pth")
    train, val = split_indices(config(tmp_path, val_size=10, val_indices=str(tmp_path / "index.pth")))
    assert val == sorted(perm[-10:].tolist()) and train == sorted(perm[:-10].tolist())


def test_a_list_of_indices_is_the_validation_split_itself(tmp_path):
    (tmp_path / "val.txt").write_text("3 5 7\n11\n")
    train, val = split_indices(config(tmp_path, val_indices=str(tmp_path / "val.txt")))
    assert val == [3, 5, 7, 11] and train == sorted(set(range(40)) - {3, 5, 7, 11})
    np.save(tmp_path / "val.npy", np.array([0, 39]))
    assert split_indices(config(tmp_path, val_indices=str(tmp_path / "val.npy")))[1] == [0, 39]


@pytest.mark.parametrize(
    ("content", "message"),
    [("3 40", "distinct indices below 40"), ("3 3", "distinct indices"), ("a b", "not a list of integers")],
)
def test_a_bad_index_file_stops_with_one_line(tmp_path, content, message):
    (tmp_path / "val.txt").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        build_splits(config(tmp_path, val_indices=str(tmp_path / "val.txt")))
    assert len(str(info.value).splitlines()) == 1


def test_a_pickle_that_is_not_a_tensor_is_refused(tmp_path):
    torch.save({"indices": [1, 2]}, tmp_path / "index.pth")
    with pytest.raises(DataError, match="not a tensor"):
        build_splits(config(tmp_path, val_indices=str(tmp_path / "index.pth")))
    with pytest.raises(DataError, match="not found"):
        build_splits(config(tmp_path, val_indices=str(tmp_path / "missing.pth")))


def test_data_with_its_own_validation_split_refuses_an_index_file(tmp_path):
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "own.npz",
        x_train=x,
        y_train=np.arange(4),
        x_val=x,
        y_val=np.arange(4),
        x_test=x,
        y_test=np.arange(4),
    )
    (tmp_path / "val.txt").write_text("1")
    cfg = DataConfig(name="npz", root=str(tmp_path / "own.npz"), image_size=8, val_indices=str(tmp_path / "val.txt"))
    with pytest.raises(ConfigError, match="brings its own validation split"):
        build_splits(cfg)


def test_evaluate_fits_on_the_listed_validation_split(tmp_path):
    import yaml

    from dynsila.deploy.convert import convert_checkpoint
    from dynsila.evaluation.evaluate import evaluate_run
    from tests.test_convert import random_authors_state, save_authors, small_config

    path = small_config("msdnet", tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {**raw["data"], **{"root": str(npz_without_validation(tmp_path)), "val_size": 0.25}}
    path.write_text(yaml.safe_dump(raw))
    from dynsila.config import load_config
    from dynsila.runs.rundir import build_model

    authors = random_authors_state(build_model(load_config(path)))
    convert_checkpoint("msdnet", save_authors(authors, tmp_path / "c.pth.tar"), path, tmp_path / "run")
    (tmp_path / "val.txt").write_text("1 2 3")
    assert evaluate_run(tmp_path / "run", val_indices=tmp_path / "val.txt").splits == {"val": 3, "test": 8}
    assert evaluate_run(tmp_path / "run").splits == {"val": 10, "test": 8}  # the config's draw: 25 % of 40
