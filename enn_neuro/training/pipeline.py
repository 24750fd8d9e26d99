"""Stage-parallel local mode: each rank trains its own group of local blocks, at once.

In local mode (ENN-ℓ) no gradient crosses a block boundary, so the blocks need not wait for
each other: rank k owns a contiguous group of blocks, receives each batch's activations (and
targets) from rank k − 1, takes a local step on each of its blocks, and sends its output to
rank k + 1. Nothing is sent backwards. Sends are asynchronous, so while rank 1 works on batch
t, rank 0 is already on batch t + 1: with K ranks and balanced groups, an epoch takes about
1/K of the sequential time once the pipeline is full. See Note [sends in flight] for how far
a stage may run ahead of the next.

Blocks are grouped by measured cost (one timed training step per block on this input
shape), not by count: the stem and first stage of a 3D ResNet cost several times the last.

At every epoch's end the ranks send their blocks' weights and optimizer states to rank 0,
which then holds the whole network in the same checkpoint format as sequential local mode,
validates it, logs and writes the checkpoints.

Note [sends in flight]:
    A gloo send completes only once the receiving rank has posted the matching receive, and
    until then the sender must keep the sent tensors alive. Unbounded, a fast stage would
    hold a copy of every batch the next stage has not yet taken: at ImageNet scale, host
    memory without limit. A stage therefore keeps at most ``_SENDS_IN_FLIGHT`` (2) batches
    in flight and waits for the oldest before it sends a third. Two suffice for overlap: the
    next stage receives batch t while this one computes batch t + 1; more would only absorb
    larger swings in step time, at the cost of memory. The time spent waiting on a send is
    counted in ``train/stage<k>_wait_s``, with the time spent waiting for input.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from enn_neuro.training.distributed import DistributedContext
from enn_neuro.training.learner import Learner
from enn_neuro.training.loop import warn_skipped_images

__all__ = ["StagePipeline", "balanced_groups"]

logger = logging.getLogger(__name__)

_HEADER_SIZE = 6  # batch, channels, and up to 3 spatial sizes, plus a spare
_SENDS_IN_FLIGHT = 2  # see Note [sends in flight]
# what torch says when a schedule advances before its optimizer ever stepped in this process
_SCHEDULE_BEFORE_STEP = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def balanced_groups(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Cuts ``costs`` into ``parts`` contiguous groups minimising the largest group's sum.

    Args:
        costs: Cost of each block, in order.
        parts: Number of groups (ranks); at most ``len(costs)``.

    Returns:
        Block indices of each group, in order.

    Raises:
        ValueError: If there are fewer blocks than groups.
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} local blocks into {parts} stages (one per rank)")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    # best[p][i]: smallest possible largest-group cost splitting blocks[:i] into p groups
    infinity = float("inf")
    best = [[infinity] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                candidate = max(best[p - 1][j], prefix[i] - prefix[j])
                if candidate < best[p][i]:
                    best[p][i], cut[p][i] = candidate, j
    groups, end = [], n
    for p in range(parts, 0, -1):
        start = cut[p][end]
        groups.append(list(range(start, end)))
        end = start
    return groups[::-1]


class StagePipeline:
    """Runs a learner's local blocks as a forward-only pipeline over the ranks.

    Args:
        learner: A local-mode learner built for a single process (no DDP); every rank holds
            the whole network but updates only its own blocks.
        context: The ranks; one stage per rank.
        input_shape: ``(B, C, *S)`` of a training batch, to measure block costs.
    """

    def __init__(
        self, learner: Learner, context: DistributedContext, input_shape: Sequence[int]
    ) -> None:
        if learner.blocks is None:
            raise ValueError("stage-parallel training needs training.mode: local")
        if not context.enabled:
            raise ValueError("stage-parallel training needs several processes (torchrun)")
        self.learner = learner
        self.context = context
        costs = context.broadcast(_block_costs(learner, input_shape) if context.is_main else None)
        self.costs = costs
        self.groups = balanced_groups(costs, context.world_size)
        self.mine = self.groups[context.rank]
        if context.is_main:
            shares = [sum(costs[i] for i in group) / sum(costs) for group in self.groups]
            logger.info(
                "stage-parallel: block costs %s s, groups %s, shares %s",
                [round(c, 4) for c in costs],
                self.groups,
                [round(s, 3) for s in shares],
            )

    def train_epoch(
        self, loader: DataLoader, fold: int, epoch: int, global_step: int
    ) -> tuple[dict[str, float], int]:
        """One epoch: rank 0 reads batches, every rank trains its blocks, activations flow on.

        Returns:
            This stage's statistics (its blocks' losses, wait and busy time; on rank 0 also
            ``train/skipped_images`` when the batches count unreadable files) and the new
            global step.
        """
        context, learner = self.context, self.learner
        rank, last_rank = context.rank, context.world_size - 1
        steps = context.broadcast(len(loader) if context.is_main else None)
        batches = iter(loader) if context.is_main else None
        totals = {index: 0.0 for index in self.mine}
        penalties = 0.0
        sends = _SendWindow(_SENDS_IN_FLIGHT)
        waited = samples = 0.0
        skipped: int | None = None  # unreadable images replaced (2D skip mode)
        start = time.perf_counter()
        for step in range(steps):
            # this stage's input: a batch from the loader, or the previous stage's output
            wait_start = time.perf_counter()
            if rank == 0:
                batch = next(batches)
                if "skipped" in batch:
                    skipped = (skipped or 0) + int(batch["skipped"].sum())
                features = learner.prepare(batch["image"])  # (B, C, *S)
                targets = batch["label"].to(learner.device, non_blocking=True)  # (B,)
            else:
                features, targets = _receive(rank - 1, learner.task)
                features = learner.prepare(features)  # (B, C', *S')
                targets = targets.to(learner.device, non_blocking=True)  # (B,)
            waited += time.perf_counter() - wait_start

            # a local step on each block of this stage
            where = f"fold {fold}, epoch {epoch + 1}, step {step + 1}"  # counted from 1
            for index in self.mine:
                features, task_loss, penalty = learner.local_block_step(
                    index, features, targets, where, global_step
                )
                totals[index] += task_loss
                penalties += penalty

            # pass on: asynchronous, nothing comes back, at most 2 batches ahead
            if rank < last_rank:
                waited += sends.push(_send(features.detach(), targets, rank + 1))
            samples += features.shape[0]
            global_step += 1
        waited += sends.drain()

        elapsed = time.perf_counter() - start
        stats = {f"train/block{i}_loss": total / max(steps, 1) for i, total in totals.items()}
        stats[f"train/stage{rank}_penalty"] = penalties / max(steps, 1)
        stats[f"train/stage{rank}_wait_s"] = waited
        stats[f"train/stage{rank}_busy_share"] = 1 - waited / max(elapsed, 1e-9)
        stats["train/samples_per_s"] = samples / max(elapsed, 1e-9)
        stats["train/epoch_s"] = elapsed
        if skipped is not None:  # only rank 0 reads the data
            stats["train/skipped_images"] = skipped
            warn_skipped_images(fold, epoch, skipped)
        return stats, global_step

    def collect(self, stats: dict[str, float]) -> dict[str, float]:
        """Gives rank 0 every stage's weights, optimizer states and statistics.

        Returns:
            On rank 0, the merged statistics (block losses of every stage, the final block's
            loss as ``train/loss``); elsewhere the local ones.
        """
        learner = self.learner
        state = learner.training_state()
        prefixes = _prefixes_of(learner, self.mine)
        # on the CPU: rank 0 could not unpickle tensors of another rank's GPU; loading puts
        # weights and optimizer moments back on rank 0's device (load_state_dict casts
        # optimizer state to its parameter's device)
        payload = {
            "model": {k: v.cpu() for k, v in state["model"].items() if k.startswith(prefixes)},
            "heads": {
                k: v.cpu() for k, v in state["heads"].items() if int(k.split(".")[0]) in self.mine
            },
            "optimizers": {i: _on_cpu(state["optimizers"][i]) for i in self.mine},
            "stats": stats,
        }
        gathered = [None] * self.context.world_size if self.context.is_main else None
        dist.gather_object(payload, gathered, dst=0)
        if not self.context.is_main:
            return stats
        model_state, head_state = state["model"], state["heads"]
        merged_stats: dict[str, float] = {}
        for part in gathered:
            model_state.update(part["model"])
            head_state.update(part["heads"])
            for index, optimizer_state in part["optimizers"].items():
                learner.optimizers[index].load_state_dict(optimizer_state)
            merged_stats.update(part["stats"])
        learner.model.load_state_dict(model_state)
        learner.heads.load_state_dict(head_state)
        # as in sequential local mode: loss sums every block's task loss and penalty,
        # task_loss is the last block's
        blocks = range(learner.num_blocks)
        stages = range(self.context.world_size)
        penalty = sum(merged_stats.pop(f"train/stage{k}_penalty") for k in stages)
        merged_stats["train/penalty"] = penalty
        merged_stats["train/task_loss"] = merged_stats[f"train/block{blocks[-1]}_loss"]
        merged_stats["train/loss"] = (
            sum(merged_stats[f"train/block{i}_loss"] for i in blocks) + penalty
        )
        merged_stats["train/samples_per_s"] = min(
            p["stats"]["train/samples_per_s"] for p in gathered
        )
        merged_stats["train/epoch_s"] = max(p["stats"]["train/epoch_s"] for p in gathered)
        return merged_stats

    def end_epoch(self) -> None:
        """Advances every block's learning-rate schedule, this stage's and the others'.

        A rank steps only its own blocks' optimizers but advances every schedule, so that the
        learning rates on every rank, and the schedules rank 0 checkpoints, are those of
        sequential local mode. torch warns, on the first epoch, about each schedule whose
        optimizer this process never stepped, and that the schedule's first value is
        skipped; it is not, so the warning would only mislead, and it is silenced here.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _SCHEDULE_BEFORE_STEP, UserWarning)
            self.learner.end_epoch()


def _prefixes_of(learner: Learner, blocks: Sequence[int]) -> tuple[str, ...]:
    """State-dict prefixes of the model units in ``blocks`` (the classifier with the last)."""
    prefixes = []
    for index in blocks:
        prefixes += [f"{name}." for name in learner.blocks[index].unit_names]
        if index == learner.num_blocks - 1:
            prefixes.append("classifier.")
    return tuple(prefixes)


def _on_cpu(value):
    """``value`` (nested dicts, lists, tuples) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _send(features: torch.Tensor, targets: torch.Tensor, destination: int) -> _Send:
    """Starts sending a header, the activations and the targets to ``destination``."""
    header = torch.zeros(_HEADER_SIZE, dtype=torch.int64)
    header[: features.dim()] = torch.tensor(features.shape)
    payload = features.contiguous().float().cpu()
    labels = targets.double().cpu()
    works = [
        dist.isend(header, destination),
        dist.isend(payload, destination),
        dist.isend(labels, destination),
    ]
    return _Send(works, (header, payload, labels))


def _receive(source: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The next activations (on the CPU) and targets that ``source`` sent."""
    header = torch.zeros(_HEADER_SIZE, dtype=torch.int64)
    dist.recv(header, source)
    shape = [int(s) for s in header.tolist() if s > 0]
    features = torch.empty(shape, dtype=torch.float32)
    dist.recv(features, source)
    labels = torch.empty(shape[0], dtype=torch.float64)
    dist.recv(labels, source)
    labels = labels.long() if task == "classification" else labels.float()
    return features, labels


class _Send:
    """The asynchronous sends of one batch, and the tensors they read until they complete."""

    def __init__(self, works: list, tensors: tuple[torch.Tensor, ...]) -> None:
        self.works = works
        self.tensors = tensors

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)

    def wait(self) -> None:
        for work in self.works:
            work.wait()


class _SendWindow:
    """At most ``limit`` batches in flight, oldest first: see Note [sends in flight]."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        self.limit = limit
        self.pending: deque[_Send] = deque()

    def push(self, send: _Send) -> float:
        """Adds ``send``; waits for the oldest while more than ``limit`` are pending.

        Returns:
            Seconds spent waiting.
        """
        while self.pending and self.pending[0].is_completed():
            self.pending.popleft()  # frees its tensors
        self.pending.append(send)
        start = time.perf_counter()
        while len(self.pending) > self.limit:
            self.pending.popleft().wait()
        return time.perf_counter() - start

    def drain(self) -> float:
        """Waits for every pending send; returns the seconds spent waiting."""
        start = time.perf_counter()
        while self.pending:
            self.pending.popleft().wait()
        return time.perf_counter() - start


def _block_costs(learner: Learner, input_shape: Sequence[int], repeats: int = 3) -> list[float]:
    """Median seconds of one training step of each block on a random batch of this shape."""
    # a copy: state dicts share storage with the parameters and optimizer moments
    state = copy.deepcopy(learner.training_state())
    features = torch.randn(*input_shape, device=learner.device)
    targets = torch.zeros(input_shape[0], dtype=torch.long, device=learner.device)
    if learner.task == "regression":
        targets = targets.float()
    costs = []
    for index in range(learner.num_blocks):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            output, _, _ = learner.local_block_step(index, features, targets, "cost", step=1)
            times.append(time.perf_counter() - start)
        features = output
        costs.append(statistics.median(times))
    learner.load_training_state(state)  # the timing steps must not count as training
    return costs
