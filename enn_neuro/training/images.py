"""The 2D pipeline's study plan: an ImageNet-layout folder on the shared engine.

``root/train/<class>/*`` trains, a class-stratified ``data.val_fraction`` of it (held out,
never trained on) selects the model and stops early, and ``root/val/<class>/*`` is the test
set, predicted once with the selected model: the ImageNet validation set reports, it never
selects. Everything else (bp and local mode, DDP, stage-parallel local mode, checkpoints,
resume, MLflow) is the engine the 3D pipeline uses.

Unreadable images (``data.on_corrupt``): ``report`` checks every file before training and
stops listing every bad one (under torchrun each rank checks a share of the files, and every
rank stops with the same list); ``skip`` starts at once and skips a file that fails to load,
with a warning naming it, and marks the item that replaced it (``"skipped"`` in the batch,
see :class:`~enn_neuro.data.images2d.ImageFolderDataset`). Either way no epoch crashes on a
bad file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from enn_neuro.config import ImageConfig
from enn_neuro.data.cohort import CohortError, Problem
from enn_neuro.data.images2d import (
    ImageFolderDataset,
    check_images,
    eval_transform,
    scan_image_folder,
    train_transform,
)
from enn_neuro.training.distributed import DistributedContext
from enn_neuro.training.study import FoldData, StudyPlan, make_loader, study_tags

__all__ = ["image_plan"]

logger = logging.getLogger(__name__)

Sample = tuple[Path, int]


def image_plan(config: ImageConfig, context: DistributedContext) -> StudyPlan:
    """Scans and checks the folders, holds out the selection images, and builds the loaders.

    Raises:
        FileNotFoundError: If ``root/train`` or ``root/val`` is missing.
        ValueError: If the two folders do not have the same classes.
        CohortError: With ``on_corrupt: report``, listing every unreadable image.
    """
    data = config.data
    train_samples, classes = scan_image_folder(data.root / "train")
    test_samples, test_classes = scan_image_folder(data.root / "val")
    if test_classes != classes:
        missing = sorted(set(classes) ^ set(test_classes))
        raise ValueError(
            f"{data.root}: train/ and val/ must hold the same class folders; they differ in "
            f"{missing[:10]}"
        )
    if data.max_train_per_class:
        train_samples = _per_class(train_samples, data.max_train_per_class, config.study.seed)

    # pre-flight: every file read once (by one rank), every problem listed, before any training
    if data.on_corrupt == "report":
        problems = _check_shared([path for path, _ in train_samples + test_samples], context)
        if problems:
            raise CohortError(data.root, problems)

    # selection images: a class-stratified share of train/, never trained on
    labels = [label for _, label in train_samples]
    counts = np.bincount(labels, minlength=len(classes))
    n_val = int(np.ceil(data.val_fraction * len(labels)))
    if counts.min() < 2 or n_val < len(classes):
        raise ValueError(
            f"{data.root / 'train'}: holding out data.val_fraction={data.val_fraction} per "
            f"class needs 2 images of every class and at least one selection image per class "
            f"({len(classes)}); the smallest class has {counts.min()}, the hold-out {n_val}"
        )
    train_index, val_index = train_test_split(
        np.arange(len(train_samples)),
        test_size=data.val_fraction,
        stratify=labels,
        random_state=config.study.seed,
    )
    parts = {
        "train": [train_samples[i] for i in sorted(train_index)],
        "val": [train_samples[i] for i in sorted(val_index)],
        "test": test_samples,
    }
    table = pd.DataFrame(
        [
            (image_id(path, data.root), 0, role)
            for role, samples in parts.items()
            for path, _ in samples
        ],
        columns=["subject_id", "fold", "role"],
    )
    logger.info(
        "%s: %d classes; %d training, %d selection, %d test images",
        data.root,
        len(classes),
        *(len(parts[role]) for role in ("train", "val", "test")),
    )

    def fold_data(fold: int, learner_context: DistributedContext) -> FoldData:
        return FoldData(
            loaders=_loaders(config, parts, classes, learner_context),
            classes=classes,
            num_outputs=len(classes),
            description=", ".join(f"{len(v)} {k}" for k, v in parts.items()) + " images",
            model_info={
                "image_size": data.image_size,
                "resize_size": data.resize_size,
                "in_channels": config.in_channels,
            },
        )

    return StudyPlan(
        folds=[0],
        tags=study_tags(config, [_listing_hash(parts)]),
        tables={"splits.tsv": table},
        fold_data=fold_data,
        classes=list(classes),
    )


def image_id(path: Path, root: Path) -> str:
    """An image's id in tables and predictions: its path below the data root."""
    return str(path.relative_to(root))


def _loaders(
    config: ImageConfig,
    parts: dict[str, Sequence[Sample]],
    classes: list[str],
    context: DistributedContext,
) -> dict[str, DataLoader]:
    data = config.data
    on_error = "skip" if data.on_corrupt == "skip" else "raise"
    training_transform = train_transform(
        data.image_size, scale=data.crop_scale, ratio=data.crop_ratio, hflip_p=data.hflip_p
    )
    evaluation_transform = eval_transform(data.image_size, data.resize_size)
    loaders = {}
    for role, samples in parts.items():
        transform = training_transform if role == "train" else evaluation_transform
        dataset = ImageFolderDataset(samples, classes, transform, on_error=on_error)
        loaders[role] = make_loader(dataset, role, config.training, data.num_workers, context)
    return loaders


def _check_shared(paths: Sequence[Path], context: DistributedContext) -> list[Problem]:
    """:func:`check_images` split over the ranks: each reads every W-th file once.

    Returns:
        Every rank's problems, on every rank, in the order of ``paths``, so that all ranks
        raise the same error.
    """
    found = check_images(paths[context.rank :: context.world_size])
    position = {path: index for index, path in enumerate(paths)}
    problems = [problem for share in context.all_gather(found) for problem in share]
    problems.sort(key=lambda problem: position[problem.path])
    if context.enabled and context.is_main:
        logger.info(
            "checked %d images on %d ranks: %d unreadable",
            len(paths),
            context.world_size,
            len(problems),
        )
    return problems


def _per_class(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` images of each class, drawn by ``seed`` (for small runs)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    kept = []
    for label in sorted(by_class):
        members = by_class[label]
        chosen = rng.choice(len(members), size=min(limit, len(members)), replace=False)
        kept += [members[i] for i in sorted(chosen)]
    return kept


def _listing_hash(parts: dict[str, Sequence[Sample]]) -> str:
    """Identifies the data by file names, labels and sizes.

    Hashing the content of a million images at every start would cost more than it tells.
    """
    digest = hashlib.sha256()
    for role in sorted(parts):
        for path, label in parts[role]:
            digest.update(f"{role}\t{path.name}\t{label}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()
