from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from enn_neuro.training.metrics import (
    classification_metrics,
    regression_metrics,
    selection_direction,
    summarize_folds,
)


def test_binary_classification_metrics_by_hand():
    # true: 3 controls, 2 patients; predicted: one control called patient
    labels = [0, 0, 0, 1, 1]
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]])
    metrics = classification_metrics(labels, probabilities, ["control", "patient"])
    assert metrics["confusion_matrix"] == [[2, 1], [0, 2]]
    assert metrics["sensitivity"] == 1.0
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1))
    assert metrics["roc_auc"] == 1.0  # every patient scores above every control


def test_multiclass_metrics_are_macro_averages():
    labels = [0, 1, 2, 2]
    probabilities = np.eye(3)[[0, 1, 1, 2]]  # one class-2 subject called class 1
    metrics = classification_metrics(labels, probabilities, ["a", "b", "c"])
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["confusion_matrix"][2] == [0, 1, 1]


def test_auc_is_nan_with_one_class_present():
    metrics = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["c", "p"])
    assert math.isnan(metrics["roc_auc"])


def test_regression_metrics_by_hand():
    metrics = regression_metrics([60, 70, 80], [62, 70, 77])
    assert metrics["mae"] == pytest.approx(5 / 3)
    assert metrics["rmse"] == pytest.approx(math.sqrt(13 / 3))
    assert metrics["r2"] == pytest.approx(1 - 13 / 200)
    assert metrics["pearson_r"] == pytest.approx(
        stats.pearsonr([60, 70, 80], [62, 70, 77]).statistic
    )


def test_summary_is_mean_with_student_t_interval():
    folds = [{"mae": v, "confusion_matrix": [[1]]} for v in (4.0, 5.0, 6.0, 5.0)]
    summary = summarize_folds(folds)
    half = stats.t.ppf(0.975, 3) * np.std([4, 5, 6, 5], ddof=1) / 2
    assert summary["mae"]["mean"] == 5.0
    assert summary["mae"]["ci_low"] == pytest.approx(5.0 - half)
    assert summary["mae"]["ci_high"] == pytest.approx(5.0 + half)
    assert "confusion_matrix" not in summary


def test_selection_direction_and_unknown_metric():
    assert selection_direction("balanced_accuracy") and not selection_direction("mae")
    with pytest.raises(ValueError, match="selection metric must be one of .*got 'auc'"):
        selection_direction("auc")
