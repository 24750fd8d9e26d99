"""Tiny NIfTI cohorts written on the fly."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def write_volume(
    path: Path,
    data: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    seed: int = 0,
    shape: tuple[int, ...] = (8, 8, 8),
) -> Path:
    """Writes a small NIfTI volume (random smooth-ish content unless ``data`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    nib.save(
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path
    )
    return path


def write_table(path: Path, rows: list[dict], separator: str = ",") -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [separator.join(columns)]
    lines += [separator.join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def valid_table(tmp_path) -> Path:
    """A CSV cohort of 10 subjects (5 per class), one image each, paths relative."""
    rows = []
    for index in range(10):
        subject = f"sub-{index:02d}"
        write_volume(tmp_path / "images" / f"{subject}.nii.gz", seed=index)
        rows.append(
            {
                "subject_id": subject,
                "image": f"images/{subject}.nii.gz",
                "diagnosis": "patient" if index % 2 else "control",
                "age": 60 + index,
                "site": "A" if index < 5 else "B",
                "sex": "F" if index % 3 else "M",
            }
        )
    return write_table(tmp_path / "cohort.csv", rows)


def patch_header(path: Path, **fields) -> Path:
    """Rewrites NIfTI header fields in place, as a broken scanner export would have them.

    nibabel refuses to save some broken headers (a singular affine, a zero voxel size), so
    the bytes are edited directly.
    """
    raw = path.read_bytes()
    compressed = path.name.endswith(".gz")
    if compressed:
        raw = gzip.decompress(raw)
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    for name, value in fields.items():
        header[name] = value
    raw = header.binaryblock + raw[len(header.binaryblock) :]
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    return path
