"""Datasets as train / val / test splits of uint8 images; normalisation happens on the device, per batch.

- ``digits``: scikit-learn's embedded handwritten digits (1,797 real 8x8 images, 10 classes), no download.
- ``cifar10`` / ``cifar100``: the official Python pickle folders under ``data.root``.
- ``npz``: uint8 NHWC arrays ``x_train``/``y_train`` plus ``x_val``/``y_val`` and/or ``x_test``/``y_test``.
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the ImageNet layout).

Validation is always held out of train (``data.val_size``), is used for model selection and for fitting
early-exit thresholds, and never overlaps test. Test is never used for fitting anything.
"""

from __future__ import annotations

import pickle
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2 as T

from dynsila.config import DataConfig
from dynsila.errors import DataError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
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
    arrays = loaders[cfg.name](cfg)
    size = image_size_of(cfg)
    x_train, y_train = arrays["train"]
    train_idx, val_idx = _holdout(len(y_train), cfg.val_size, cfg.split_seed)
    x = {"train": x_train[train_idx], "val": x_train[val_idx], "test": arrays["test"][0]}
    y = {"train": y_train[train_idx], "val": y_train[val_idx], "test": arrays["test"][1]}
    images = {k: _to_tensor_images(v, size) for k, v in x.items()}
    labels = {k: torch.as_tensor(v, dtype=torch.int64) for k, v in y.items()}
    num_classes = num_classes_of(cfg) or int(max(int(v.max()) for v in labels.values() if len(v)) + 1)
    for split, lab in labels.items():
        if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
            raise DataError(
                f"{cfg.name}: {split} labels span {int(lab.min())}..{int(lab.max())} but the data "
                f"has {num_classes} classes; fix the labels or set data.num_classes"
            )
    mean, std = _stats(cfg.name, images["train"])
    augment = _train_transform(cfg, size)
    return Splits(
        train=ArrayDataset(images["train"], labels["train"], augment),
        val=ArrayDataset(images["val"], labels["val"]),
        test=ArrayDataset(images["test"], labels["test"]),
        num_classes=num_classes,
        image_size=size,
        mean=mean,
        std=std,
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


# --- helpers ------------------------------------------------------------------------------------------------


def _holdout(n: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(val_size * n)) if val_size < 1 else int(val_size)
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


def _stats(name: str, train_images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    known = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
    if name in known:
        return known[name]
    x = train_images.float().div(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _augment_kind(cfg: DataConfig) -> str:
    return DEFAULT_AUGMENT[cfg.name] if cfg.augment == "auto" else cfg.augment


def _augmentations(kind: str, size: int) -> list[T.Transform]:
    """The random training transforms of an augmentation kind, on images already ``size`` square (except rrc)."""
    pad = max(1, round(size / 8))  # 4 pixels at CIFAR's 32
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


def _load_npz(cfg: DataConfig) -> Arrays:
    path = Path(cfg.root)
    if not path.is_file():
        raise DataError(
            f"npz dataset not found: looked for {path}; set data.root to an .npz file with uint8 "
            "NHWC x_train/y_train and x_val/y_val or x_test/y_test"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k.startswith(("x_", "y_"))}
    except Exception as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}); re-create it") from None
    if "x_train" not in arrays or "y_train" not in arrays:
        raise DataError(f"{path} has no x_train / y_train arrays (found {sorted(arrays)}); add them")
    # The held-out evaluation split is x_test when present, else x_val (validation is carved from train).
    test_key = "test" if "x_test" in arrays else "val"
    if f"x_{test_key}" not in arrays or f"y_{test_key}" not in arrays:
        raise DataError(f"{path} has neither x_test/y_test nor x_val/y_val; add an evaluation split")
    for k, v in arrays.items():
        if k.startswith("x_") and (v.dtype != np.uint8 or v.ndim != 4):
            raise DataError(f"{path}: {k} must be uint8 N x H x W x C, got {v.dtype} {v.shape}")
    return {
        "train": (arrays["x_train"], arrays["y_train"].astype(np.int64)),
        "test": (arrays[f"x_{test_key}"], arrays[f"y_{test_key}"].astype(np.int64)),
    }


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
    resize = [T.Resize(int(round(size / 0.875)), antialias=True), T.CenterCrop(size)]  # 256 / centre 224
    train_tf = T.Compose([*to_uint8, *([] if kind == "rrc_flip" else resize), *_augmentations(kind, size)])
    eval_tf = T.Compose([*to_uint8, *resize])
    train_all = ImageFolder(str(root / "train"), transform=train_tf)
    val_all = ImageFolder(str(root / "train"), transform=eval_tf)
    test = ImageFolder(str(root / "val"), transform=eval_tf)
    if test.classes != train_all.classes:
        raise DataError(f"{root}/val has classes {test.classes[:5]}... unlike train's; use the same class folders")
    train_idx, val_idx = _holdout(len(train_all), cfg.val_size, cfg.split_seed)
    return Splits(
        train=Subset(train_all, train_idx.tolist()),
        val=Subset(val_all, val_idx.tolist()),
        test=test,
        num_classes=cfg.num_classes or len(train_all.classes),
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
