"""Experiment tracking: MLflow runs for studies (parent) and folds (children)."""

from enn_neuro.tracking.mlflow_tracker import NullTracker, StudyTracker

__all__ = ["NullTracker", "StudyTracker"]
