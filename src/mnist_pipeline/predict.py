"""Predict digits in image files with a logged or registered MLflow model.

Each file is read and turned into an MNIST-style digit on its own; a file that cannot be read
gets an error row and the others are still predicted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageError, load_image, to_mnist
from .inference import predict_proba
from .registry import load_pyfunc

FILES_AT_ONCE = 256  # files read before their digits are predicted (bounded memory)


def predict_files(model_uri: str, paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """Yield {file, digit, probability} or {file, error} for each path, in order."""
    model = load_pyfunc(model_uri)
    for start in range(0, len(paths), FILES_AT_ONCE):
        chunk = paths[start : start + FILES_AT_ONCE]
        rows: list[dict[str, Any]] = []
        pixels = []
        for path in chunk:
            try:
                digit = to_mnist(load_image(path))
                if not digit.any():  # a model would still name a digit, often confidently
                    raise ImageError(f"{path}: no digit found (the image is blank: nothing "
                                     "stands out from its background)")
                pixels.append(digit)
                rows.append({"file": str(path)})
            except ImageError as exc:
                rows.append({"file": str(path), "error": str(exc)})
        if pixels:
            probs = predict_proba(model, np.stack(pixels)[:, None])
            good = (r for r in rows if "error" not in r)
            for row, p in zip(good, probs, strict=True):
                row.update(digit=int(p.argmax()), probability=float(p.max()))
        yield from rows
