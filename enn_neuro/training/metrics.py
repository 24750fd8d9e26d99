"""Metrics per fold and per study: classification, regression, and confidence intervals.

scikit-learn computes every per-fold metric; only the study summary (mean ± 95% confidence
interval over folds, from Student's t) is written here, because it is a few lines of SciPy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as skm

__all__ = [
    "classification_metrics",
    "regression_metrics",
    "selection_direction",
    "summarize_folds",
]

# metric → whether a larger value is better, for model selection and early stopping
_HIGHER_IS_BETTER = {
    "balanced_accuracy": True,
    "roc_auc": True,
    "f1": True,
    "sensitivity": True,
    "specificity": True,
    "accuracy": True,
    "top5_accuracy": True,
    "mae": False,
    "rmse": False,
    "r2": True,
    "pearson_r": True,
    "loss": False,
}


REGRESSION_METRICS = frozenset({"mae", "rmse", "r2", "pearson_r", "loss"})
CLASSIFICATION_METRICS = frozenset(_HIGHER_IS_BETTER) - {"mae", "rmse", "r2", "pearson_r"}


def selection_direction(metric: str) -> bool:
    """Whether a larger ``metric`` is better.

    Raises:
        ValueError: For a metric that cannot select models.
    """
    if metric not in _HIGHER_IS_BETTER:
        raise ValueError(
            f"selection metric must be one of {sorted(_HIGHER_IS_BETTER)}, got {metric!r}"
        )
    return _HIGHER_IS_BETTER[metric]


def classification_metrics(
    labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str]
) -> dict[str, float | list]:
    """Accuracy, balanced accuracy, ROC AUC, sensitivity, specificity, F1, confusion matrix.

    Accuracy is top-1; above five classes top-5 accuracy is added.

    Binary tasks take the second class as positive; multiclass tasks report macro averages
    (sensitivity = macro recall, specificity = macro true-negative rate, one-vs-rest AUC).

    Args:
        labels: True class indices, ``(N,)``.
        probabilities: Predicted class probabilities, ``(N, K)``.
        class_names: The K class names, in index order.

    Returns:
        Scalar metrics, plus ``confusion_matrix`` as nested lists (rows: true class).
    """
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    n_classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    matrix = skm.confusion_matrix(labels, predictions, labels=list(range(n_classes)))
    true_positive = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    true_negative = matrix.sum() - support - predicted + true_positive
    negatives = matrix.sum() - support
    recall = _safe_divide(true_positive, support)
    specificity_per_class = _safe_divide(true_negative, negatives)
    result: dict[str, float | list] = {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(np.nanmean(recall)),
    }
    if n_classes == 2:
        result["sensitivity"] = float(recall[1])
        result["specificity"] = float(recall[0])
        result["f1"] = float(skm.f1_score(labels, predictions, pos_label=1, zero_division=0))
    else:
        result["sensitivity"] = float(np.nanmean(recall))
        result["specificity"] = float(np.nanmean(specificity_per_class))
        result["f1"] = float(skm.f1_score(labels, predictions, average="macro", zero_division=0))
    if n_classes > 5:
        result["top5_accuracy"] = float(
            skm.top_k_accuracy_score(labels, probabilities, k=5, labels=list(range(n_classes)))
        )
    result["roc_auc"] = _roc_auc(labels, probabilities, n_classes)
    result["confusion_matrix"] = matrix.tolist()
    return result


def regression_metrics(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """MAE, RMSE, R² and Pearson's r.

    Args:
        targets: True values, ``(N,)``.
        predictions: Predicted values, ``(N,)``.
    """
    targets = np.asarray(targets, dtype=float)
    predictions = np.asarray(predictions, dtype=float)
    pearson = (
        float(stats.pearsonr(targets, predictions).statistic)
        if len(targets) > 1 and np.std(targets) > 0 and np.std(predictions) > 0
        else float("nan")
    )
    return {
        "mae": float(skm.mean_absolute_error(targets, predictions)),
        "rmse": float(math.sqrt(skm.mean_squared_error(targets, predictions))),
        "r2": float(skm.r2_score(targets, predictions)) if len(targets) > 1 else float("nan"),
        "pearson_r": pearson,
    }


def summarize_folds(
    fold_metrics: Sequence[Mapping[str, float]], confidence: float = 0.95
) -> dict[str, dict[str, float]]:
    """Mean and confidence interval of each scalar metric over folds.

    The interval is mean ± t_{n−1} · s / √n (Student's t over the n fold values); folds are
    not independent samples, so it describes the spread of this cross-validation rather than
    a guarantee about new data.

    Args:
        fold_metrics: One mapping of metric → value per fold; non-scalar values are skipped.
        confidence: Level of the interval.

    Returns:
        metric → ``{"mean", "std", "ci_low", "ci_high", "n"}`` (NaN bounds for one fold).
    """
    names = [k for k, v in fold_metrics[0].items() if isinstance(v, (int, float))]
    summary = {}
    for name in names:
        values = np.array([m[name] for m in fold_metrics if not _is_nan(m.get(name))], float)
        n = len(values)
        mean = float(values.mean()) if n else float("nan")
        std = float(values.std(ddof=1)) if n > 1 else float("nan")
        half_width = (
            float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))
            if n > 1
            else float("nan")
        )
        summary[name] = {
            "mean": mean,
            "std": std,
            "ci_low": mean - half_width,
            "ci_high": mean + half_width,
            "n": n,
        }
    return summary


def _roc_auc(labels: np.ndarray, probabilities: np.ndarray, n_classes: int) -> float:
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")  # undefined with one class in the fold
    if n_classes == 2:
        return float(skm.roc_auc_score(labels, probabilities[:, 1]))
    if len(present) < n_classes:
        return float("nan")
    return float(skm.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
