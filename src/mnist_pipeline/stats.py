"""Dataset statistics: pixel mean and standard deviation (scaled to [0, 1]) and class counts.

Later stages read normalisation from the JSON these produce, never from literals.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .data import NUM_CLASSES
from .errors import PipelineError
from .io import read_json


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and population std of uint8 pixels scaled to [0, 1], accumulated in float64."""
    if images.size == 0:
        raise PipelineError("cannot compute statistics of an empty image set")
    # Exact integer sums from a histogram: no float rounding however many pixels there are.
    counts = np.bincount(images.reshape(-1), minlength=256).astype(np.uint64)
    levels = np.arange(256, dtype=np.uint64)
    n = int(counts.sum())
    mean = int(counts @ levels) / n
    var = int(counts @ levels**2) / n - mean * mean
    return mean / 255.0, float(np.sqrt(max(var, 0.0))) / 255.0


def class_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return {str(c): int(n) for c, n in enumerate(counts)}


def compute_stats(
    train_images: np.ndarray, train_labels: np.ndarray, test_labels: np.ndarray
) -> dict[str, Any]:
    """The stats document: normalisation from the training images, counts for both splits."""
    mean, std = pixel_stats(train_images)
    return {
        "mean": mean,
        "std": std,
        "train": {"images": int(len(train_labels)), "per_class": class_counts(train_labels)},
        "test": {"images": int(len(test_labels)), "per_class": class_counts(test_labels)},
    }


def read_stats(path: str | Path) -> dict[str, Any]:
    """The stats document at `path`, refused (naming the file and key) unless its
    normalisation can be used: a finite mean and a finite std above zero."""
    stats = read_json(path, keys=("mean", "std"))
    for key in ("mean", "std"):
        value = stats[key]
        usable = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and (key == "mean" or value > 0))
        if not usable:
            raise PipelineError(f"{path}: {key} is {value!r}, not a usable "
                                f"{'mean' if key == 'mean' else 'std (> 0)'}: run `dvc repro "
                                "compute-stats` again")
    return stats
