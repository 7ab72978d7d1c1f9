import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dynsila.config import DataConfig
from dynsila.data import build_splits, make_loader, normalize
from dynsila.errors import DataError


def labels_of(dataset):
    return torch.stack([dataset[i][1] for i in range(len(dataset))]) if len(dataset) else torch.empty(0)


def test_digits_split_is_deterministic_disjoint_and_complete():
    a = build_splits(DataConfig(name="digits", image_size=8, val_size=0.2))
    b = build_splits(DataConfig(name="digits", image_size=8, val_size=0.2))
    assert (len(a.train), len(a.val), len(a.test)) == (len(b.train), len(b.val), len(b.test))
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.num_classes == 10 and a.train[0][0].shape == (3, 8, 8) and a.train[0][0].dtype == torch.uint8
    # the split seed, not the run seed, decides the split
    c = build_splits(DataConfig(name="digits", image_size=8, val_size=0.2, split_seed=1))
    assert not torch.equal(a.test.labels, c.test.labels)


def test_digits_resize_and_normalisation():
    s = build_splits(DataConfig(name="digits", image_size=16))
    x, _ = next(iter(make_loader(s.train, 32, shuffle=False)))
    assert x.shape == (32, 3, 16, 16)
    z = normalize(x, s.mean, s.std)
    assert z.dtype == torch.float32 and abs(float(z.mean())) < 0.5


def write_cifar10(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_pickle_folder(tmp_path):
    write_cifar10(tmp_path)
    s = build_splits(DataConfig(name="cifar10", root=str(tmp_path), val_size=10))
    assert (len(s.train), len(s.val), len(s.test)) == (90, 10, 20)
    assert s.num_classes == 10 and s.image_size == 32 and s.train[0][0].shape == (3, 32, 32)
    # the loader maps the official layout (N x 3072, channel-major) to images exactly
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    assert torch.equal(s.test[3][0], torch.from_numpy(raw["data"][3].reshape(3, 32, 32)))


def test_cifar100_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    labels = list(rng.integers(0, 100, 30))
    for name, n in (("train", 30), ("test", 12)):
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": labels[:n],  # test labels among the training classes (an unseen one is refused)
            "coarse_labels": [0] * n,
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    s = build_splits(DataConfig(name="cifar100", root=str(tmp_path), val_size=0.2))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (24, 6, 12, 100)


def npz_arrays(rng, n_train=40, n_val=8, size=12):
    return {
        "x_train": rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % 4,
        "x_val": rng.integers(0, 256, (n_val, size, size, 3), dtype=np.uint8),
        "y_val": np.arange(n_val) % 4,
    }


def test_npz_with_x_val_only_uses_it_as_test_and_says_so(tmp_path, caplog):
    arrays = npz_arrays(np.random.default_rng(0))
    np.savez(tmp_path / "a.npz", **arrays, classes=np.array(["a", "b", "c", "d"]))
    with caplog.at_level(logging.INFO, logger="dynsila"):
        s = build_splits(DataConfig(name="npz", root=str(tmp_path / "a.npz"), val_size=0.25, image_size=12))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (30, 10, 8, 4)
    assert torch.equal(s.test.images, torch.from_numpy(arrays["x_val"]).permute(0, 3, 1, 2))  # x_val is test
    assert "x_val (8) is the test split (the file has no x_test)" in caplog.text
    assert "data.val_size=0.25 of x_train" in caplog.text
    assert "arrays not used: classes" in caplog.text


def test_npz_with_x_val_and_x_test_uses_both_as_given(tmp_path, caplog):
    rng = np.random.default_rng(1)
    arrays = npz_arrays(rng)
    x_test = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", **arrays, x_test=x_test, y_test=np.arange(5) % 4, note=np.array("hi"))
    with caplog.at_level(logging.INFO, logger="dynsila"):
        s = build_splits(DataConfig(name="npz", root=str(tmp_path / "b.npz"), val_size=0.25, image_size=12))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 8, 5)  # nothing carved out of train
    nchw = {k: torch.from_numpy(v).permute(0, 3, 1, 2) for k, v in (*arrays.items(), ("x_test", x_test)) if k[0] == "x"}
    assert torch.equal(s.train.images, nchw["x_train"])
    assert torch.equal(s.val.images, nchw["x_val"]) and torch.equal(s.val.labels, torch.arange(8) % 4)
    assert torch.equal(s.test.images, nchw["x_test"])
    assert "x_val (8) is the validation split and x_test (5) the test split" in caplog.text
    assert "data.val_size=0.25 is not used" in caplog.text and "arrays not used: note" in caplog.text


def test_npz_with_x_test_only_carves_validation_from_train(tmp_path, caplog):
    arrays = npz_arrays(np.random.default_rng(2))
    np.savez(
        tmp_path / "c.npz",
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_val"],
        y_test=arrays["y_val"],
    )
    with caplog.at_level(logging.INFO, logger="dynsila"):
        s = build_splits(DataConfig(name="npz", root=str(tmp_path / "c.npz"), val_size=10, image_size=12))
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 8)
    assert "x_test (8) is the test split; validation is data.val_size=10" in caplog.text
    assert "arrays not used" not in caplog.text


def test_npz_channels_first_is_recognised_and_transposed(tmp_path, caplog):
    arrays = npz_arrays(np.random.default_rng(3))
    first = {k: v.transpose(0, 3, 1, 2) if k.startswith("x_") else v for k, v in arrays.items()}
    np.savez(tmp_path / "nhwc.npz", **arrays)
    np.savez(tmp_path / "nchw.npz", **first)
    last = build_splits(DataConfig(name="npz", root=str(tmp_path / "nhwc.npz"), image_size=12))
    with caplog.at_level(logging.WARNING, logger="dynsila"):
        chw = build_splits(DataConfig(name="npz", root=str(tmp_path / "nchw.npz"), image_size=12))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(last, split).images, getattr(chw, split).images), split
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "x_train is channels-first N x C x H x W (40, 3, 12, 12)" in warnings[0]
    # grayscale channels-first too
    np.savez(
        tmp_path / "gray.npz",
        x_train=first["x_train"][:, :1],
        y_train=arrays["y_train"],
        x_val=first["x_val"][:, :1],
        y_val=arrays["y_val"],
    )
    gray = build_splits(DataConfig(name="npz", root=str(tmp_path / "gray.npz"), image_size=12))
    assert gray.train.images.shape == (36, 3, 12, 12)


def test_npz_problems_are_one_line_errors(tmp_path):
    np.savez(tmp_path / "no_train.npz", x_val=np.zeros((2, 4, 4, 3), np.uint8), y_val=np.zeros(2))
    np.savez(
        tmp_path / "floats.npz",
        x_train=np.zeros((4, 4, 4, 3)),
        y_train=np.zeros(4),
        x_val=np.zeros((2, 4, 4, 3), np.uint8),
        y_val=np.zeros(2),
    )
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    x, y = np.zeros((4, 6, 6, 3), np.uint8), np.zeros(4, np.int64)
    np.savez(tmp_path / "no_y_test.npz", x_train=x, y_train=y, x_test=x)
    np.savez(tmp_path / "no_eval.npz", x_train=x, y_train=y)
    np.savez(tmp_path / "rgba.npz", x_train=np.zeros((4, 6, 6, 4), np.uint8), y_train=y, x_val=x, y_val=y)
    np.savez(tmp_path / "short_y.npz", x_train=x, y_train=y[:3], x_val=x, y_val=y)
    np.savez(tmp_path / "fraction_y.npz", x_train=x, y_train=y + 0.5, x_val=x, y_val=y)
    for name, message in (
        ("missing.npz", "npz dataset not found"),
        ("no_train.npz", "no x_train"),
        ("floats.npz", "must be uint8"),
        ("junk.npz", "not a readable .npz"),
        ("no_y_test.npz", "has x_test but no y_test; add y_test or remove x_test"),
        ("no_eval.npz", "neither x_test/y_test nor x_val/y_val"),
        ("rgba.npz", "neither 1 nor 3 channels"),
        ("short_y.npz", "y_train must hold 4 whole-number labels"),
        ("fraction_y.npz", "y_train must hold 4 whole-number labels"),
    ):
        with pytest.raises(DataError, match=message) as err:
            build_splits(DataConfig(name="npz", root=str(tmp_path / name)))
        assert "\n" not in str(err.value)


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    s = build_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, val_size=3))
    assert (len(s.train), len(s.val), len(s.test), s.num_classes) == (15, 3, 6, 3)
    image, label = s.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert s.test[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("name", "path_part"),
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("imagefolder", "train")],
)
def test_missing_dataset_names_the_path_and_the_fix(tmp_path, name, path_part):
    with pytest.raises(DataError) as err:
        build_splits(DataConfig(name=name, root=str(tmp_path / "nowhere")))
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and path_part in message and "\n" not in message


def test_corrupt_cifar_pickle(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        build_splits(DataConfig(name="cifar10", root=str(tmp_path)))


def test_val_size_that_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="val_size"):
        build_splits(DataConfig(name="digits", val_size=5000))
