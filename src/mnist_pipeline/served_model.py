"""The model that MLflow loads and serves: the exported network behind checks of its input.

MLflow copies this file into every logged model (a "model from code": nothing is pickled) and
runs it on load, so it imports nothing from this package. The network itself is a complete
`mlflow.pytorch` model in the `pt2` format, stored as the artifact `network` and loaded with
`mlflow.pytorch.load_model`, which refuses a `pt2` archive holding pickled objects when
MLFLOW_ALLOW_PICKLE_DESERIALIZATION is false.

`predict` takes pixels scaled to [0, 1], shape (N, 1, 28, 28), and returns class
probabilities (N, 10). It refuses, with a one-line message (HTTP 400 from `mlflow models
serve`), what would otherwise give a confident wrong answer: 8-bit values (0-255),
non-finite values and other shapes.
"""

import os
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

NETWORK = "network"  # the artifact holding the mlflow.pytorch model
SHAPE = (1, 28, 28)  # one image, after the batch dimension
# Set by `mlflow models serve` in the scoring server's process (mlflow.pyfunc.scoring_server).
_SERVING_MODEL_PATH = "__pyfunc_model_path__"


def refusal(x: np.ndarray) -> str | None:
    """Why `x` is not a batch of pixels in [0, 1], in one sentence; None if it is."""
    if x.ndim != 4 or tuple(x.shape[1:]) != SHAPE:
        return f"expected images of shape (N, 1, 28, 28), got shape {tuple(x.shape)}"
    if not np.issubdtype(x.dtype, np.floating):
        return f"expected floating-point pixels in [0, 1], got dtype {x.dtype}"
    if x.size == 0:
        return None
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        return f"pixel values must be finite numbers; {bad} are NaN or infinite"
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        hint = " (divide 8-bit pixels by 255)" if high > 1.0 else ""
        return f"pixel values must lie in [0, 1]{hint}; got values from {low:g} to {high:g}"
    return None


class ServedModel(PythonModel):
    def load_context(self, context: Any) -> None:
        self.network = mlflow.pytorch.load_model(context.artifacts[NETWORK])
        if os.environ.get(_SERVING_MODEL_PATH):
            # The scoring server puts str(input) in front of every error it returns; at
            # numpy's default threshold a single image prints as 784 numbers.
            np.set_printoptions(threshold=16, edgeitems=2)

    # np.ndarray: a type hint from which MLflow infers no signature (the logged one holds).
    def predict(self, context: Any, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        x = np.asarray(model_input)
        reason = refusal(x)
        if reason:
            raise MlflowException.invalid_parameter_value(reason)
        with torch.no_grad():
            out = self.network(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return out.numpy()


mlflow.models.set_model(ServedModel())
