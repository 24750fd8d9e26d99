"""Process settings for training: keep freed host memory for reuse (glibc's malloc).

A training step allocates and frees the same tensors every step. glibc's malloc serves large
blocks with an ``mmap`` of their own and unmaps them when freed, and returns the free top of
its heap to the system past a threshold, so the next step takes a page fault for every 4 KiB
it touches again, and the kernel zeroes each page. On 2 CPU cores a plain 2D ResNet-50 step
(224², batch 32) took 1.8 million faults and spent 40% of its CPU time in the kernel, in
5.5–5.8 s; keeping freed memory for reuse, as the caching allocators of CUDA, jemalloc or
tcmalloc do, removed the faults and the step took 2.8–2.9 s. A plain 3D ResNet-18 step (64³,
batch 2) went from 0.24 s (55 000 faults) to 0.18–0.20 s. The price: the process keeps its
peak heap until it exits, and blocks freed out of order make that heap larger than the peak
of live memory: 4.6 GiB against a 3.8 GiB peak for the 2D ResNet-50 above, the same (0.9
GiB) for the 3D ResNet-18 and for the demo study. The command line (:func:`enn_neuro.cli.main`) and
``benchmarks/enn_overhead.py`` set this up first thing; a notebook can call
:func:`retain_freed_memory` itself.

Only glibc is tuned (Linux); elsewhere, or with ``ENN_NEURO_MALLOC=system``, nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["MALLOC_ENV", "retain_freed_memory"]

logger = logging.getLogger(__name__)

MALLOC_ENV = "ENN_NEURO_MALLOC"
"""Set to ``system`` to leave the C library's allocator as it is."""

# mallopt(3) parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system.

    Two ``mallopt`` settings: no ``mmap`` for large blocks (``M_MMAP_MAX = 0``: they come
    from the heap, and a freed one is reused by the next), and no trimming of the heap
    (``M_TRIM_THRESHOLD = -1``). Both apply to later allocations of the whole process,
    DataLoader workers forked afterwards included.

    Returns:
        Whether the allocator was tuned: ``False`` outside glibc, when ``mallopt`` refuses a
        value, or when ``ENN_NEURO_MALLOC=system`` asks to leave it alone.
    """
    if os.environ.get(MALLOC_ENV, "").lower() == "system":
        return False
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 disables trimming (mallopt(3))
    tuned = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    if not tuned:
        logger.warning("glibc's mallopt refused a setting: freed memory may still be unmapped")
    return tuned


def _is_glibc() -> bool:
    try:  # "glibc 2.36"; musl and other C libraries do not know the name
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False
