"""Writing files so that a reader, or a run killed midway, never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes ``text`` to a temporary sibling, then renames it over ``path``.

    A rename within one file system is atomic: ``path`` holds the old content or the new,
    never a part. The folder is created if needed.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(text)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
