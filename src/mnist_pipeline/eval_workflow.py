"""The evaluate stage's workflow: score the registered model that `train` produced on the test
set, write the stage's files, log them to the training run and tag the model version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import load_split
from .evaluate import (
    confusion_figure,
    confusion_matrix,
    confusion_records,
    misclassified_grid,
    scores,
)
from .io import atomic_path, write_json
from .params import EvaluateParams
from .registry import load_pyfunc, tag_version
from .tracking import MlflowTracker


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The evaluation report as flat MLflow metric names (per-class scores suffixed _<digit>)."""
    flat = {k: float(v) for k, v in report.items() if k != "per_class"}
    for digit, row in report["per_class"].items():
        for key in ("precision", "recall", "f1"):
            flat[f"test_{key}_{digit}"] = row[key]
    return flat


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities from a loaded MLflow pyfunc model, in batches of raw [0, 1] pixels."""
    pixels = images[:, None].astype(np.float32) / 255.0
    return np.concatenate([np.asarray(model.predict(pixels[i : i + batch_size]))
                           for i in range(0, len(pixels), batch_size)])


@dataclass(frozen=True)
class EvaluateOutputs:
    metrics: Path
    confusion: Path
    misclassified: Path


def run_evaluation(
    params: EvaluateParams, raw_dir: Path, run_info: Mapping[str, Any],
    outputs: EvaluateOutputs, tracker: MlflowTracker,
) -> dict[str, Any]:
    """Evaluate the registered version that train produced; write and log the results."""
    tracker.attach(run_info["run_id"])  # fails early if the store or run is missing
    images, labels = load_split(raw_dir, "test")
    model = load_pyfunc(run_info["registry_uri"])
    probabilities = predict_probabilities(model, images, params.batch_size)
    report = scores(labels, probabilities)
    write_json(outputs.metrics, report)
    write_json(outputs.confusion, confusion_records(labels, probabilities.argmax(1)))
    grid = misclassified_grid(images, labels, probabilities, params.misclassified_max)
    with atomic_path(outputs.misclassified) as tmp:
        grid.save(tmp, format="PNG")

    tracker.log_metrics({f"eval_{k}": v for k, v in flat_metrics(report).items()})
    tracker.log_artifact(outputs.misclassified, "evaluation")
    tracker.log_dict(report, "evaluation/report.json")
    tracker.log_figure(confusion_figure(confusion_matrix(labels, probabilities.argmax(1))),
                       "evaluation/confusion_matrix.png")
    tag_version(tracker.client(), run_info["registered_model"], run_info["version"], {
        "test_accuracy": report["test_accuracy"], "test_loss": report["test_loss"],
        "macro_f1": report["macro_f1"], "evaluated_run": run_info["run_id"],
    })
    return report
