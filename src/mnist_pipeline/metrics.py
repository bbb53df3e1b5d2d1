"""Scores of a model's predictions: accuracy, loss, per-class precision/recall/F1, the
confusion matrix, and the figures people look at (confusion matrix, misclassified digits).

Pure functions on arrays; `evaluate_stage` wires them to files, DVC and MLflow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data import NUM_CLASSES


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """counts[true, predicted] as int64 (num_classes, num_classes)."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_scores(matrix: np.ndarray) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class (0 where undefined)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(0), matrix.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0,
                      2 * precision * recall / (precision + recall), 0.0)
    return {
        str(c): {"precision": float(precision[c]), "recall": float(recall[c]),
                 "f1": float(f1[c]), "support": int(actual[c])}
        for c in range(len(matrix))
    }


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers (no per-class detail): what runs are compared by."""
    return {k: float(report[k]) for k in ("test_accuracy", "test_loss", "macro_f1")}


def scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class scores and macro F1 from class probabilities."""
    predicted = probabilities.argmax(1)
    matrix = confusion_matrix(labels, predicted, probabilities.shape[1])
    per_class = per_class_scores(matrix)
    true_p = probabilities[np.arange(len(labels)), labels].astype(np.float64)
    return {
        "test_accuracy": float((predicted == labels).mean()),
        "test_loss": float(-np.log(np.clip(true_p, 1e-12, None)).mean()),
        "macro_f1": float(np.mean([s["f1"] for s in per_class.values()])),
        "per_class": per_class,
    }


def confusion_records(labels: np.ndarray, predicted: np.ndarray) -> list[dict[str, int]]:
    """One {actual, predicted} row per image: the input of DVC's `confusion` template."""
    return [{"actual": int(a), "predicted": int(p)} for a, p in zip(labels, predicted,
                                                                     strict=True)]


def misclassified_grid(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, max_images: int = 100,
    columns: int = 10, scale: int = 3,
) -> Image.Image:
    """A grid of the misclassified digits (most confident mistakes first) under a title that
    says what it shows, each captioned 'true->predicted  probability'."""
    predicted = probabilities.argmax(1)
    everything = np.flatnonzero(predicted != labels)
    wrong = everything[np.argsort(-probabilities[everything, predicted[everything]],
                                  kind="stable")][:max_images]
    cell, caption, header = 28 * scale, 14, 32
    rows = max(1, -(-len(wrong) // columns))
    grid = Image.new("L", (columns * cell, header + rows * (cell + caption)), color=255)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((4, 2), f"Misclassified test digits: {len(wrong)} of {len(everything)} shown, "
                      "most confident first", fill=0, font=font)
    draw.text((4, 16), "caption: true->predicted  model's probability of the prediction",
              fill=96, font=font)
    for n, i in enumerate(wrong):
        x, y = (n % columns) * cell, header + (n // columns) * (cell + caption)
        digit = Image.fromarray(255 - images[i]).resize((cell, cell), Image.NEAREST)
        grid.paste(digit, (x, y))
        text = f"{labels[i]}->{predicted[i]}  {probabilities[i, predicted[i]]:.0%}"
        draw.text((x + 2, y + cell + 1), text, fill=0, font=font)
    if not len(wrong):
        draw.text((4, header + 4), "no misclassified digits", fill=0, font=font)
    return grid


def training_curves_figure(history: list[dict[str, float]]) -> Any:
    """Loss, accuracy and learning rate per epoch (integer epochs), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("loss", ("train_loss", "val_loss")),
              ("accuracy", ("train_accuracy", "val_accuracy")), ("learning rate", ("lr",)))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            if key in history[0]:
                ax.plot(epochs, [row[key] for row in history], marker="o", label=key)
        ax.set(title=title, xlabel="epoch")
        if len(epochs) <= 20:  # every epoch a tick; never fractional epochs
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_image(figure: Any) -> Image.Image:
    """A matplotlib figure rendered once into an image (then closed), to log and to save."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image


def confusion_figure(matrix: np.ndarray) -> Any:
    """A matplotlib figure of the confusion matrix with counts (for MLflow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    shade = np.log1p(matrix)  # on a log scale, so that a few errors still show
    ax.imshow(shade, cmap="Blues")
    for (t, p), count in np.ndenumerate(matrix):
        ax.text(p, t, str(count), ha="center", va="center", fontsize=7,
                color="white" if shade[t, p] > 0.6 * shade.max() else "black")
    ax.set(xlabel="predicted", ylabel="actual", xticks=range(len(matrix)),
           yticks=range(len(matrix)), title="Confusion matrix (test set)")
    fig.tight_layout()
    return fig
