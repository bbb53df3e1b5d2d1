"""The MLflow model registry: logging and registering trained models, and loading them back.

Models are stored in the `pt2` format (torch.export): a traced graph plus weights, loadable
without pickle (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false), with a dynamic batch dimension.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .model import DeployableModel

INPUT_SHAPE = (-1, 1, 28, 28)
MODEL_NAME_IN_RUN = "model"


@dataclass(frozen=True)
class RegisteredModel:
    """Where a logged model lives: its run, its URIs and its registered version."""

    run_id: str
    model_uri: str
    registered_model: str
    version: int

    @property
    def registry_uri(self) -> str:
        return f"models:/{self.registered_model}/{self.version}"


def deployable(net: nn.Module, mean: float, std: float) -> nn.Module:
    """A CPU, eval-mode copy of `net` that takes raw [0, 1] pixels and returns probabilities."""
    net = copy.deepcopy(net).to("cpu", memory_format=torch.contiguous_format).float()
    return DeployableModel(net, mean, std).eval()


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), INPUT_SHAPE)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def log_and_register(
    model: nn.Module, example: np.ndarray, registered_model: str, run_id: str
) -> RegisteredModel:
    """Log `model` to the active run and register it as a new version of `registered_model`.

    `example` (float32, (B, 1, 28, 28), B > 1) is stored as the input example; a batch of
    more than one image keeps the exported graph's batch dimension dynamic.
    """
    import mlflow

    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError("the input example must hold at least two images")
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_NAME_IN_RUN,
        serialization_format="pt2",
        signature=signature(),
        input_example=example.astype(np.float32),
        registered_model_name=registered_model,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
    )
    return RegisteredModel(
        run_id=run_id, model_uri=info.model_uri, registered_model=registered_model,
        version=int(info.registered_model_version),
    )


def load_pyfunc(uri: str) -> Any:
    import mlflow

    return mlflow.pyfunc.load_model(uri)
