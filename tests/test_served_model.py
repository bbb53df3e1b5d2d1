"""The served model's input checks (served_model.refusal), without a server."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_pipeline.served_model import refusal


def _pixels(n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)


def test_pixels_in_range_pass():
    assert refusal(_pixels()) is None
    assert refusal(np.zeros((0, 1, 28, 28), np.float32)) is None
    assert refusal(np.ones((1, 1, 28, 28), np.float64)) is None


@pytest.mark.parametrize("x, message", [
    (_pixels() * 255, "must lie in [0, 1] (divide 8-bit pixels by 255); got values from"),
    (_pixels() - 0.5, "must lie in [0, 1]; got values from -0."),
    (np.where(np.eye(28, dtype=bool), np.nan, 0.5).astype(np.float32).reshape(1, 1, 28, 28),
     "must be finite numbers; 28 are NaN or infinite"),
    (np.full((1, 1, 28, 28), np.inf, np.float32), "784 are NaN or infinite"),
    (_pixels().reshape(2, 784), "expected images of shape (N, 1, 28, 28), got shape (2, 784)"),
    (_pixels()[:, 0], "got shape (2, 28, 28)"),
    (np.zeros((1, 1, 28, 28), np.uint8), "expected floating-point pixels in [0, 1], got dtype"),
])
def test_bad_input_gets_one_short_sentence(x, message):
    reason = refusal(x)
    assert reason is not None and message in reason
    assert len(reason) < 120 and "\n" not in reason
