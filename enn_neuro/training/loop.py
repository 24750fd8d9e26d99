"""The training loop of one split: epochs, validation, model selection, checkpoints.

Model selection and early stopping look at the validation subjects only; the test subjects
are predicted once, with the best model, after training. Randomness (shuffling,
augmentation) is reseeded at every epoch from (seed, fold, epoch), and a checkpoint is
written at every epoch's end, so a study killed at any moment and resumed finishes with the
same numbers as one never interrupted.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from enn_neuro.training.pipeline import StagePipeline

from enn_neuro.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from enn_neuro.training.distributed import DistributedContext
from enn_neuro.training.learner import Learner
from enn_neuro.training.metrics import (
    classification_metrics,
    regression_metrics,
    selection_direction,
)

__all__ = [
    "FitResult",
    "add_probability_columns",
    "Predictions",
    "evaluate",
    "fit",
    "predict_loader",
    "seed_everything",
    "softmax",
]

logger = logging.getLogger(__name__)

MAX_PROBABILITY_COLUMNS = 100  # more classes: the top TOP_K per image in predictions.csv
TOP_K = 5

CHECKPOINT_FORMAT = 1


def add_probability_columns(
    frame: pd.DataFrame,
    probabilities: np.ndarray,
    classes: Sequence[str],
    every_class: bool = False,
) -> pd.DataFrame:
    """``frame`` with ``prob_<class>`` columns, or the top classes beyond 100 classes.

    Beyond :data:`MAX_PROBABILITY_COLUMNS` classes (ImageNet's 1000), the :data:`TOP_K` most
    probable classes and their probabilities (``top1_class``, ``top1_prob``, ...) replace
    the column per class, which would make 50 000 images a gigabyte of CSV.

    Args:
        frame: One row per image.
        probabilities: ``(N, num_classes)``, rows in ``frame``'s order.
        classes: Class names, in the columns' order.
        every_class: One column per class however many there are.

    Returns:
        A new frame: ``frame``'s columns, then the probability columns.
    """
    if every_class or len(classes) <= MAX_PROBABILITY_COLUMNS:
        columns = {f"prob_{name}": probabilities[:, i] for i, name in enumerate(classes)}
    else:
        ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_K]  # (N, k)
        rows = np.arange(len(ranked))
        columns = {}
        for rank in range(ranked.shape[1]):
            chosen = ranked[:, rank]  # (N,)
            columns[f"top{rank + 1}_class"] = [classes[i] for i in chosen]
            columns[f"top{rank + 1}_prob"] = probabilities[rows, chosen]
    # one concatenation: a thousand single-column inserts would fragment the frame
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1)


@dataclass
class Predictions:
    """Per-image outputs of every head, with who and what they belong to.

    Attributes:
        subject_ids: ``(N,)`` subject of each image.
        session_ids: ``(N,)`` session of each image ("" if none).
        images: ``(N,)`` image paths.
        targets: ``(N,)`` true class indices or values.
        outputs: One ``(N, num_outputs)`` array per head, the final head last (logits for
            classification, values in target units for regression).
        skipped_images: Unreadable images left out (2D skip mode).
    """

    subject_ids: list[str]
    session_ids: list[str]
    images: list[str]
    targets: np.ndarray
    outputs: list[np.ndarray]
    skipped_images: int = 0

    def table(self, task: str, classes: Sequence[str]) -> pd.DataFrame:
        """One row per image: ids, target, prediction and class probabilities.

        The probabilities as :func:`add_probability_columns` writes them: the top five
        classes beyond :data:`MAX_PROBABILITY_COLUMNS` classes.
        """
        frame = pd.DataFrame(
            {
                "subject_id": self.subject_ids,
                "session_id": self.session_ids,
                "image": self.images,
                "target": self.targets,
            }
        )
        final = self.outputs[-1]
        if task == "classification":
            probabilities = softmax(final)
            frame["prediction"] = [classes[i] for i in probabilities.argmax(axis=1)]
            frame["target"] = [classes[int(i)] for i in self.targets]
            return add_probability_columns(frame, probabilities, classes)
        frame["prediction"] = final[:, 0]
        return frame


@dataclass
class FitResult:
    """What training one split produced."""

    best_epoch: int
    best_score: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """The seed of one epoch of one fold: a function of the three, nothing else."""
    return (seed * 1_000_003 + fold * 10_007 + epoch) % 2**31


def fit(
    learner: Learner,
    train_loader: DataLoader,
    val_loader: DataLoader,
    fold: int,
    fold_dir: Path,
    classes: Sequence[str],
    log_epoch: Callable[[dict[str, float], int], None],
    resume: bool = False,
    context: DistributedContext | None = None,
    pipeline: StagePipeline | None = None,
) -> FitResult:
    """Trains until the epoch budget or early stopping; keeps ``last.pt`` and ``best.pt``.

    Args:
        learner: Model, blocks, optimizers and schedulers.
        train_loader: Shuffled training batches (its generator is reseeded each epoch).
        val_loader: Validation batches.
        fold: Fold index, for seeds and messages.
        fold_dir: Where the checkpoints go.
        classes: Class names (classification), empty for regression.
        log_epoch: Receives each epoch's metrics and the epoch index (MLflow, logs).
        resume: Continue from ``fold_dir/last.pt`` if present.
        context: The ranks (the learner's when ``None``); rank 0 logs and checkpoints.
        pipeline: Stage-parallel local mode: each rank trains its own blocks, and rank 0
            validates the gathered network.

    Returns:
        The best epoch and score, and the history.

    Raises:
        NonFiniteLossError: From a step; ``last.pt`` and ``best.pt`` keep the last good epoch.
    """
    config = learner.config
    training = config.training
    context = context or learner.context
    main = context.is_main
    metric = default_metric(config)
    higher_is_better = selection_direction(metric)
    last_path, best_path = fold_dir / "last.pt", fold_dir / "best.pt"

    state = {
        "epoch": 0,
        "global_step": 0,
        "best_score": None,
        "best_epoch": -1,
        "stale_epochs": 0,
        "stopped_early": False,
        "history": [],
    }
    if resume and last_path.exists():
        # on the CPU: the RNG states must stay CPU tensors, and load_state_dict moves the
        # weights and optimizer state to the parameters' device itself
        saved = load_checkpoint(last_path)
        learner.load_training_state(saved["training"])
        restore_rng_state(saved["rng"])
        state = saved["loop"]
        logger.info("fold %d: resuming after epoch %d", fold, state["epoch"])

    while state["epoch"] < training.epochs and not state["stopped_early"]:
        epoch = state["epoch"]

        # train
        seed = epoch_seed(config.study.seed, fold, epoch)
        seed_everything(seed + context.rank)  # augmentation differs across ranks
        train_loader.sampler.set_seed(seed)  # the permutation does not: Note [global batch]
        if pipeline is None:
            train_stats, state["global_step"] = train_one_epoch(
                learner, train_loader, fold, epoch, state["global_step"]
            )
        else:
            train_stats, state["global_step"] = pipeline.train_epoch(
                train_loader, fold, epoch, state["global_step"]
            )
            train_stats = pipeline.collect(train_stats)
        learning_rate = learner.learning_rate
        if pipeline is None:
            learner.end_epoch()
        else:
            pipeline.end_epoch()
        state["epoch"] = epoch + 1
        if pipeline is not None and not main:
            state = context.broadcast(None)  # rank 0 validates and decides
            continue

        # validate (every rank with rank 0's normalisation statistics, as best.pt holds)
        learner.sync_buffers()
        val_metrics = evaluate(learner, predict_loader(learner, val_loader), classes, prefix="val/")
        score = val_metrics[f"val/{metric}"]
        # a NaN score (e.g. AUC with one class in the validation set) never improves; the
        # first epoch is still kept, so that a best model always exists
        improved = math.isfinite(score) and (
            state["best_score"] is None
            or (score > state["best_score"] if higher_is_better else score < state["best_score"])
        )
        provisional = state["best_epoch"] < 0
        if improved or provisional:
            best_score = score if improved else None
            state.update(best_score=best_score, best_epoch=epoch, stale_epochs=0)
        if (improved or provisional) and main:
            save_checkpoint(
                {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch,
                    "fold": fold,
                    "score": score,
                    "metric": metric,
                    "classes": list(classes),
                    "config": config.resolved(),
                    "training": {
                        k: v
                        for k, v in learner.training_state().items()
                        if k in ("model", "heads", "target_mean", "target_std")
                    },
                },
                best_path,
            )
        if not (improved or provisional):
            state["stale_epochs"] += 1
        if training.patience is not None and state["stale_epochs"] >= training.patience:
            state["stopped_early"] = True

        # log, then checkpoint: a kill in between re-runs this epoch with the same seeds, and
        # nothing logged is lost (Note [log before checkpoint] in study.py)
        epoch_metrics = {
            **train_stats,
            **val_metrics,
            **learner.orthogonality_summary(),
            "lr": learning_rate,
            "best/epoch": state["best_epoch"],
            f"best/val_{metric}": math.nan if state["best_score"] is None else state["best_score"],
        }
        state["history"].append({k: float(v) for k, v in epoch_metrics.items()})
        if pipeline is not None:
            context.broadcast(state)
        if not main:
            continue
        log_epoch(epoch_metrics, epoch)
        _log_epoch_line(fold, epoch, training.epochs, epoch_metrics, metric)
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "fold": fold,
                "training": learner.training_state(),
                "rng": capture_rng_state(),
                "loop": state,
            },
            last_path,
        )

    context.barrier()  # best.pt is complete before any rank reads it
    if state["stopped_early"]:
        logger.info(
            "fold %d: early stop after epoch %d (best %s %.4f at epoch %d)",
            fold,
            state["epoch"],  # epochs count from 1 in log lines, from 0 in metrics
            metric,
            state["best_score"],
            state["best_epoch"] + 1,
        )
    return FitResult(
        best_epoch=state["best_epoch"],
        best_score=state["best_score"],
        epochs_run=state["epoch"],
        stopped_early=state["stopped_early"],
        history=state["history"],
    )


def train_one_epoch(
    learner: Learner, loader: DataLoader, fold: int, epoch: int, global_step: int
) -> tuple[dict[str, float], int]:
    """Runs one epoch of steps; returns averaged losses and throughput, and the new step.

    Under DDP the losses are averaged over every rank's shards and the throughput counts
    every rank's samples; each rank returns the same values.
    """
    log_every = learner.config.training.log_every
    totals = {"loss": 0.0, "task_loss": 0.0, "penalty": 0.0}
    block_totals = [0.0] * learner.num_blocks
    samples, data_wait, steps = 0, 0.0, 0
    skipped = None  # unreadable images passed over (2D skip mode), when the data counts them
    epochs = learner.config.training.epochs
    progress = _progress(loader, f"fold {fold} epoch {epoch + 1}/{epochs}")
    start = waited_since = time.perf_counter()
    for batch in progress:
        data_wait += time.perf_counter() - waited_since
        if "skipped" in batch:
            skipped = (skipped or 0) + int(batch["skipped"].sum())
        images = learner.prepare(batch["image"])  # (B, C, *S)
        targets = batch["label"].to(learner.device, non_blocking=True)  # (B,)
        where = f"fold {fold}, epoch {epoch + 1}, step {steps + 1}"  # as the log lines count
        result = learner.train_step(images, targets, where, global_step)
        global_step += 1
        steps += 1
        samples += images.shape[0]
        totals["loss"] += result.loss
        totals["task_loss"] += result.task_loss
        totals["penalty"] += result.penalty
        block_totals = [t + b for t, b in zip(block_totals, result.block_losses, strict=True)]

        elapsed = time.perf_counter() - start
        status = {
            "loss": f"{result.loss:.4f}",
            "avg": f"{totals['loss'] / steps:.4f}",
            "lr": f"{learner.learning_rate:.2e}",
            "samples/s": f"{samples / elapsed:.1f}",
            "data": f"{data_wait / elapsed:.0%}",
        }
        if hasattr(progress, "set_postfix"):
            progress.set_postfix(status, refresh=False)
        elif steps % log_every == 0:
            logger.info(
                "fold %d epoch %d/%d step %d: %s",
                fold,
                epoch + 1,
                epochs,
                steps,
                ", ".join(f"{k} {v}" for k, v in status.items()),
            )
        waited_since = time.perf_counter()

    # every rank's sums, so that the losses and throughput describe the global batches
    elapsed = time.perf_counter() - start
    shares = learner.context.all_gather(
        {
            "totals": totals,
            "blocks": block_totals,
            "samples": samples,
            "steps": steps,
            "wait": data_wait,
            "elapsed": elapsed,
            "skipped": skipped,
        }
    )
    totals = {name: sum(share["totals"][name] for share in shares) for name in totals}
    block_totals = [sum(share["blocks"][k] for share in shares) for k in range(len(block_totals))]
    rank_steps = max(sum(share["steps"] for share in shares), 1)  # one per rank and step
    elapsed = max(share["elapsed"] for share in shares)
    stats = {f"train/{name}": value / rank_steps for name, value in totals.items()}
    stats["train/samples_per_s"] = sum(share["samples"] for share in shares) / max(elapsed, 1e-9)
    stats["train/data_wait_s"] = max(share["wait"] for share in shares)
    stats["train/epoch_s"] = elapsed
    if learner.num_blocks > 1:
        for index, value in enumerate(block_totals):
            stats[f"train/block{index}_loss"] = value / rank_steps
    if any(share["skipped"] is not None for share in shares):  # any rank's data counts them
        stats["train/skipped_images"] = sum(share["skipped"] or 0 for share in shares)
        if learner.context.is_main:
            warn_skipped_images(fold, epoch, stats["train/skipped_images"])
    return stats, global_step


def warn_skipped_images(fold: int, epoch: int, count: int) -> None:
    """One warning per epoch with the count of unreadable images skipped (2D skip mode)."""
    if count:
        logger.warning(
            "fold %d epoch %d: %d unreadable image(s) skipped (named in the warnings above)",
            fold,
            epoch + 1,
            count,
        )


@torch.no_grad()
def predict_loader(learner: Learner, loader: DataLoader) -> Predictions:
    """Outputs of every head for every image of ``loader``.

    In 2D skip mode an unreadable image's item is a readable neighbour standing in for it
    (marked ``skipped`` in the batch); that neighbour is predicted under its own index too,
    so the stand-in rows are dropped and counted rather than scored twice.
    """
    subject_ids, session_ids, images, targets, stand_ins = [], [], [], [], []
    outputs: list[list[np.ndarray]] = []
    for batch in loader:
        heads = learner.predict(learner.prepare(batch["image"]))  # K × (B, num_outputs)
        if not outputs:
            outputs = [[] for _ in heads]
        for store, head in zip(outputs, heads, strict=True):
            store.append(head.cpu().numpy())
        subject_ids += list(batch["subject_id"])
        session_ids += list(batch["session_id"])
        images += list(batch["image_path"])
        targets.append(batch["label"].cpu().numpy())
        skipped = batch.get("skipped")
        stand_ins += [False] * len(batch["label"]) if skipped is None else (skipped > 0).tolist()
    local = Predictions(
        subject_ids=subject_ids,
        session_ids=session_ids,
        images=images,
        targets=np.concatenate(targets) if targets else np.zeros(0),
        outputs=[np.concatenate(store) for store in outputs],
    )
    shards = learner.context.all_gather((local, stand_ins))
    merged = _merge_shards([shard for shard, _ in shards])
    stand_in = np.array(_merge_shards_order([flags for _, flags in shards]), dtype=bool)
    if not stand_in.any():
        return merged
    keep = ~stand_in
    logger.warning("%d unreadable image(s) left out of the predictions", int(stand_in.sum()))
    return Predictions(
        subject_ids=[v for v, k in zip(merged.subject_ids, keep, strict=True) if k],
        session_ids=[v for v, k in zip(merged.session_ids, keep, strict=True) if k],
        images=[v for v, k in zip(merged.images, keep, strict=True) if k],
        targets=merged.targets[keep],
        outputs=[head[keep] for head in merged.outputs],
        skipped_images=int(stand_in.sum()),
    )


def _merge_shards_order(shards: list[list]) -> list:
    """Undoes :class:`ShardSampler` for one list per rank (see :func:`_merge_shards`)."""
    world, total = len(shards), sum(len(shard) for shard in shards)
    return [shards[index % world][index // world] for index in range(total)]


def _merge_shards(shards: list[Predictions]) -> Predictions:
    """Undoes :class:`ShardSampler`: rank r predicted items r, r + W, r + 2W, ..."""
    if len(shards) == 1:
        return shards[0]

    def pick(values_of):
        return _merge_shards_order([list(values_of(shard)) for shard in shards])

    heads = next(len(s.outputs) for s in shards if s.subject_ids)
    return Predictions(
        subject_ids=pick(lambda s: s.subject_ids),
        session_ids=pick(lambda s: s.session_ids),
        images=pick(lambda s: s.images),
        targets=np.array(pick(lambda s: s.targets)),
        outputs=[np.stack(pick(lambda s, h=h: s.outputs[h])) for h in range(heads)],
    )


def evaluate(
    learner: Learner, predictions: Predictions, classes: Sequence[str], prefix: str = ""
) -> dict[str, float]:
    """Subject-level metrics of the final head, loss, and each block head's metrics.

    A subject with several images is scored once, on the mean of its images' probabilities
    (or predicted values).

    Returns:
        ``{prefix + name: value}``; block heads as ``{prefix}block{k}_{name}`` in local mode.
    """
    task = learner.config.data.task
    targets = torch.from_numpy(predictions.targets)
    final = torch.from_numpy(predictions.outputs[-1])
    if task == "regression":
        final = (final - learner.target_mean) / learner.target_std  # back to z-scores
    result = {f"{prefix}loss": float(learner.task_loss(final, targets))}
    if predictions.skipped_images:
        result[f"{prefix}skipped_images"] = predictions.skipped_images
    for index, outputs in enumerate(predictions.outputs):
        metrics = _subject_metrics(predictions, outputs, task, classes)
        name = "" if index == len(predictions.outputs) - 1 else f"block{index}_"
        result.update(
            {f"{prefix}{name}{k}": v for k, v in metrics.items() if k != "confusion_matrix"}
        )
    return result


def _subject_metrics(predictions: Predictions, outputs: np.ndarray, task: str, classes) -> dict:
    frame = pd.DataFrame({"subject_id": predictions.subject_ids, "target": predictions.targets})
    if task == "classification":
        probabilities = softmax(outputs)  # (N, num_classes)
        columns = [f"p{i}" for i in range(probabilities.shape[1])]
        # joined at once: a column at a time fragments the frame for ImageNet's 1000 classes
        frame = pd.concat([frame, pd.DataFrame(probabilities, columns=columns)], axis=1)
        by_subject = frame.groupby("subject_id", sort=False).mean()
        return classification_metrics(
            by_subject["target"].round().astype(int), by_subject[columns].to_numpy(), classes
        )
    frame["prediction"] = outputs[:, 0]
    by_subject = frame.groupby("subject_id", sort=False).mean()
    return regression_metrics(by_subject["target"], by_subject["prediction"])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of ``(N, num_classes)`` logits, row by row (numerically stable)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def default_metric(config) -> str:
    """The selection metric when none is configured."""
    if config.training.selection_metric:
        return config.training.selection_metric
    if config.data.task == "regression":
        return "mae"
    # balanced accuracy for clinical cohorts (often imbalanced), top-1 for image folders
    return "accuracy" if config.spatial_dims == 2 else "balanced_accuracy"


def _progress(loader: DataLoader, description: str):
    """A tqdm bar on a terminal; the plain iterable (with periodic log lines) otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(loader, desc=description, leave=False, dynamic_ncols=True)
    return loader


def _log_epoch_line(fold: int, epoch: int, epochs: int, metrics: dict, metric: str) -> None:
    selection = "" if metric == "loss" else f", val {metric} {metrics[f'val/{metric}']:.4f}"
    logger.info(
        "fold %d epoch %d/%d: train loss %.4f, val loss %.4f%s (best %.4f at epoch %d), "
        "%.1f samples/s, %.1fs",
        fold,
        epoch + 1,
        epochs,
        metrics["train/loss"],
        metrics["val/loss"],
        selection,
        metrics[f"best/val_{metric}"],
        metrics["best/epoch"] + 1,
        metrics["train/samples_per_s"],
        metrics["train/epoch_s"],
    )
