"""Batched prediction: the one loop that turns a model and many images into outputs.

`predict_proba` serves everything that scores raw pixels (the evaluate stage, ensembles,
`mnist-pipeline predict`, the accuracy bench), for an MLflow model or a torch module alike;
`predict_logits` is the same loop over normalised tensors on the training device (validation
during training, the speed bench).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from .augment import shifted_views
from .data import NUM_CLASSES
from .runtime import autocast

# Batches of 200 keep a CPU's activations in cache, which larger ones do not.
BATCH_SIZE = 200
Batch = TypeVar("Batch", np.ndarray, torch.Tensor)


def in_batches(predict: Callable[[Batch], Batch], inputs: Batch, batch_size: int) -> list[Batch]:
    """`predict` applied to consecutive slices of `inputs` of at most `batch_size` rows."""
    return [predict(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) -> float32 pixels (N, 1, 28, 28) in [0, 1]: a model's input."""
    return images[:, None].astype(np.float32) / 255.0


def predict_proba(model: Any, pixels: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """Class probabilities (N, 10) for pixels (N, 1, 28, 28) in [0, 1], from a loaded MLflow
    model (its `predict`) or a torch module that takes pixels (`DeployableModel`)."""
    if isinstance(model, nn.Module):
        model.eval()

        def predict(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(batch)).numpy()
    else:
        def predict(batch: np.ndarray) -> np.ndarray:
            return np.asarray(model.predict(batch), dtype=np.float32)

    chunks = in_batches(predict, np.ascontiguousarray(pixels, dtype=np.float32), batch_size)
    return np.concatenate(chunks) if chunks else np.empty((0, NUM_CLASSES), np.float32)


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int, amp: str = "none", tta: bool = False
) -> torch.Tensor:
    """Logits (N, 10) for every row of normalised x, in eval mode, as float32. With `tta`, the
    log of the probabilities averaged over 1-pixel-shifted views (as the served model does)."""
    model.eval()

    def predict(xb: torch.Tensor) -> torch.Tensor:
        if not tta:
            return model(xb).float()
        probs = torch.stack([torch.softmax(model(v).float(), 1) for v in shifted_views(xb)])
        return probs.mean(0).clamp_min(1e-12).log()

    with autocast(x.device, amp):
        chunks = in_batches(predict, x, batch_size)
    return torch.cat(chunks) if chunks else torch.empty(0, NUM_CLASSES, device=x.device)
