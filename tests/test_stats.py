"""Statistics on known arrays."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.stats import class_counts, compute_stats, pixel_stats


def test_pixel_stats_on_a_known_array():
    images = np.array([[[0, 255], [255, 0]]], dtype=np.uint8)
    assert pixel_stats(images) == pytest.approx((0.5, 0.5))


def test_pixel_stats_match_float64_numpy():
    images = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    scaled = images.astype(np.float64) / 255
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(scaled.mean(), rel=1e-12)
    assert std == pytest.approx(scaled.std(), rel=1e-12)


def test_empty_images_are_refused():
    with pytest.raises(PipelineError, match="empty image set"):
        pixel_stats(np.zeros((0, 28, 28), np.uint8))


def test_counts():
    assert class_counts(np.array([0, 0, 9]))["0"] == 2
    stats = compute_stats(np.zeros((3, 28, 28), np.uint8), np.array([0, 0, 9]), np.array([1]))
    assert stats["train"] == {"images": 3, "per_class": {**{str(c): 0 for c in range(10)},
                                                         "0": 2, "9": 1}}
    assert stats["test"]["images"] == 1 and stats["mean"] == 0.0
