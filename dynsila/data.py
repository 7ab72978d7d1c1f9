"""Datasets as train / val / test splits of uint8 images; normalisation happens on the device, per batch.

- ``digits``: scikit-learn's embedded handwritten digits (1,797 real 8x8 images, 10 classes), no download.
- ``cifar10`` / ``cifar100``: the official Python pickle folders under ``data.root``.
- ``npz``: uint8 NHWC arrays ``x_train``/``y_train`` plus ``x_val``/``y_val`` and/or ``x_test``/``y_test``
  (channels-first N x C x H x W is recognised and transposed, with a logged line).
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the ImageNet layout).

Validation is used for model selection and for fitting early-exit thresholds, and never overlaps test; it is
held out of train (``data.val_size``) unless the data brings its own: an npz file with both ``x_val`` and
``x_test`` (an npz with ``x_val`` alone uses it as the test split). Test is never used for fitting anything.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2 as T

from dynsila.config import DataConfig
from dynsila.errors import ConfigError, DataError
from dynsila.val_indices import listed_holdout

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
CLASS_NAMES = {
    "digits": [str(d) for d in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}  # the rest: the folders' names (imagefolder), or data.class_names
DEFAULT_IMAGE_SIZE = {"digits": 32, "cifar10": 32, "cifar100": 32, "npz": 32, "imagefolder": 224}
DEFAULT_AUGMENT = {
    "digits": "crop",
    "cifar10": "crop_flip",
    "cifar100": "crop_flip",
    "npz": "crop_flip",
    "imagefolder": "rrc_flip",
}  # no flips for digits: a mirrored digit is another glyph


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None = None  # per label, where known


class ArrayDataset(Dataset):
    """In-memory uint8 images ``N x 3 x H x W`` with int64 labels and an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: T.Transform | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), self.labels[i]


def dataset_size(dataset: Dataset) -> int:
    return len(cast(Sized, dataset))  # every dataset here is map-style and sized


def image_size_of(cfg: DataConfig) -> int:
    return cfg.image_size or DEFAULT_IMAGE_SIZE[cfg.name]


def num_classes_of(cfg: DataConfig) -> int | None:
    """Known without touching the disk for named datasets or when the config says so; else None."""
    return cfg.num_classes or NUM_CLASSES.get(cfg.name)


def build_splits(cfg: DataConfig) -> Splits:
    """Load the dataset named by ``cfg`` and split it; fails with one line when it is missing or malformed."""
    if cfg.name == "imagefolder":
        return _imagefolder_splits(cfg)
    loaders = {"digits": _load_digits, "cifar10": _load_cifar10, "cifar100": _load_cifar100, "npz": _load_npz}
    loaded = loaders[cfg.name](cfg)
    num_classes = num_classes_of(cfg) or int(max(int(y.max()) for _, y in loaded.values() if len(y)) + 1)
    for check in SPLIT_CHECKS:  # every loader's arrays pass the same checks, before anything is resized
        check(cfg.name, loaded, num_classes)
    arrays = _with_validation(loaded, cfg)
    size = image_size_of(cfg)
    images = {k: _to_tensor_images(x, size) for k, (x, _) in arrays.items()}
    labels = {k: torch.as_tensor(y, dtype=torch.int64) for k, (_, y) in arrays.items()}
    _refuse_degenerate(cfg.name, images)
    mean, std = _configured_stats(cfg, *_stats(cfg.name, images["train"]))
    augment = _train_transform(cfg, size)
    return Splits(
        train=ArrayDataset(images["train"], labels["train"], augment),
        val=ArrayDataset(images["val"], labels["val"]),
        test=ArrayDataset(images["test"], labels["test"]),
        num_classes=num_classes,
        image_size=size,
        mean=mean,
        std=std,
        class_names=class_names(cfg, num_classes, CLASS_NAMES.get(cfg.name)),
    )


def class_names(cfg: DataConfig, num_classes: int, known: list[str] | None) -> list[str] | None:
    """``data.class_names`` where set (one per class, or one line), else the dataset's own names if it has them."""
    if cfg.class_names is None:
        return known if known is not None and len(known) == num_classes else None
    if len(cfg.class_names) != num_classes:
        raise ConfigError(
            f"data.class_names lists {len(cfg.class_names)} names for {num_classes} classes; give one name per class"
        )
    return list(cfg.class_names)


def _labels_in_range(name: str, arrays: Arrays, num_classes: int) -> None:
    """Labels are class indices 0..num_classes-1."""
    for split, (_, y) in arrays.items():
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(
                f"{name}: {split} labels span {int(y.min())}..{int(y.max())} but the data has {num_classes} "
                "classes; fix the labels or set data.num_classes"
            )


def _same_image_shape(name: str, arrays: Arrays, num_classes: int) -> None:
    """Every split's images have the train split's height, width and channels (a mismatch would be resized to
    data.image_size silently, training and testing on different images)."""
    shape = arrays["train"][0].shape[1:]
    for split, (x, _) in arrays.items():
        if x.shape[1:] != shape:
            raise DataError(
                f"{name}: x_{split} images are {'x'.join(map(str, x.shape[1:]))} but x_train's are "
                f"{'x'.join(map(str, shape))}; store every split at one image size and channel count"
            )


def _two_classes(name: str, arrays: Arrays, num_classes: int) -> None:
    """A classifier needs at least two classes to learn (one class is 100 % correct by construction)."""
    classes = np.unique(arrays["train"][1])
    if len(classes) < 2:
        raise DataError(
            f"{name}: the training labels hold {len(classes)} class ({classes.tolist()}); a classifier needs at "
            "least 2, so check the labels or the file"
        )


def _evaluated_classes_are_trained(name: str, arrays: Arrays, num_classes: int) -> None:
    """Validation and test labels name classes the training split has (an unseen class is scored as wrong for
    every image, without a word)."""
    trained = set(np.unique(arrays["train"][1]).tolist())
    for split, (_, y) in arrays.items():
        unseen = sorted(set(np.unique(y).tolist()) - trained)
        if unseen:
            shown = ", ".join(map(str, unseen[:5])) + (", ..." if len(unseen) > 5 else "")
            raise DataError(
                f"{name}: y_{split} has {len(unseen)} class(es) the training labels never hold ({shown}); "
                "evaluate on the training classes only, or add training images of them"
            )


SPLIT_CHECKS = (_labels_in_range, _same_image_shape, _two_classes, _evaluated_classes_are_trained)


def _refuse_degenerate(name: str, images: dict[str, torch.Tensor]) -> None:
    """An empty split (nothing to evaluate or select on) or training images that are all one value (nothing to
    learn, and a standard deviation of zero) stop here, before a run is built on them."""
    for split, x in images.items():
        if len(x) == 0:
            raise DataError(f"{name}: the {split} split holds no images; add some (or lower data.val_size)")
    low, high = torch.aminmax(images["train"])
    if low == high:
        raise DataError(
            f"{name}: every training pixel is {int(low)} (constant images, nothing to learn); check how the "
            "data file was made"
        )


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``N x 3 x H x W`` -> float, scaled to [0, 1] and standardised per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255) - m) / s


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0, drop_last: bool = False
) -> DataLoader:
    """A DataLoader whose shuffling order is a function of ``seed`` only (pass seed + epoch)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
    )


class DeviceBatches:
    """Training batches from uint8 images held on the training device and augmented there as batched tensor ops
    (``data.on_device``): no worker processes, no per-sample Python, no host-to-device copy per step.

    Every random draw of an epoch (the order, each sample's crop offset and flip) comes from a CPU generator seeded
    with ``seed`` (the run passes a function of its seed and the epoch) and reaches the device in one copy per
    epoch, so the batches are a function of (seed, epoch) on any device, and a resumed run sees exactly what an
    uninterrupted one would. Under DDP every rank makes the same draws and takes a strided shard, as
    DistributedSampler does, so N ranks see exactly the augmented micro-batches that one process with
    ``train.accumulate_steps=N`` sees. The draws differ from the DataLoader path's: the two paths see different
    (equally distributed) batches."""

    def __init__(
        self,
        dataset: Dataset,
        cfg: DataConfig,
        batch_size: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise ConfigError(
                f"data.on_device needs an in-memory dataset (digits, cifar10, cifar100, npz), not {cfg.name}; "
                "set data.on_device=false"
            )
        kind = _augment_kind(cfg)
        if kind not in ("none", "crop", "crop_flip"):
            raise ConfigError(
                f"data.on_device augments with none, crop or crop_flip, not data.augment={kind}; choose one of "
                "those or set data.on_device=false"
            )
        self.images, self.labels = dataset.images.to(device), dataset.labels.to(device)  # N x 3 x H x W uint8
        self.crop, self.flip = kind != "none", kind == "crop_flip"
        self.pad = _crop_padding(self.images.shape[-1])
        self.rank, self.world_size = rank, world_size
        self.per_rank = len(self.labels) // world_size
        self.batch_size = min(batch_size, self.per_rank)

    def __len__(self) -> int:
        return self.per_rank // self.batch_size  # drop_last: no 1-sample batch-norm batches

    def epoch(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of one epoch: (augmented uint8 images B x 3 x H x W, labels B), on the device."""
        generator, n = torch.Generator().manual_seed(seed), len(self.labels)
        total = self.per_rank * self.world_size  # draws for all n, used for the first total: the same on any world
        order = torch.randperm(n, generator=generator)[:total]
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)[:total]
        flips = (torch.rand(n, generator=generator)[:total] < 0.5) & self.flip
        draws = [t[self.rank :: self.world_size][: len(self) * self.batch_size] for t in (order, offsets, flips)]
        if self.images.is_cuda:
            draws = [t.pin_memory() for t in draws]  # an asynchronous copy, no host sync
        mine, offsets, flips = (t.to(self.images.device, non_blocking=True) for t in draws)
        for start in range(0, len(mine), self.batch_size):
            rows = slice(start, start + self.batch_size)
            images = self.images[mine[rows]]
            if self.crop:
                images = random_crop_flip(images, offsets[rows], flips[rows], self.pad)
            yield images, self.labels[mine[rows]]


def random_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding=pad)`` (zero fill) then ``RandomHorizontalFlip``, with the draws given.

    ``images`` B x C x H x W (any dtype); ``offsets`` B x 2: each sample's (top, left) corner in the padded image,
    in [0, 2 pad]; ``flips`` B (bool). Returns B x C x H x W: one gather, no per-sample work."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    device = images.device
    rows = offsets[:, :1] + torch.arange(h, device=device)  # B x H
    cols = torch.arange(w, device=device)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:]  # B x W, mirrored when flipped
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


# --- helpers ------------------------------------------------------------------------------------------------


def _with_validation(arrays: Arrays, cfg: DataConfig) -> Arrays:
    """train / val / test arrays: the loader's own validation split when it has one, else ``data.val_size``
    samples held out of train (drawn with ``data.split_seed``)."""
    if "val" in arrays:
        if cfg.val_indices is not None:
            raise ConfigError(
                f"data.val_indices={cfg.val_indices} is set but {cfg.root} brings its own validation split "
                "(x_val and x_test); remove one of them"
            )
        return arrays
    x_train, y_train = arrays["train"]
    train_idx, val_idx = validation_holdout(len(y_train), cfg)
    return {
        "train": (x_train[train_idx], y_train[train_idx]),
        "val": (x_train[val_idx], y_train[val_idx]),
        "test": arrays["test"],
    }


def validation_holdout(n: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into the ``n`` training samples: the file ``data.val_indices`` lists, or a draw."""
    if cfg.val_indices is None:
        return _holdout(n, cfg.val_size, cfg.split_seed)
    return listed_holdout(Path(cfg.val_indices), n, _validation_count(n, cfg.val_size))


def _validation_count(n: int, val_size: float) -> int:
    return int(round(val_size * n)) if val_size < 1 else int(val_size)


def _holdout(n: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_val = _validation_count(n, val_size)
    if not 0 < n_val < n:
        raise DataError(
            f"data.val_size={val_size} leaves no train or no validation samples out of {n}; "
            "use a fraction in (0, 1) or a count below the train size"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _to_tensor_images(x: np.ndarray, size: int) -> torch.Tensor:
    """NHWC uint8 (or NHW) -> N x 3 x size x size uint8, resized bilinearly when needed."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.unsqueeze(-1) if t.dim() == 3 else t
    t = t.permute(0, 3, 1, 2)
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if t.shape[-1] != size or t.shape[-2] != size:
        t = F.interpolate(
            t.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=t.shape[-1] > size
        )
        t = t.round().clamp(0, 255).to(torch.uint8)
    return t.contiguous()


def _configured_stats(
    cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``data.mean`` / ``data.std`` where the config sets them, else the statistics given."""
    for key, values in (("mean", cfg.mean), ("std", cfg.std)):
        if values is not None and len(values) != 3:
            raise ConfigError(f"data.{key}={values} needs 3 per-channel values; fix data.{key}")
    return tuple(cfg.mean) if cfg.mean else mean, tuple(cfg.std) if cfg.std else std


def _stats(name: str, train_images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    known = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
    if name in known:
        return known[name]
    x = train_images.float().div(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _crop_padding(size: int) -> int:
    return max(1, round(size / 8))  # 4 pixels at CIFAR's 32


def _augment_kind(cfg: DataConfig) -> str:
    return DEFAULT_AUGMENT[cfg.name] if cfg.augment == "auto" else cfg.augment


def _augmentations(kind: str, size: int) -> list[T.Transform]:
    """The random training transforms of an augmentation kind, on images already ``size`` square (except rrc)."""
    pad = _crop_padding(size)
    return {
        "none": [],
        "crop": [T.RandomCrop(size, padding=pad)],
        "crop_flip": [T.RandomCrop(size, padding=pad), T.RandomHorizontalFlip()],
        "rrc_flip": [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()],
    }[kind]


def _train_transform(cfg: DataConfig, size: int) -> T.Transform | None:
    transforms = _augmentations(_augment_kind(cfg), size)
    return T.Compose(transforms) if transforms else None


Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def _load_digits(cfg: DataConfig) -> Arrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    labels = bunch.target.astype(np.int64)
    # A fixed 20 % test split, drawn with the split seed; validation is then carved from the rest.
    rest, test = _holdout(len(labels), 0.2, cfg.split_seed + 1)
    return {"train": (images[rest], labels[rest]), "test": (images[test], labels[test])}


def _unpickle(path: Path) -> dict:
    # The official CIFAR release is a set of Python pickles; this is the format users have on disk.
    with path.open("rb") as f:
        try:
            return pickle.load(f, encoding="latin1")
        except Exception as e:
            raise DataError(
                f"{path} is not a readable CIFAR pickle ({type(e).__name__}); download the dataset again"
            ) from None


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path} does not hold CIFAR images (N x 3072 uint8); download the dataset again")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_missing(cfg: DataConfig, path: Path, archive: str) -> DataError:
    return DataError(
        f"{cfg.name} not found: looked for {path}; download "
        f"https://www.cs.toronto.edu/~kriz/{archive} and extract it into {cfg.root}"
    )


def _load_cifar10(cfg: DataConfig) -> Arrays:
    folder = Path(cfg.root) / "cifar-10-batches-py"
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    for path in [*train_files, folder / "test_batch"]:
        if not path.is_file():
            raise _cifar_missing(cfg, path, "cifar-10-python.tar.gz")
    batches = [(_unpickle(p), p) for p in train_files]
    x_train = np.concatenate([_cifar_images(b, p) for b, p in batches])
    y_train = np.concatenate([np.asarray(b["labels"]) for b, _ in batches])
    test = _unpickle(folder / "test_batch")
    return {
        "train": (x_train, y_train),
        "test": (_cifar_images(test, folder / "test_batch"), np.asarray(test["labels"])),
    }


def _load_cifar100(cfg: DataConfig) -> Arrays:
    folder = Path(cfg.root) / "cifar-100-python"
    out = {}
    for split, file in (("train", "train"), ("test", "test")):
        path = folder / file
        if not path.is_file():
            raise _cifar_missing(cfg, path, "cifar-100-python.tar.gz")
        batch = _unpickle(path)
        out[split] = (_cifar_images(batch, path), np.asarray(batch["fine_labels"]))
    return out


NPZ_SPLITS = ("train", "val", "test")


def _load_npz(cfg: DataConfig) -> Arrays:
    """x_train/y_train plus x_val/y_val and/or x_test/y_test. Both x_val and x_test: validation and test as
    given (``data.val_size`` unused). x_val alone: it is the test split and validation is held out of train (the
    layout of ``cifar10_dev.npz``). Every choice, and every array left unused, is logged."""
    path = Path(cfg.root)
    if not path.is_file():
        raise DataError(
            f"npz dataset not found: looked for {path}; set data.root to an .npz file with uint8 "
            "NHWC x_train/y_train and x_val/y_val or x_test/y_test"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}); re-create it") from None
    splits = {}
    for split in NPZ_SPLITS:
        x, y = stored.get(f"x_{split}"), stored.get(f"y_{split}")
        if (x is None) != (y is None):
            have, lack = (f"x_{split}", f"y_{split}") if y is None else (f"y_{split}", f"x_{split}")
            raise DataError(f"{path} has {have} but no {lack}; add {lack} or remove {have}")
        if x is not None and y is not None:
            splits[split] = (_npz_images(f"x_{split}", x, path), _npz_labels(f"y_{split}", y, len(x), path))
    if "train" not in splits:
        raise DataError(f"{path} has no x_train / y_train arrays (found {sorted(stored)}); add them")
    if "val" not in splits and "test" not in splits:
        raise DataError(f"{path} has neither x_test/y_test nor x_val/y_val; add an evaluation split")
    unused = sorted(set(stored) - {f"{p}_{s}" for s in splits for p in ("x", "y")})
    _log_npz_roles(path, splits, cfg.val_size, unused)
    if "test" not in splits:  # x_val alone is the held-out evaluation split; validation comes out of train
        splits = {"train": splits["train"], "test": splits["val"]}
    return splits


def _npz_images(key: str, x: np.ndarray, path: Path) -> np.ndarray:
    """N x H x W x C uint8 (C = 1 or 3). A channels-first array (N x C x H x W, C = 1 or 3, last axis not 1 or 3)
    is unambiguous, so it is transposed with a logged line rather than refused: rewriting a large file would
    tell the user nothing new. Any other shape stops with one line."""
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"{path}: {key} must be uint8 N x H x W x C, got {x.dtype} {x.shape}")
    if x.shape[3] in (1, 3):
        return x
    if x.shape[1] in (1, 3):
        log.warning("%s: %s is channels-first N x C x H x W %s; transposed to N x H x W x C", path, key, x.shape)
        return x.transpose(0, 2, 3, 1)
    raise DataError(
        f"{path}: {key} has shape {x.shape}, with neither 1 nor 3 channels on the last (N x H x W x C) or second "
        "(N x C x H x W) axis; store uint8 images with 1 or 3 channels"
    )


def _npz_labels(key: str, y: np.ndarray, count: int, path: Path) -> np.ndarray:
    whole = np.issubdtype(y.dtype, np.number) and y.ndim == 1 and bool(np.all(np.mod(y, 1) == 0))
    if not whole or len(y) != count:
        raise DataError(f"{path}: {key} must hold {count} whole-number labels (one per image), got {y.dtype} {y.shape}")
    return y.astype(np.int64)


def _log_npz_roles(path: Path, splits: Arrays, val_size: float, unused: list[str]) -> None:
    n = {s: len(labels) for s, (_, labels) in splits.items()}
    if "val" in splits and "test" in splits:
        roles = f"x_val ({n['val']}) is the validation split and x_test ({n['test']}) the test split; "
        roles += f"data.val_size={val_size} is not used"
    elif "val" in splits:
        roles = f"x_val ({n['val']}) is the test split (the file has no x_test); validation is "
        roles += f"data.val_size={val_size} of x_train"
    else:
        roles = f"x_test ({n['test']}) is the test split; validation is data.val_size={val_size} of x_train"
    log.info("%s: x_train (%d) trains, %s", path, n["train"], roles)
    if unused:
        log.info("%s: arrays not used: %s", path, ", ".join(unused))


def read_image_file(path: str) -> Any:
    """An image folder's file as an RGB PIL image; one line naming the file when it cannot be decoded (a corrupt or
    truncated JPEG), rather than PIL's message without a file name, deep inside the training loop."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path} is not a readable image ({str(e)[:120]}); replace or remove the file") from None


def _imagefolder_splits(cfg: DataConfig) -> Splits:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(
                f"imagefolder not found: looked for {root / split}; set data.root to a folder with "
                "train/<class>/ and val/<class>/ image folders (the ImageNet layout)"
            )
    size = image_size_of(cfg)
    to_uint8 = [T.PILToTensor()]  # ImageFolder already converts every image to RGB
    kind = _augment_kind(cfg)
    resize = _folder_resize(size)
    train_tf = T.Compose([*to_uint8, *([] if kind == "rrc_flip" else resize), *_augmentations(kind, size)])
    eval_tf = T.Compose([*to_uint8, *resize])
    train_all = ImageFolder(str(root / "train"), transform=train_tf, loader=read_image_file)
    val_all = ImageFolder(str(root / "train"), transform=eval_tf, loader=read_image_file)
    test = ImageFolder(str(root / "val"), transform=eval_tf, loader=read_image_file)
    if test.classes != train_all.classes:
        raise DataError(f"{root}/val has classes {test.classes[:5]}... unlike train's; use the same class folders")
    train_idx, val_idx = validation_holdout(len(train_all), cfg)
    return Splits(
        train=Subset(train_all, train_idx.tolist()),
        val=Subset(val_all, val_idx.tolist()),
        test=test,
        num_classes=cfg.num_classes or len(train_all.classes),
        image_size=size,
        mean=_configured_stats(cfg, IMAGENET_MEAN, IMAGENET_STD)[0],
        std=_configured_stats(cfg, IMAGENET_MEAN, IMAGENET_STD)[1],
        class_names=class_names(cfg, cfg.num_classes or len(train_all.classes), train_all.classes),
    )


def _folder_resize(size: int) -> list[T.Transform]:
    """A folder of images' evaluation resize: the shorter side to size / 0.875, then the centre (256 / 224)."""
    return [T.Resize(int(round(size / 0.875)), antialias=True), T.CenterCrop(size)]


def image_as_evaluated(image: Image.Image, cfg: DataConfig) -> torch.Tensor:
    """One image as the run's evaluation split reads its images: uint8 3 x S x S, RGB, S the run's image size.
    Folders of images (``imagefolder``) are resized and centre-cropped as their evaluation transform does; the
    in-memory datasets (digits, CIFAR, npz) are resized whole to S x S, as they are when loaded."""
    rgb = np.array(image.convert("RGB"))  # a grey image becomes three equal channels, as grey data does here
    size = image_size_of(cfg)
    if cfg.name == "imagefolder":
        return T.Compose(_folder_resize(size))(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
    return _to_tensor_images(rgb[None], size)[0]


def batch_split(global_batch: int, micro: int, world_size: int) -> tuple[int, int]:
    """(batch per rank, micro-batches per step). data.batch_size is the global batch: ranks x micro-batches
    must divide it. Micro-batches are strided (x[m::M]), which is exactly how DistributedSampler shards a global
    batch over M ranks, so M micro-batches on one process compute what M DDP ranks compute."""
    if micro < 1 or global_batch % (world_size * micro):
        raise ConfigError(
            f"data.batch_size={global_batch} must be divisible by the {world_size} process(es) "
            f"x train.accumulate_steps={micro}; change one of them"
        )
    return global_batch // world_size, micro


def train_loader(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int, shard: tuple[int, int] | None = None
) -> DataLoader:
    """Shuffled, drop_last (no 1-sample batch-norm batches). Single process (``shard`` None): order seeded by seed
    and epoch. Under DDP, ``shard`` = (rank, world size): DistributedSampler (the same global permutation on every
    rank, each rank a strided shard)."""
    batch_size = min(batch_size, dataset_size(dataset))
    if shard is None:
        return make_loader(
            dataset, batch_size, shuffle=True, seed=seed * 100_003 + epoch, num_workers=num_workers, drop_last=True
        )
    rank, world_size = shard
    sampler: DistributedSampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers)
