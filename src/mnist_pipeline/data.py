"""The MNIST files: their names, canonical checksums and shapes, and loading them as arrays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .idx import IdxError, check_array, read_idx


@dataclass(frozen=True)
class FileSpec:
    """One IDX file: its name (decompressed), the MD5 of its content and its shape."""

    name: str
    md5: str
    shape: tuple[int, ...]


# The canonical MD5s are of the decompressed files, whichever mirror served the .gz.
MNIST_FILES: tuple[FileSpec, ...] = (
    FileSpec("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb", (60000, 28, 28)),
    FileSpec("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624", (60000,)),
    FileSpec("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea", (10000, 28, 28)),
    FileSpec("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637", (10000,)),
)
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NUM_CLASSES = 10


def load_split(raw_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) of `split` from `raw_dir`."""
    images_name, labels_name = SPLITS[split]
    images_path, labels_path = Path(raw_dir) / images_name, Path(raw_dir) / labels_name
    images, labels = read_idx(images_path), read_idx(labels_path)
    check_array(images, (None, 28, 28), "uint8", str(images_path))
    check_array(labels, (None,), "uint8", str(labels_path))
    if len(images) != len(labels):
        raise IdxError(
            f"{raw_dir}: {split} split has {len(images)} images but {len(labels)} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise IdxError(f"{labels_path}: label {int(labels.max())} is not a digit 0-9")
    return images, labels.astype(np.int64)
