"""MLflow tracking for a study: a parent run per study, a child run per fold.

Runs are addressed by id through :class:`mlflow.MlflowClient`, never through MLflow's global
"active run", so a resumed study logs into the very runs it started and folds cannot log into
each other's runs. Per-epoch metrics go out as one batch per epoch, so tracking costs the
training loop one write per epoch; the loop waits for it before writing the epoch's
checkpoint (see ``Note [log before checkpoint]`` in :mod:`enn_neuro.training.study`).

The tracking URI is the configured one, else ``MLFLOW_TRACKING_URI``, else MLflow's own
default: the local SQLite store ``mlflow.db`` in the current folder. A new experiment in a
SQLite store keeps its artifacts in ``mlartifacts/`` beside the database file, so that a
store and its artifacts move, and are mounted, together.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag

__all__ = ["NullTracker", "StudyTracker"]

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
RUN_KEY_TAG = "enn_neuro.run_key"


class StudyTracker:
    """Creates, resumes and writes the MLflow runs of one study.

    Args:
        tracking_uri: MLflow tracking URI; ``None`` uses ``MLFLOW_TRACKING_URI`` or the default.
        experiment: Experiment name, created if missing.
    """

    def __init__(self, tracking_uri: str | None, experiment: str) -> None:
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=_artifacts_beside(mlflow.get_tracking_uri())
            )

    # runs

    def start_run(
        self,
        name: str,
        run_id: str | None = None,
        parent_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        key: str | None = None,
    ) -> str:
        """Starts a run, or reopens one when resuming; returns the run id.

        Args:
            name: The run's name in the UI.
            run_id: A run to reopen (resuming).
            parent_id: The parent run of a child (fold) run.
            tags: Tags of a new run.
            key: A study-unique key stored as the tag ``enn_neuro.run_key``: a run of this
                experiment that already carries it is reopened instead of creating a twin,
                which covers a kill between creating a run and saving its id.
        """
        if run_id is None and key is not None:
            found = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'"
            )
            run_id = found[0].info.run_id if found else None
        if run_id is not None:
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            logger.info("resuming MLflow run %s (%s)", run_id, name)
            return run_id
        all_tags = dict(tags or {})
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        if key is not None:
            all_tags[RUN_KEY_TAG] = key
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        logger.info(
            "MLflow run %s (%s) in experiment %s", run.info.run_id, name, self.experiment_id
        )
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Flushes pending metrics and marks the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        mlflow.flush_async_logging()
        self.client.set_terminated(run_id, status=status)

    # values

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Logs parameters (values stringified and truncated to MLflow's limit).

        A resumed run already holds them; MLflow refuses to change a parameter, so only new
        keys are sent.
        """
        existing = self.client.get_run(run_id).data.params
        batch = [
            Param(key, str(value)[:MAX_PARAM_LENGTH])
            for key, value in params.items()
            if key not in existing
        ]
        for start in range(0, len(batch), 100):  # MLflow's batch limit for parameters
            self.client.log_batch(run_id, params=batch[start : start + 100], synchronous=True)

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int, synchronous: bool = True
    ) -> None:
        """Logs finite scalar metrics at ``step`` in one batch.

        Args:
            run_id: The run.
            metrics: Name → value; NaN, infinities and non-numbers are left out.
            step: The step (epoch) of every value.
            synchronous: Return once the store holds them; otherwise in the background,
                flushed by :meth:`end_run`.
        """
        timestamp = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), timestamp, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        ]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(
                run_id, metrics=batch[start : start + 1000], synchronous=synchronous
            )

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which ``key`` was logged in ``run_id`` (a resumed run's epochs)."""
        return {metric.step for metric in self.client.get_metric_history(run_id, key)}

    def latest_metrics(self, run_id: str) -> dict[str, float]:
        """Each metric's latest value in ``run_id`` (what the MLflow UI's run table shows)."""
        return dict(self.client.get_run(run_id).data.metrics)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Sets tags (mode, layer type, model, cohort hash, ...)."""
        batch = [RunTag(key, str(value)) for key, value in tags.items()]
        self.client.log_batch(run_id, tags=batch, synchronous=True)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Copies a local file into the run's artifacts."""
        self.client.log_artifact(run_id, str(path), artifact_path)

    def has_model(self, run_id: str) -> bool:
        """Whether ``run_id`` has logged a model (a resumed fold's, before a kill)."""
        experiment_id = self.client.get_run(run_id).info.experiment_id
        models = self.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=1
        )
        return len(models) > 0

    def log_model(self, run_id: str, model, example_input) -> None:
        """Logs a (fused, plain) PyTorch model with a signature inferred from one input.

        Args:
            run_id: The fold's run.
            model: A module in eval mode.
            example_input: A numpy array ``(B, C, *S)`` the model accepts.
        """
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model(torch.from_numpy(example_input)).numpy()
        signature = infer_signature(example_input, output)
        # MLflow's log_model logs into the active run; reopen this fold's run just for it. Its
        # warning about pickle is for models of unknown origin; this one is our own
        pytorch_logger = logging.getLogger("mlflow.pytorch")
        previous_level = pytorch_logger.level
        pytorch_logger.setLevel(logging.ERROR)
        try:
            with mlflow.start_run(run_id=run_id):
                mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=signature,
                    # MLflow's default 'pt2' format traces one input shape; the traced ResNet then
                    # fails on another batch size (torch 2.13, MLflow 3.17): pickle the module
                    serialization_format="pickle",
                    # inferring requirements imports and inspects the environment: slow, and the
                    # model only needs torch and this package
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "enn-neuro"],
                )
        finally:
            pytorch_logger.setLevel(previous_level)


class NullTracker:
    """Stands in for :class:`StudyTracker` on ranks other than 0: every call does nothing."""

    def start_run(self, name: str, run_id: str | None = None, *args, **kwargs) -> str:
        return run_id or ""

    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return set()

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def _artifacts_beside(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside the database of a SQLite store.

    ``None`` (MLflow's own choice) for a server or a file store, which place them themselves.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri.removeprefix(prefix)).resolve()
    return (database.parent / "mlartifacts").as_uri()
