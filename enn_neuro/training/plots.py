"""Figures logged with every fold: confusion matrix, ROC curve, learning curves (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

__all__ = ["plot_confusion_matrix", "plot_learning_curves", "plot_roc_curve"]


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path
) -> Path:
    """Saves the confusion matrix (rows: true class) as a PNG."""
    figure, axes = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(
        ax=axes, colorbar=False
    )
    return _save(figure, path)


def plot_roc_curve(
    labels: Sequence[int], probabilities: np.ndarray, classes: Sequence[str], path: Path
) -> Path:
    """Saves one-vs-rest ROC curves (the positive class only for binary tasks) as a PNG."""
    labels = np.asarray(labels)
    figure, axes = plt.subplots(figsize=(4.5, 4))
    shown = [1] if len(classes) == 2 else range(len(classes))
    for index in shown:
        if 0 < (labels == index).sum() < len(labels):
            RocCurveDisplay.from_predictions(
                labels == index, probabilities[:, index], name=str(classes[index]), ax=axes
            )
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    return _save(figure, path)


def plot_learning_curves(history: Sequence[dict[str, float]], metric: str, path: Path) -> Path:
    """Saves training and validation loss, and the validation selection metric, per epoch."""
    epochs = np.arange(1, len(history) + 1)
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axes.plot(epochs, [h["train/task_loss"] for h in history], label="train")
    loss_axes.plot(epochs, [h["val/loss"] for h in history], label="validation")
    loss_axes.set(xlabel="epoch", ylabel="task loss")
    loss_axes.legend()
    metric_axes.plot(epochs, [h[f"val/{metric}"] for h in history])
    metric_axes.set(xlabel="epoch", ylabel=f"validation {metric}")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
