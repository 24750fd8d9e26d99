"""Applying a trained model to new images: from a checkpoint or from an MLflow run.

The model is fused to plain layers (:func:`enn_neuro.enn.to_plain`) for inference at no
ENN overhead. Images go through the exact preprocessing the model was trained with: the
MONAI chain of a 3D cohort model (NIfTI volumes), or the evaluation transform (resize and
centre crop) of a 2D image model (any image PIL reads).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from enn_neuro.config import validate_config
from enn_neuro.data.cohort import Cohort
from enn_neuro.data.dataset import make_dataset
from enn_neuro.data.images2d import ImageFolderDataset, eval_transform, scan_image_folder
from enn_neuro.data.transforms import PreprocessingConfig
from enn_neuro.enn import to_plain
from enn_neuro.models import create_model
from enn_neuro.training.checkpoint import load_checkpoint
from enn_neuro.training.loop import MAX_PROBABILITY_COLUMNS, add_probability_columns, softmax
from enn_neuro.training.metrics import classification_metrics, regression_metrics

__all__ = [
    "TrainedModel",
    "compact_probabilities",
    "evaluate_cohort",
    "evaluate_image_folder",
    "load_trained_model",
    "per_subject",
    "predict_images",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A fused model with what is needed to use it.

    Attributes:
        model: Plain-layer network in eval mode, ``(B, C, *S) → (B, num_outputs)``.
        task: ``"classification"`` or ``"regression"``.
        classes: Class names in output order (classification).
        target_mean: Regression outputs are z-scores of the target: value = z · std + mean.
        target_std: See ``target_mean``.
        preprocessing: The training preprocessing of a 3D cohort model, else ``None``.
        image_transform: The evaluation transform of a 2D image model, else ``None``.
    """

    model: nn.Module
    task: str
    classes: list[str]
    target_mean: float
    target_std: float
    preprocessing: PreprocessingConfig | None = None
    image_transform: Callable | None = None

    @property
    def is_2d(self) -> bool:
        """Whether the model reads 2D images (else 3D NIfTI volumes)."""
        return self.image_transform is not None


def load_trained_model(
    checkpoint: str | Path | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
) -> TrainedModel:
    """Loads a model from a ``best.pt`` checkpoint or from a fold's MLflow run.

    Args:
        checkpoint: A ``best.pt`` written by training.
        run_id: An MLflow fold run that logged ``model`` and ``model_info.json``.
        tracking_uri: Where that run lives (default: ``MLFLOW_TRACKING_URI`` or ``mlflow.db``).

    Raises:
        ValueError: If neither or both sources are given, or the file is not a ``best.pt``.
        FileNotFoundError: If the checkpoint does not exist.
    """
    if (checkpoint is None) == (run_id is None):
        raise ValueError("give exactly one of a checkpoint or an MLflow run id")
    if checkpoint is not None:
        saved = load_checkpoint(checkpoint)
        _check_model_checkpoint(saved, checkpoint)
        config = validate_config(saved["config"], source=str(checkpoint))
        task = config.data.task
        classes = list(saved["classes"])
        model = create_model(
            config.model.name,
            spatial_dims=config.spatial_dims,
            in_channels=config.in_channels,
            num_classes=len(classes) if task == "classification" else 1,
            layer=config.model.layer,
            norm=config.model.norm,
            base_width=config.model.base_width,
        )
        model.load_state_dict(saved["training"]["model"])
        two_d = config.pipeline == "images2d"
        return TrainedModel(
            model=to_plain(model).eval(),
            task=task,
            classes=classes,
            target_mean=float(saved["training"]["target_mean"]),
            target_std=float(saved["training"]["target_std"]),
            preprocessing=None if two_d else config.preprocessing,
            image_transform=(
                eval_transform(config.data.image_size, config.data.resize_size) if two_d else None
            ),
        )

    import mlflow
    import mlflow.pytorch

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model", map_location="cpu").eval()
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model_info.json", dst_path=folder
        )
        info = json.loads(Path(path).read_text())
    trained = TrainedModel(
        model=model,
        task=info["task"],
        classes=list(info["classes"]),
        target_mean=float(info["target_mean"]),
        target_std=float(info["target_std"]),
    )
    if "image_size" in info:  # a 2D image model
        trained.image_transform = eval_transform(info["image_size"], info["resize_size"])
    else:
        preprocessing = {
            k: tuple(v) if isinstance(v, list) else v for k, v in info["preprocessing"].items()
        }
        trained.preprocessing = PreprocessingConfig(**preprocessing)
    return trained


@torch.no_grad()
def predict_images(
    trained: TrainedModel,
    images: Sequence[str | Path],
    subject_ids: Sequence[str] | None = None,
    batch_size: int = 4,
    cache_dir: str | Path | None = None,
    session_ids: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """Predicts every image; one row per image.

    Args:
        trained: From :func:`load_trained_model`.
        images: NIfTI files (3D models) or image files (2D models).
        subject_ids: One per image; when ``None``, the BIDS ``sub-<label>`` entity of the
            file name, else the file name without extension.
        batch_size: Images per forward pass.
        cache_dir: Preprocessing cache (shared with training when the same).
        session_ids: One per image (``None`` for none), written as ``session_id``; when
            ``None``, the file name's BIDS ``ses-<label>`` entity, if any.

    Returns:
        ``subject_id``, ``session_id``, ``image``, ``prediction`` and, for classification,
        ``prob_<class>``.
    """
    images = [str(Path(p).resolve()) for p in images]
    if subject_ids is None:
        subject_ids = [_entity(p, "sub") or _stem(p) for p in images]
    if session_ids is None:
        session_ids = [_entity(p, "ses") for p in images]
    if trained.is_2d:
        # labels are not read: every image gets class 0
        labelled = [(Path(path), 0) for path in images]
        dataset = ImageFolderDataset(labelled, trained.classes, trained.image_transform)
    else:
        samples = [
            {"image": path, "subject_id": subject, "image_path": path}
            for path, subject in zip(images, subject_ids, strict=True)
        ]
        dataset = make_dataset(samples, trained.preprocessing, None, cache_dir)
    outputs = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        outputs.append(trained.model(batch["image"]).float().numpy())  # (B, num_outputs)
    outputs = np.concatenate(outputs)
    sessions = [s or "" for s in session_ids]
    frame = pd.DataFrame({"subject_id": list(subject_ids), "session_id": sessions, "image": images})
    if trained.task == "classification":
        probabilities = softmax(outputs)  # (N, num_classes)
        frame["prediction"] = [trained.classes[i] for i in probabilities.argmax(axis=1)]
        frame = add_probability_columns(frame, probabilities, trained.classes, every_class=True)
    else:
        frame["prediction"] = outputs[:, 0] * trained.target_std + trained.target_mean
    return frame


def compact_probabilities(frame: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """``frame`` as a CSV gets it: beyond 100 classes, the top five instead of every class.

    The ``prob_<class>`` columns of :func:`predict_images` and :func:`per_subject` become
    ``top<k>_class`` and ``top<k>_prob`` (:func:`add_probability_columns`), as in a study's
    ``predictions.csv``; with fewer classes, or no such columns, ``frame`` is unchanged.
    """
    columns = [f"prob_{name}" for name in classes]
    if len(classes) <= MAX_PROBABILITY_COLUMNS or not set(columns) <= set(frame.columns):
        return frame
    probabilities = frame[columns].to_numpy()  # (N, num_classes)
    return add_probability_columns(frame.drop(columns=columns), probabilities, classes)


def per_subject(frame: pd.DataFrame, trained: TrainedModel) -> pd.DataFrame:
    """One row per subject from :func:`predict_images`' rows, as the studies score subjects.

    A subject's class probabilities (or predicted values) are the mean over its images; the
    predicted class is the most probable one.

    Returns:
        ``subject_id``, ``n_images``, ``prediction`` and, for classification,
        ``prob_<class>``; subjects in order of first appearance.
    """
    by_subject = frame.groupby("subject_id", sort=False)
    table = pd.DataFrame({"n_images": by_subject.size()})
    if trained.task == "classification":
        columns = [f"prob_{name}" for name in trained.classes]
        means = by_subject[columns].mean()
        table["prediction"] = [trained.classes[i] for i in means.to_numpy().argmax(axis=1)]
        table[columns] = means
    else:
        table["prediction"] = by_subject["prediction"].mean()
    return table.reset_index()


def evaluate_cohort(trained: TrainedModel, cohort: Cohort, **kwargs) -> tuple[pd.DataFrame, dict]:
    """Predicts a labelled cohort and scores it per subject (mean over a subject's images).

    Returns:
        The per-image predictions (with a ``target`` column) and the metrics.
    """
    frame = predict_images(
        trained, [r.image for r in cohort.records], [r.subject_id for r in cohort.records], **kwargs
    )
    frame["target"] = [r.target for r in cohort.records]
    subjects = per_subject(frame, trained)
    targets = frame.groupby("subject_id", sort=False)["target"]
    if trained.task == "classification":
        columns = [f"prob_{c}" for c in trained.classes]
        labels = [trained.classes.index(t) for t in targets.first()]
        metrics = classification_metrics(labels, subjects[columns].to_numpy(), trained.classes)
    else:
        # a subject's target is the mean over its images (ages at repeat scans)
        metrics = regression_metrics(targets.mean().to_numpy(), subjects["prediction"].to_numpy())
    return frame, metrics


def evaluate_image_folder(
    trained: TrainedModel, root: str | Path, **kwargs
) -> tuple[pd.DataFrame, dict]:
    """Predicts a labelled image folder ``root/<class>/<files>`` and scores it per image.

    Args:
        trained: A 2D classification model from :func:`load_trained_model`.
        root: The folder; its class names must be among the model's classes.
        **kwargs: Passed to :func:`predict_images` (``batch_size``).

    Returns:
        The per-image predictions (with a ``target`` column) and the metrics.

    Raises:
        ValueError: If the model is not a 2D classifier or a class folder is unknown to it.
    """
    if not trained.is_2d or trained.task != "classification":
        raise ValueError(f"{root}: an image folder is scored by a 2D image classifier only")
    samples, folder_classes = scan_image_folder(root)
    unknown = sorted(set(folder_classes) - set(trained.classes))
    if unknown:
        raise ValueError(
            f"{root}: class folders {unknown} are not classes of the model "
            f"({len(trained.classes)} classes, e.g. {trained.classes[:5]})"
        )
    images = [path for path, _ in samples]
    identifiers = [str(path.relative_to(root)) for path in images]
    frame = predict_images(trained, images, identifiers, **kwargs)
    frame["target"] = [folder_classes[label] for _, label in samples]
    index_of = {name: index for index, name in enumerate(trained.classes)}
    labels = [index_of[name] for name in frame["target"]]
    columns = [f"prob_{name}" for name in trained.classes]
    metrics = classification_metrics(labels, frame[columns].to_numpy(), trained.classes)
    return frame, metrics


def _stem(path: str) -> str:
    """A file's name without its extension (``.nii.gz`` counted as one)."""
    name = Path(path).name
    return name.split(".nii")[0] if ".nii" in name else Path(name).stem


def _entity(path: str, key: str) -> str | None:
    """A BIDS entity of a file name: ``sub-01_ses-2_T1w.nii.gz`` has ``sub-01`` and ``ses-2``."""
    for part in Path(path).name.split("_"):
        if part.startswith(f"{key}-") and len(part) > len(key) + 1:
            return part.split(".")[0]
    return None


def _check_model_checkpoint(saved: dict, path: str | Path) -> None:
    """Refuses a checkpoint that is not a fold's ``best.pt``, saying what it is instead."""
    if {"config", "classes", "training"} <= saved.keys():
        return
    if "loop" in saved:
        raise ValueError(
            f"{path} is a last.pt (the training state for --resume); predict from the fold's "
            "best.pt, the model selected on validation"
        )
    raise ValueError(
        f"{path}: not a best.pt written by enn-neuro training (keys {sorted(map(str, saved))})"
    )
