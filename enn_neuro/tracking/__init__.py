"""Experiment tracking: MLflow runs for studies (parent) and folds (children)."""

from enn_neuro.tracking.mlflow_tracker import StudyTracker

__all__ = ["StudyTracker"]
