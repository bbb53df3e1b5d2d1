"""What the evaluate stage runs: the pipeline's one scoring of the test set.

It scores the registered model version that `train` produced (what users deploy), writes the
stage's DVC files, logs the scores and figures to the training run and tags the version with
them. Promotion, `mnist-pipeline models`, ensembles and the accuracy bench read these numbers:
`score_test_set` is the one function that computes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import load_split
from .inference import predict_proba, to_pixels
from .io import save_png, write_json
from .metrics import (
    confusion_figure,
    confusion_matrix,
    confusion_records,
    figure_image,
    misclassified_grid,
    scores,
    summary,
)
from .params import EvaluateParams
from .registry import describe, load_pyfunc, tag_version
from .tracking import MlflowTracker


@dataclass(frozen=True)
class Figures:
    """The evaluation's figures, as logged to MLflow and written for DVC."""

    confusion: Image.Image  # the confusion matrix with counts
    misclassified: Image.Image  # the grid of misclassified digits


@dataclass(frozen=True)
class TestSetScores:
    """A model's predictions on the test set and the report computed from them."""

    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # (N,)
    probabilities: np.ndarray  # (N, 10)
    report: dict[str, Any]  # metrics.scores: test_accuracy, test_loss, macro_f1, per_class

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)


def score_test_set(model: Any, raw_dir: Path, batch_size: int) -> TestSetScores:
    """Score `model` (an MLflow model or a pixels-in torch module) on the MNIST test set."""
    images, labels = load_split(raw_dir, "test")
    probabilities = predict_proba(model, to_pixels(images), batch_size)
    return TestSetScores(images, labels, probabilities, scores(labels, probabilities))


def evaluate_version(
    tracker: MlflowTracker, name: str, version: int, raw_dir: Path, batch_size: int,
    misclassified_max: int = 100,
) -> tuple[TestSetScores, Figures]:
    """Score version `version` of registered model `name` as it is stored; log the scores and
    figures to the tracker's current run and tag the version with the headline numbers.
    Returns the scores and the figures."""
    result = score_test_set(load_pyfunc(f"models:/{name}/{version}"), raw_dir, batch_size)
    figures = Figures(
        confusion=figure_image(confusion_figure(confusion_matrix(result.labels,
                                                                 result.predicted))),
        misclassified=misclassified_grid(result.images, result.labels, result.probabilities,
                                         misclassified_max))
    headline = summary(result.report)
    tracker.log_metrics(headline)
    tracker.log_dict(result.report, "evaluation/report.json")
    tracker.log_image(figures.confusion, "evaluation/confusion_matrix.png")
    tracker.log_image(figures.misclassified, "evaluation/misclassified.png")
    tag_version(tracker.client(), name, version, {**headline, "evaluated_run": tracker.run_id})
    describe(tracker.client(), name, [version])  # what the registry's pages show
    return result, figures


@dataclass(frozen=True)
class EvaluateOutputs:
    """Where the evaluate stage writes (wired in dvc.yaml)."""

    metrics: Path  # the headline numbers that runs are compared by (a DVC metric)
    report: Path  # those and the per-class scores
    confusion: Path  # one {actual, predicted} record per image (DVC's confusion template)
    misclassified: Path
    confusion_png: Path | None = None  # the matrix with counts, as in MLflow


def run_evaluation(
    params: EvaluateParams, raw_dir: Path, run_info: Mapping[str, Any],
    outputs: EvaluateOutputs, tracker: MlflowTracker,
) -> dict[str, Any]:
    """Evaluate the version that train registered; write the stage's files; return the report."""
    tracker.attach(run_info["run_id"])  # fails early if the store or run is missing
    result, figures = evaluate_version(tracker, run_info["registered_model"],
                                       run_info["version"], raw_dir, params.batch_size,
                                       params.misclassified_max)
    write_json(outputs.metrics, summary(result.report))
    write_json(outputs.report, result.report)
    write_json(outputs.confusion, confusion_records(result.labels, result.predicted))
    save_png(figures.misclassified, outputs.misclassified)
    if outputs.confusion_png is not None:
        save_png(figures.confusion, outputs.confusion_png)
    return result.report
