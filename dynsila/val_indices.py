"""A validation split given as a file of training-set indices (``data.val_indices``).

Why: a published network's confidence thresholds are fitted on the images its authors held out of the training
set, so evaluating it on another held-out draw would fit them on images it was trained on. MSDNet's authors ship
``index.pth``: ``torch.randperm`` over the whole training set, whose last 50,000 (ImageNet) or 5,000 (CIFAR)
entries are their validation images. A file holding a permutation of all ``n`` training indices is read that way
(its last ``n_val`` entries, ``data.val_size``); any other file lists the validation indices themselves.

Read formats: ``.pth`` / ``.pt`` (a tensor, loaded with ``weights_only=True``), ``.npy`` (no pickle), or text
(whitespace-separated integers).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from dynsila.errors import DataError


def read_indices(path: Path) -> np.ndarray:
    """The integers a ``.pth``/``.pt``, ``.npy`` or text file holds, as a 1-d int64 array."""
    if not path.is_file():
        raise DataError(f"data.val_indices file {path} not found; pass the index file that came with the checkpoint")
    try:
        if path.suffix in (".pth", ".pt"):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, torch.Tensor):
                raise ValueError(f"it holds a {type(loaded).__name__}, not a tensor")
            values = loaded.numpy()
        elif path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            values = np.array([int(word) for word in path.read_text().split()], dtype=np.int64)
    except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(
            f"data.val_indices file {path} is not a list of integers ({str(e).splitlines()[0][:80]}); pass a "
            ".pth tensor, a .npy array or a text file of indices"
        ) from None
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
        raise DataError(f"data.val_indices file {path} holds {values.dtype} {values.shape}; it needs 1-d integers")
    return values.astype(np.int64)


def listed_holdout(path: Path, n: int, n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, sorted: val from the file, train the rest of the ``n`` training samples."""
    listed = read_indices(path)
    whole = len(listed) == n and np.array_equal(np.sort(listed), np.arange(n))
    if whole and not 0 < n_val < n:
        raise DataError(
            f"{path} permutes all {n} training samples; data.val_size={n_val} must say how many of its last "
            "entries are validation (50000 for the MSDNet authors' ImageNet index.pth)"
        )
    val = listed[-n_val:] if whole else listed
    if len(val) == 0 or val.min() < 0 or val.max() >= n or len(np.unique(val)) != len(val):
        raise DataError(
            f"{path} does not list distinct indices below {n} (the training set's size); pass the index file made "
            "for this training set"
        )
    train = np.setdiff1d(np.arange(n), val)
    if len(train) == 0:
        raise DataError(f"{path} lists every training sample as validation; pass the validation indices alone")
    return train, np.sort(val)
