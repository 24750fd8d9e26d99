"""Writing files so that a reader, or a run killed midway, never sees half of one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["remove_stale_temporaries", "temporary_sibling", "write_text_atomic"]

logger = logging.getLogger(__name__)

_TEMPORARY_MARK = ".tmp-"


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes ``text`` to a temporary sibling, then renames it over ``path``.

    A rename within one file system is atomic: ``path`` holds the old content or the new,
    never a part. The folder is created if needed.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        temporary.write_text(text)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def temporary_sibling(path: Path) -> Path:
    """The hidden file an atomic write of ``path`` goes through (one per process)."""
    return path.with_name(f".{path.name}{_TEMPORARY_MARK}{os.getpid()}")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Deletes the temporaries that writers killed midway (``kill -9``) left in ``folder``.

    Call it only where no other process is writing into ``folder``: a live writer's
    temporary looks the same.

    Returns:
        The files removed.
    """
    stale = sorted(Path(folder).glob(f".*{_TEMPORARY_MARK}*"))
    for path in stale:
        path.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted write", path)
    return stale
