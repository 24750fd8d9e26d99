"""A cross-validation study, end to end: cohort → checks → splits → folds → summary.

Everything that can be checked is checked before the first epoch: the configuration (on
load), the cohort (every image read once), the splits (leakage). Each fold then trains,
selects its model on its validation subjects, and predicts its test subjects once. The study
directory holds everything a run produces (plain files beside MLflow):

    <output_dir>/<study name>/
        config.yaml      resolved configuration
        splits.tsv       subject, fold, role
        study.json       MLflow run ids and fold status (for --resume)
        fold-<k>/        last.pt, best.pt, predictions.csv, metrics.json, figures
        summary.json     mean and 95% confidence interval of every metric over folds
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from enn_neuro.config import Config, ImageConfig, TrainingConfig, flatten, save_config
from enn_neuro.data.cohort import Cohort, load_cohort
from enn_neuro.data.dataset import make_dataset
from enn_neuro.data.splits import make_splits, read_split_table, write_split_table
from enn_neuro.data.validation import ValidationReport, validate_cohort
from enn_neuro.enn import to_plain
from enn_neuro.files import remove_stale_temporaries, write_text_atomic
from enn_neuro.tracking import NullTracker, StudyTracker
from enn_neuro.training.distributed import (
    DistributedContext,
    EpochSampler,
    ShardSampler,
    check_global_batch,
    distributed_session,
)
from enn_neuro.training.learner import Learner
from enn_neuro.training.loop import (
    default_metric,
    epoch_seed,
    evaluate,
    fit,
    predict_loader,
    seed_everything,
)
from enn_neuro.training.metrics import classification_metrics, summarize_folds
from enn_neuro.training.pipeline import StagePipeline
from enn_neuro.training.plots import plot_confusion_matrix, plot_learning_curves, plot_roc_curve

__all__ = [
    "FoldData",
    "StudyError",
    "StudyPlan",
    "StudyResult",
    "check_stage_parallel",
    "cohort_plan",
    "make_loader",
    "prepare_cohort",
    "run_plan",
    "run_study",
    "study_tags",
]

logger = logging.getLogger(__name__)

# Note [log before checkpoint]:
#     An epoch's metrics reach the MLflow store (a synchronous batch) before the epoch's
#     last.pt is written. A kill before the checkpoint re-runs the epoch on resume, with the
#     same seeds; a kill after it loses nothing. The only window left, a kill between the two,
#     would log the epoch twice: on resume the epochs the run already holds are not logged
#     again, so every fold's history has each epoch exactly once.

# Note [run keys]:
#     A run's id reaches study.json only after MLflow created the run, so a kill between the
#     two would leave a run that a resume never reopens, beside a twin it creates. Every run
#     therefore carries a key, the study's uid (saved in study.json before any run exists)
#     and its role; a resume that finds no saved id looks the key up before creating a run.

MAX_CLASSES_PLOTTED = 20  # confusion matrices and ROC curves beyond this are unreadable
CONFUSION_JSON = "confusion_matrix.json"  # the counts behind the figure


class StudyError(RuntimeError):
    """A study cannot start or continue (existing directory, changed config, ...)."""


@dataclass
class StudyResult:
    """Per-fold test metrics and their summary."""

    study_dir: Path
    parent_run_id: str
    fold_metrics: dict[int, dict[str, float]]
    summary: dict[str, dict[str, float]]


@dataclass
class FoldData:
    """Everything one fold trains and tests on.

    Attributes:
        loaders: ``train`` (sharded batches), ``val`` (model selection), ``test`` (once).
        classes: Class names in output order (empty for regression).
        num_outputs: Classes, or 1 for regression.
        target_mean: Mean of the training targets (regression).
        target_std: Their standard deviation (regression).
        description: What the fold holds, for the log.
        model_info: Written beside the model (``model_info.json``): what inference needs.
    """

    loaders: dict[str, DataLoader]
    classes: list[str]
    num_outputs: int
    target_mean: float = 0.0
    target_std: float = 1.0
    description: str = ""
    model_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyPlan:
    """What a pipeline brings to a study; :func:`run_plan` does the rest.

    Attributes:
        folds: The folds (one for a single train/validation/test split).
        tags: MLflow tags of every run (mode, layer, model, data hash, ...).
        tables: File name → table written to the study folder and logged (e.g. the splits).
        fold_data: Builds a fold's loaders, given the fold and the learner's context.
        classes: Class names (empty for regression), for the checks before the first fold.
    """

    folds: list[int]
    tags: dict[str, str]
    tables: dict[str, pd.DataFrame]
    fold_data: Callable[[int, DistributedContext], FoldData]
    classes: list[str] = field(default_factory=list)


def prepare_cohort(config: Config) -> tuple[Cohort, ValidationReport]:
    """Reads and validates the configured cohort; raises listing every problem."""
    data = config.data
    cohort = load_cohort(data.cohort, data.target, data.task, data.classes, data.image_column)
    n_folds = None if data.split_table else data.n_folds
    report = validate_cohort(cohort, n_folds=n_folds)
    report.raise_if_problems()
    logger.info("%s", report.summary())
    return cohort, report


def run_study(
    config: Config | ImageConfig, resume: bool = False, folds: Sequence[int] | None = None
) -> StudyResult:
    """Runs (or resumes) a study: a 3D cohort's cross-validation, or a 2D image folder.

    Args:
        config: The validated configuration.
        resume: Continue the study in its directory: finished folds are kept, the running
            fold continues from its last checkpoint, in the same MLflow runs.
        folds: Only these folds (``enn-neuro train`` runs one); all when ``None``.

    Returns:
        Test metrics per fold and their summary.

    Raises:
        CohortError: The cohort has problems (before any training).
        StudyError: The directory holds another study, or there is nothing to resume.
        NonFiniteLossError: A loss diverged; the runs are marked failed.
    """
    training = config.training
    with distributed_session(training.device, training.dist_timeout_s) as (context, device):
        check_stage_parallel(config, context)
        if config.spatial_dims == 2:
            from enn_neuro.training.images import image_plan

            plan = image_plan(config, context)
        else:
            plan = cohort_plan(config)
        return run_plan(config, plan, context, device, resume, folds)


def cohort_plan(config: Config) -> StudyPlan:
    """The 3D pipeline's plan: a validated cohort cut into leakage-checked subject folds."""
    cohort, report = prepare_cohort(config)
    content_hashes = report.content_hashes()  # the leakage check compares image content too
    if config.data.split_table:
        splits = read_split_table(config.data.split_table, cohort, content_hashes)
    else:
        splits = make_splits(
            cohort,
            n_folds=config.data.n_folds,
            val_fraction=config.data.val_fraction,
            seed=config.study.seed,
            stratify_by=config.data.stratify_by,
            content_hashes=content_hashes,
        )

    def fold_data(fold: int, learner_context: DistributedContext) -> FoldData:
        part = splits[splits["fold"] == fold]
        subjects = {
            role: part.loc[part["role"] == role, "subject_id"].tolist()
            for role in ("train", "val", "test")
        }
        train_targets = [float(s["label"]) for s in cohort.to_samples(subjects["train"])]
        classification = config.data.task == "classification"
        return FoldData(
            loaders=_loaders(config, cohort, subjects, learner_context),
            classes=cohort.classes,
            num_outputs=len(cohort.classes) if classification else 1,
            # regression targets are z-scored with the training subjects' statistics only
            target_mean=float(np.mean(train_targets)),
            target_std=float(np.std(train_targets)),
            description=", ".join(f"{len(v)} {k}" for k, v in subjects.items()) + " subjects",
            model_info={"preprocessing": config.resolved()["preprocessing"]},
        )

    return StudyPlan(
        folds=sorted(int(f) for f in splits["fold"].unique()),
        tags=study_tags(config, list(content_hashes.values())),
        tables={"splits.tsv": splits},
        fold_data=fold_data,
        classes=list(cohort.classes),
    )


def run_plan(
    config: Config | ImageConfig,
    plan: StudyPlan,
    context: DistributedContext,
    device: torch.device,
    resume: bool = False,
    folds: Sequence[int] | None = None,
) -> StudyResult:
    """Runs a plan's folds with tracking, checkpoints and resume, and summarises them."""
    # the study folder: every rank checks, rank 0 writes after the barrier
    main = context.is_main
    study_dir = config.study.output_dir / config.study.name
    _check_plan(config, plan, context)
    state = _check_study(study_dir, config, resume)
    _check_same_data(study_dir, state, plan)
    context.barrier()
    folds = plan.folds if folds is None else list(folds)
    unknown = sorted(set(folds) - set(plan.folds))
    if unknown:
        raise ValueError(f"folds {unknown} do not exist; the splits have folds {plan.folds}")
    if main:
        study_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, study_dir / "config.yaml")
        for name, table in plan.tables.items():
            write_split_table(table, study_dir / name)
    # the state first: every run below is tagged with its key (Note [run keys])
    _write_state(study_dir, state, main)

    # the parent run (rank 0 only)
    tracker = (
        StudyTracker(config.tracking.tracking_uri, config.tracking.experiment)
        if main
        else NullTracker()
    )
    parent_id = tracker.start_run(
        config.study.name, state.get("parent_run_id"), tags=plan.tags, key=f"{state['uid']}/study"
    )
    state["parent_run_id"] = parent_id
    _write_state(study_dir, state, main)
    tracker.log_params(parent_id, flatten(config.resolved()))
    tracker.set_tags(parent_id, plan.tags)
    for name in ["config.yaml", *plan.tables]:
        tracker.log_artifact(parent_id, study_dir / name)

    # the folds, each in a child run
    fold_metrics: dict[int, dict[str, float]] = {}
    try:
        for fold in folds:
            fold_state = state["folds"].setdefault(str(fold), {})
            if fold_state.get("status") == "finished":
                metrics_path = study_dir / f"fold-{fold}" / "metrics.json"
                fold_metrics[fold] = json.loads(metrics_path.read_text())
                logger.info("fold %d: already finished, kept", fold)
                continue
            run_id = tracker.start_run(
                f"{config.study.name}-fold{fold}",
                fold_state.get("run_id"),
                parent_id,
                plan.tags,
                key=f"{state['uid']}/fold-{fold}",
            )
            fold_state.update(run_id=run_id, status="running")
            _write_state(study_dir, state, main)
            try:
                fold_metrics[fold] = _run_fold(
                    config, plan, fold, study_dir, tracker, run_id, resume, context, device
                )
            except BaseException as err:
                tracker.end_run(
                    run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                )
                raise
            # the run is closed (its metrics flushed) before the fold counts as finished:
            # a resume skips finished folds and would never close it
            tracker.end_run(run_id)
            fold_state["status"] = "finished"
            _write_state(study_dir, state, main)
            context.barrier()
    except BaseException as err:
        tracker.end_run(parent_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise

    # the study summary, on the parent run, over every finished fold (also those of earlier
    # invocations, e.g. one `train --fold k` per fold)
    for fold in plan.folds:
        if fold not in fold_metrics and state["folds"].get(str(fold), {}).get("status") == (
            "finished"
        ):
            fold_metrics[fold] = json.loads(
                (study_dir / f"fold-{fold}" / "metrics.json").read_text()
            )
    summary = summarize_folds([fold_metrics[f] for f in sorted(fold_metrics)])
    if not main:
        return StudyResult(study_dir, parent_id, fold_metrics, summary)
    (study_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    study_metrics = {}
    for name, values in summary.items():
        for statistic in ("mean", "ci_low", "ci_high", "std"):
            study_metrics[f"study/{name.removeprefix('test/')}_{statistic}"] = values[statistic]
    # a resume after a kill between here and the parent's end finds this summary logged and
    # does not log it twice; a summary over more folds replaces the old one (NaNs, such as
    # the interval of a single fold, are never logged)
    logged = tracker.latest_metrics(parent_id) if resume else {}
    finite = {name: value for name, value in study_metrics.items() if math.isfinite(value)}
    if any(logged.get(name) != value for name, value in finite.items()):
        tracker.log_metrics(parent_id, study_metrics, step=0)
    tracker.log_artifact(parent_id, study_dir / "summary.json")
    for path in _pooled_confusion_matrix(study_dir, sorted(fold_metrics)):
        tracker.log_artifact(parent_id, path)
    tracker.end_run(parent_id)
    _log_summary(summary)
    return StudyResult(study_dir, parent_id, fold_metrics, summary)


def _run_fold(
    config: Config | ImageConfig,
    plan: StudyPlan,
    fold: int,
    study_dir: Path,
    tracker: StudyTracker,
    run_id: str,
    resume: bool,
    context: DistributedContext,
    device: torch.device,
) -> dict[str, float]:
    main = context.is_main
    fold_dir = study_dir / f"fold-{fold}"
    if main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(fold_dir)  # only rank 0 writes here, and not yet
    tracker.log_params(run_id, {**flatten(config.resolved()), "fold": fold})
    tracker.log_artifact(run_id, study_dir / "config.yaml")

    # data: stage-parallel ranks split the network, not the data, so each holds a plain learner
    stage_parallel = config.training.stage_parallel
    learner_context = DistributedContext() if stage_parallel else context
    data = plan.fold_data(fold, learner_context)
    loaders, classes = data.loaders, data.classes
    logger.info("fold %d: %s", fold, data.description)

    # model
    seed_everything(epoch_seed(config.study.seed, fold, -1))
    learner = Learner(
        config,
        data.num_outputs,
        device,
        target_mean=data.target_mean,
        target_std=data.target_std,
        context=learner_context,
    )
    pipeline = None
    if stage_parallel:
        example = loaders["train"].dataset[0]["image"]  # (C, *S)
        pipeline = StagePipeline(learner, context, (config.training.batch_size, *example.shape))

    # train, selecting on validation only; see Note [log before checkpoint]
    logged_epochs = tracker.logged_steps(run_id, "train/loss") if resume else set()

    def log_epoch(metrics: dict[str, float], epoch: int) -> None:
        if epoch not in logged_epochs:
            tracker.log_metrics(run_id, metrics, step=epoch, synchronous=True)

    result = fit(
        learner,
        loaders["train"],
        loaders["val"],
        fold,
        fold_dir,
        classes,
        log_epoch,
        resume,
        context=context,
        pipeline=pipeline,
    )
    if stage_parallel and not main:
        return {}  # rank 0 holds the gathered network and tests it

    # test: once, with the best model
    best = torch.load(fold_dir / "best.pt", map_location=device, weights_only=True)
    learner.load_weights(best["training"])
    predictions = predict_loader(learner, loaders["test"])
    test_metrics = evaluate(learner, predictions, classes, prefix="test/")
    test_metrics["best_epoch"] = result.best_epoch
    if not main:
        return test_metrics
    table = predictions.table(config.data.task, classes)
    table.to_csv(fold_dir / "predictions.csv", index=False)
    (fold_dir / "metrics.json").write_text(json.dumps(test_metrics, indent=2))
    # a resume after a kill between here and the fold's end finds the test metrics, and
    # perhaps the model, in the run already: each is logged once
    if not (resume and result.epochs_run in tracker.logged_steps(run_id, "test/loss")):
        tracker.log_metrics(run_id, test_metrics, step=result.epochs_run)

    # artifacts
    figures = [
        plot_learning_curves(
            result.history, default_metric(config), fold_dir / "learning_curves.png"
        )
    ]
    if config.data.task == "classification" and len(classes) <= MAX_CLASSES_PLOTTED:
        by_subject = table.groupby("subject_id", sort=False)
        probabilities = by_subject[[f"prob_{c}" for c in classes]].mean().to_numpy()
        labels = [classes.index(t) for t in by_subject["target"].first()]
        matrix = classification_metrics(labels, probabilities, classes)["confusion_matrix"]
        figures.append(_write_confusion_counts(fold_dir / CONFUSION_JSON, classes, matrix))
        figures.append(plot_confusion_matrix(matrix, classes, fold_dir / "confusion_matrix.png"))
        figures.append(plot_roc_curve(labels, probabilities, classes, fold_dir / "roc_curve.png"))
    for path in [fold_dir / "predictions.csv", fold_dir / "metrics.json", *figures]:
        tracker.log_artifact(run_id, path)
    model_info = {
        "classes": classes,
        "task": config.data.task,
        "target_mean": learner.target_mean,
        "target_std": learner.target_std,
        **data.model_info,
    }
    (fold_dir / "model_info.json").write_text(json.dumps(model_info, indent=2))
    tracker.log_artifact(run_id, fold_dir / "model_info.json")
    if config.tracking.log_model and not (resume and tracker.has_model(run_id)):
        fused = to_plain(learner.model).cpu().eval()
        example = loaders["test"].dataset[0]["image"][None].numpy()  # (1, C, *S)
        tracker.log_model(run_id, fused, example)
    shown = {
        k.removeprefix("test/"): v
        for k, v in test_metrics.items()
        if "block" not in k and k != "best_epoch"
    }
    logger.info(
        "fold %d test (model of epoch %d): %s",
        fold,
        result.best_epoch + 1,  # epochs count from 1 in log lines, from 0 in metrics
        ", ".join(f"{k} {v:.4f}" for k, v in shown.items()),
    )
    return test_metrics


def _pooled_confusion_matrix(study_dir: Path, folds: list[int]) -> list[Path]:
    """The folds' confusion matrices summed (each test subject counted once), JSON and PNG.

    Returns:
        The files written, none where the folds have no matrix (regression, many classes).
    """
    paths = [study_dir / f"fold-{fold}" / CONFUSION_JSON for fold in folds]
    if not paths or not all(path.exists() for path in paths):
        return []
    saved = [json.loads(path.read_text()) for path in paths]
    classes = saved[0]["classes"]
    matrix = np.sum([np.array(s["matrix"], dtype=np.int64) for s in saved], axis=0).tolist()
    counts = _write_confusion_counts(study_dir / CONFUSION_JSON, classes, matrix, folds=folds)
    figure = plot_confusion_matrix(matrix, classes, study_dir / "confusion_matrix.png")
    return [counts, figure]


def _write_confusion_counts(path: Path, classes: list[str], matrix: list, **extra) -> Path:
    """Writes a confusion matrix's counts (rows: true class) as JSON; returns ``path``."""
    counts = {"classes": classes, "rows": "true class", "matrix": matrix, **extra}
    path.write_text(json.dumps(counts, indent=2))
    return path


def _loaders(
    config: Config, cohort: Cohort, subjects: dict[str, list[str]], context: DistributedContext
) -> dict[str, DataLoader]:
    """Training batches sharded as in ``Note [global batch]``; evaluation in ordered shards."""
    data, training = config.data, config.training
    augmentation = config.augmentation if config.augmentation.enabled else None
    if data.cache_dir is None and data.num_workers > 0:
        logger.warning(
            "data.cache_dir is null and data.num_workers is %d: each training worker keeps "
            "its own in-memory cache and starts afresh every epoch, so every epoch "
            "preprocesses every volume again; set data.cache_dir to cache on disk",
            data.num_workers,
        )
    loaders = {}
    for role in ("train", "val", "test"):
        dataset = make_dataset(
            cohort.to_samples(subjects[role]),
            config.preprocessing,
            augmentation if role == "train" else None,
            data.cache_dir,
        )
        loaders[role] = make_loader(dataset, role, training, data.num_workers, context)
    return loaders


def make_loader(
    dataset: Dataset,
    role: str,
    training: TrainingConfig,
    num_workers: int,
    context: DistributedContext,
) -> DataLoader:
    """The loader of one role: sharded global batches for ``train``, ordered shards otherwise.

    See ``Note [global batch]`` in :mod:`enn_neuro.training.distributed`.
    """
    if role == "train":
        sampler = EpochSampler(len(dataset), training.batch_size, context)
        batch_size = training.batch_size // context.world_size
    else:
        sampler = ShardSampler(len(dataset), context)
        batch_size = training.eval_batch_size or training.batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # training workers start afresh each epoch, seeded from the epoch's seed: kept alive,
        # they would carry their augmentation state across epochs and a resumed run would
        # draw differently
        persistent_workers=num_workers > 0 and role != "train",
    )


def _check_plan(config: Config | ImageConfig, plan: StudyPlan, context: DistributedContext) -> None:
    """Checks what would otherwise fail inside the first fold.

    By then the study folder and its MLflow runs exist, and a corrected retry would be
    refused as an existing study.

    Raises:
        ValueError: For a batch that does not divide among the ranks, or top-5 selection
            with five classes or fewer.
    """
    if not config.training.stage_parallel:  # stage-parallel ranks split the model, not data
        check_global_batch(config.training.batch_size, context)
    if default_metric(config) == "top5_accuracy" and len(plan.classes) <= 5:
        raise ValueError(
            f"training.selection_metric 'top5_accuracy' needs more than 5 classes, got "
            f"{len(plan.classes)}"
        )


def _check_study(study_dir: Path, config: Config | ImageConfig, resume: bool) -> dict[str, Any]:
    """The study's saved state when resuming, a fresh one otherwise; reads, never writes."""
    state_path = study_dir / "study.json"
    if resume:
        if not state_path.exists():
            raise StudyError(f"nothing to resume: {state_path} does not exist")
        state = json.loads(state_path.read_text())
        if state["config_fingerprint"] != config.fingerprint():
            raise StudyError(
                f"the configuration differs from the one {study_dir} was started with "
                f"(see {study_dir / 'config.yaml'}); resume with the same config and overrides"
            )
        state.setdefault("uid", uuid.uuid4().hex)  # studies begun before run keys existed
        return state
    if state_path.exists():
        raise StudyError(
            f"study directory {study_dir} already holds a study: pass --resume to continue it, "
            "or choose another study.name or study.output_dir"
        )
    return {"config_fingerprint": config.fingerprint(), "uid": uuid.uuid4().hex, "folds": {}}


def _check_same_data(study_dir: Path, state: dict[str, Any], plan: StudyPlan) -> None:
    """Records the data a study starts with; refuses to resume it on other data.

    The same config can point at a cohort whose files or subjects changed since the study
    started, and the splits are recomputed from it: resumed folds would then train and test on
    another partition than the finished ones, and the summary would mix the two.

    Raises:
        StudyError: If the cohort's content hash or a split table differs from the saved one.
    """
    data = {
        "cohort_hash": plan.tags.get("cohort_hash", ""),
        "tables": {name: _table_hash(table) for name, table in plan.tables.items()},
    }
    saved = state.setdefault("data", data)
    if saved["cohort_hash"] != data["cohort_hash"]:
        raise StudyError(
            f"the cohort's content differs from the one {study_dir} was started with (hash "
            f"{data['cohort_hash']}, was {saved['cohort_hash']}): images were added, removed or "
            "changed; resume on the original data, or start a new study"
        )
    for name, digest in data["tables"].items():
        if saved["tables"].get(name) != digest:
            raise StudyError(
                f"{name} differs from the one {study_dir} was started with (see "
                f"{study_dir / name}): resume on the original data and split table, or start a "
                "new study"
            )


def _table_hash(table: pd.DataFrame) -> str:
    return hashlib.sha256(table.to_csv(sep="\t", index=False).encode()).hexdigest()


def _write_state(study_dir: Path, state: dict[str, Any], main: bool) -> None:
    if not main:
        return
    write_text_atomic(study_dir / "study.json", json.dumps(state, indent=2))


def study_tags(config: Config | ImageConfig, content_hashes: Sequence[str]) -> dict[str, str]:
    """Tags of every run of a study; ``cohort_hash`` identifies the data by content."""
    cohort_hash = hashlib.sha256("".join(sorted(content_hashes)).encode()).hexdigest()[:16]
    return {
        "mode": config.training.mode,
        "layer": config.model.layer,
        "model": config.model.name,
        "task": config.data.task,
        "pipeline": config.pipeline,
        "cohort_hash": cohort_hash,
        "study": config.study.name,
    }


def check_stage_parallel(config: Config | ImageConfig, context: DistributedContext) -> None:
    """Refuses stage-parallel training without one process per stage, before any work.

    Raises:
        ValueError: Without torchrun, or with more processes than the cut has blocks.
    """
    training = config.training
    if not training.stage_parallel:
        return
    if not context.enabled:
        raise ValueError(
            "training.stage_parallel needs one process per stage: launch with "
            "torchrun --nproc-per-node K -m enn_neuro ..."
        )
    from enn_neuro.models import cut_points, structure_twin

    blocks = len(cut_points(structure_twin(config.model.name), training.local.cut))
    if blocks < context.world_size:
        raise ValueError(
            f"training.stage_parallel with {context.world_size} processes needs at least as "
            f"many local blocks, but training.local.cut {training.local.cut!r} gives {blocks}: "
            "use fewer processes or a finer cut ('unit')"
        )


def _log_summary(summary: dict[str, dict[str, float]]) -> None:
    for name, values in summary.items():
        if name.startswith("test/") and "block" not in name:
            logger.info(
                "study %s: %.4f (95%% CI %.4f to %.4f, %d folds)",
                name.removeprefix("test/"),
                values["mean"],
                values["ci_low"],
                values["ci_high"],
                values["n"],
            )
