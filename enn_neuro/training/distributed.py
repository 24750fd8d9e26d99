"""torch.distributed for studies: process groups, sharded sampling, gathering predictions.

A study launched by ``torchrun --nproc-per-node N -m enn_neuro cv ...`` (or with a machine
list for several nodes) finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment and
joins a process group: NCCL on GPUs, gloo on CPUs. Every rank runs the same study; only rank
0 writes checkpoints and talks to MLflow.

Note [global batch]:
    ``training.batch_size`` is the global batch. Each epoch draws one permutation of the
    training set from the epoch's seed; rank r takes every W-th index starting at r and
    batches of ``batch_size / W``. The union of the ranks' k-th batches is then exactly the
    k-th global batch a single process would draw, and DDP's gradient average equals the
    gradient of the global batch's mean loss, so 1 and N processes train the same model up
    to float summation order (and BatchNorm statistics, which are per process on the CPU).

    A partial global batch (a training set no bigger than one batch, or the last batch
    without ``drop_last``) of p samples is shared the same way: the ranks together take
    exactly the p samples one process would, rank r taking ``ceil((p - r) / W)`` of them.
    When W does not divide p, those shares differ by one, and DDP, which averages the ranks'
    gradients with equal weights, then weights that batch's samples unequally (3 samples on
    2 ranks: 1/4, 1/4 and 1/2 instead of 1/3 each); this is logged as a warning. A partial
    batch with fewer samples than ranks cannot be shared (a rank without a batch would
    leave the others waiting in DDP): it is left out of the epoch, with a warning, or
    refused with a ``ValueError`` when it is the whole training set.

Note [leaving the group]:
    A gloo group runs collectives on worker threads. A worker lets go of a finished
    collective's tensors just after ``wait()`` has returned on the main thread, and where
    Python has already dropped such a tensor, freeing it takes the GIL. During interpreter
    shutdown, taking the GIL ends the thread by unwinding it through C++ code that must not
    unwind, and the process aborts ("terminate called without an active exception",
    SIGABRT) after all its work: torchrun then fails the study. Seen once in CI, and once in
    16 three-process stage-parallel runs on a loaded machine, where the C++ stack showed a
    gloo worker freeing a tensor after the main thread had finished.

    ``destroy_process_group`` closes the window only if it drops the last reference to the
    group: the group's destructor then waits for its workers and joins them while the
    interpreter is whole. Two things kept the group alive past it (torch 2.13):

    - ``torch._dynamo``, which ``torch.optim`` imports when the first optimizer is built,
      keeps a reference to a default group that exists at its import, and never lets go.
      :func:`init_distributed` therefore imports it before it creates the group.
    - A DDP wrapper caught in a reference cycle holds the group until the garbage
      collector runs: :func:`distributed_session` collects before it leaves the group.

    ``test_a_finished_session_leaves_no_gloo_worker_to_abort_the_exit`` checks that no gloo
    thread outlives a session that built an optimizer and a DDP model in a cycle.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistributedContext",
    "EpochSampler",
    "ShardSampler",
    "distributed_session",
    "init_distributed",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes.

    Attributes:
        rank: Global rank (0 for a single process).
        world_size: Number of processes (1 for a single process).
        local_rank: Rank on this machine (picks the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether a process group is in use."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs, writes checkpoints and tracks (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Waits for every rank (no-op for one process)."""
        if self.enabled:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def init_distributed(
    device_name: str, timeout_s: float = 600.0
) -> tuple[DistributedContext, torch.device]:
    """Joins the process group described by torchrun's environment, if there is one.

    Args:
        device_name: ``training.device``; with CUDA each process takes ``cuda:LOCAL_RANK``.
        timeout_s: How long a collective waits for a missing rank before failing (a rank
            that died makes the others fail instead of hanging).

    Returns:
        The context and this process's device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        from enn_neuro.training.learner import resolve_device

        return DistributedContext(), resolve_device(device_name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        importlib.import_module("torch._dynamo")  # before the group: Note [leaving the group]
        # with CUDA: NCCL for GPU tensors, gloo for the CPU tensors that stage-parallel mode
        # and object collectives send
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    logger.info("rank %d of %d on %s (%s)", rank, world_size, device, dist.get_backend())
    return DistributedContext(rank, world_size, local_rank), device


@contextlib.contextmanager
def distributed_session(
    device_name: str, timeout_s: float = 600.0
) -> Iterator[tuple[DistributedContext, torch.device]]:
    """:func:`init_distributed` for the span of a ``with`` block, leaving the group after it.

    A process that exits with its gloo group still open can abort while the interpreter
    shuts down (Note [leaving the group]). A group that was already open before the block
    is left open for whoever opened it.
    """
    opened_here = not (dist.is_available() and dist.is_initialized())
    context, device = init_distributed(device_name, timeout_s)
    try:
        yield context, device
    finally:
        if context.enabled and opened_here and dist.is_initialized():
            gc.collect()  # DDP wrappers in cycles let go of the group (Note [leaving the group])
            dist.destroy_process_group()


def check_global_batch(global_batch: int, context: DistributedContext) -> None:
    """Refuses a global batch (``training.batch_size``) that does not divide among the ranks.

    Raises:
        ValueError: Naming the batch size and the number of processes.
    """
    if global_batch % context.world_size:
        raise ValueError(
            f"training.batch_size ({global_batch}) must be a multiple of the number of "
            f"processes ({context.world_size})"
        )


class EpochSampler(Sampler[int]):
    """This rank's share of one seeded permutation per epoch (see ``Note [global batch]``).

    Batched by ``global_batch / world_size``, the ranks' k-th batches together hold the k-th
    ``global_batch`` indices of the permutation, also for a partial last batch.

    Args:
        size: Number of training samples.
        global_batch: ``training.batch_size``; a multiple of ``world_size``.
        context: The distributed context.
        drop_last: Drop the incomplete last global batch (when there is more than one batch).

    Raises:
        ValueError: If the global batch does not divide among the ranks, or the training set
            has fewer samples than there are ranks.
    """

    def __init__(
        self, size: int, global_batch: int, context: DistributedContext, drop_last: bool = True
    ) -> None:
        check_global_batch(global_batch, context)
        world_size = context.world_size
        if size < world_size:
            raise ValueError(
                f"the training set ({size} samples) must have at least one sample per "
                f"process ({world_size})"
            )
        self.size = size
        self.global_batch = global_batch
        self.context = context
        usable = size
        if drop_last and size > global_batch:
            usable = size // global_batch * global_batch

        # every rank takes the same number of batches, so that no rank waits in a collective
        partial = usable % global_batch
        if 0 < partial < world_size:
            usable -= partial
            _warn_once(
                context,
                f"the last training batch ({partial} of {size} samples) has fewer samples than "
                f"there are processes ({world_size}): it is left out of every epoch",
            )
        elif partial % world_size:
            shares = [len(range(r, partial, world_size)) for r in range(world_size)]
            _warn_once(
                context,
                f"the last training batch ({partial} of {size} samples) does not divide among "
                f"{world_size} processes: shares {shares}, which DDP weights equally, so its "
                f"samples are weighted unequally (see Note [global batch])",
            )
        self.usable = usable
        self.per_rank = len(range(context.rank, usable, world_size))
        self.seed = 0

    def set_seed(self, seed: int) -> None:
        """The epoch's seed: the permutation is a function of it alone."""
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.size, generator=generator)
        share = order[: self.usable][self.context.rank :: self.context.world_size]
        return iter(share.tolist())

    def __len__(self) -> int:
        return self.per_rank


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, ...`` in order: evaluation shards, gathered afterwards.

    Every index belongs to exactly one rank; the first ``size % W`` ranks hold one more.
    """

    def __init__(self, size: int, context: DistributedContext) -> None:
        self.indices = list(range(context.rank, size, context.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _warn_once(context: DistributedContext, message: str) -> None:
    """A warning from rank 0 only: every rank would log the same one."""
    if context.is_main:
        logger.warning(message)
