"""Pre-flight validation of a cohort: every problem, found before any training, reported at once.

Every file is read once, to its end (read-only; nothing is ever written to the input files).
The checks, each reported with the subject and file named:

- the file: missing, unreadable, truncated or corrupt gzip (CRC and length verified), not NIfTI;
- the volume: not 3D (4D only with a single volume), an axis under ``MIN_AXIS_VOXELS`` (a
  slice or slab), voxels that are not real numbers (RGB, complex), non-finite or all-constant
  voxels, non-positive or absurd voxel sizes, a singular affine;
- the table: no images at all, fewer than two classes for a classification, missing or
  unknown labels, non-numeric regression targets, duplicate rows (the same subject and
  session in two rows), a subject with two different class labels, the same image content
  under two subject ids, too few subjects (of a class, or to train and validate in every fold)
  for the requested folds.

Regression targets may differ between a subject's images (age at each scan); class labels may
not. A problem that concerns several subjects or files (a duplicate row, a copied image) is
reported once for each of them, naming the others, so that filtering the problems by subject
or file finds it. An unexpected error while checking one image becomes a problem of that file:
one file never stops the report.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import math
import os
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from enn_neuro.data.cohort import Cohort, CohortError, ImageRecord, Problem, Task
from enn_neuro.data.splits import fold_count_problems

__all__ = ["ImageSummary", "ValidationReport", "validate_cohort"]

logger = logging.getLogger(__name__)

MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 20.0
MIN_AXIS_VOXELS = 8  # fewer along any axis: a slice or a slab, not a volume
VOXEL_DTYPE_KINDS = "biuf"  # numpy kinds of real voxel values: bool, signed, unsigned, float


@dataclass(frozen=True)
class ImageSummary:
    """What the pre-flight check learned about one readable image.

    Attributes:
        path: The file.
        shape: Spatial shape (3 values).
        voxel_mm: Voxel size in mm (3 values).
        orientation: Axis codes of the affine, e.g. ``("R", "A", "S")``.
        dtype: Data type on disk.
        content_hash: SHA-256 of the decoded voxel values as float32 in closest-RAS voxel
            order, and of that shape, for duplicate detection: the same scan stored as int16
            or float32, RAS or LPS, hashes alike (as stored when the affine is singular).
    """

    path: Path
    shape: tuple[int, ...]
    voxel_mm: tuple[float, ...]
    orientation: tuple[str, ...]
    dtype: str
    content_hash: str


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_cohort`.

    Attributes:
        cohort: The cohort checked.
        problems: Every problem found; empty when the cohort is usable.
        images: Summaries of the images that could be read, by path.
    """

    cohort: Cohort
    problems: list[Problem] = field(default_factory=list)
    images: dict[Path, ImageSummary] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems

    def content_hashes(self) -> dict[Path, str]:
        """Image path → content hash, for the leakage check of the splits."""
        return {path: summary.content_hash for path, summary in self.images.items()}

    def raise_if_problems(self) -> None:
        """Raises :class:`CohortError` listing every problem, if there is any."""
        if self.problems:
            raise CohortError(self.cohort.source, self.problems)

    def summary(self) -> str:
        """A few lines for a person: counts, classes, shapes, spacings, orientations."""
        cohort = self.cohort
        lines = [
            f"cohort {cohort.source}: {len(cohort.records)} images, "
            f"{len(cohort.subjects)} subjects, task {cohort.task.value} on {cohort.target!r}"
        ]
        if cohort.task is Task.CLASSIFICATION:
            counts = Counter(cohort.subject_table()["target"])
            lines.append("subjects per class: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        if self.images:
            orientations = Counter("".join(s.orientation) for s in self.images.values())
            spacings = Counter(tuple(round(v, 2) for v in s.voxel_mm) for s in self.images.values())
            lines.append(f"orientations: {dict(orientations)}")
            lines.append(f"voxel sizes (mm): {dict(spacings)}")
        lines.append(f"problems: {len(self.problems)}")
        lines.extend(f"  - {p}" for p in self.problems)
        return "\n".join(lines)


def validate_cohort(
    cohort: Cohort,
    n_folds: int | None = 5,
    workers: int | None = None,
) -> ValidationReport:
    """Checks every image and row of ``cohort`` and returns all problems found.

    Args:
        cohort: The cohort, as read by :func:`~enn_neuro.data.cohort.load_cohort`.
        n_folds: Folds of the planned cross-validation; each class needs at least this many
            subjects (see :func:`~enn_neuro.data.splits.fold_count_problems`). ``None`` skips
            the check.
        workers: Threads reading images (decompression releases the GIL); a small default.

    Returns:
        The report; call ``raise_if_problems()`` to stop on any problem.
    """
    report = ValidationReport(cohort, problems=list(cohort.read_problems))

    # every image, read once
    workers = workers or min(4, os.cpu_count() or 1)
    paths = list(dict.fromkeys(r.image for r in cohort.records))
    subject_of = {r.image: r.subject_id for r in cohort.records}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_check_image, paths))
    for path, (summary, problems) in zip(paths, results, strict=True):
        if summary is not None:
            report.images[path] = summary
        report.problems.extend(
            Problem(p.message, subject_of[path], path, p.field) for p in problems
        )

    # the rows: targets, classes, duplicates, consistency
    report.problems.extend(_check_cohort_size(cohort))
    report.problems.extend(_check_targets(cohort))
    report.problems.extend(_check_duplicates(cohort, report.images))
    if n_folds is not None:
        report.problems.extend(fold_count_problems(cohort, n_folds))

    logger.info("validated %s: %d problem(s)", cohort.source, len(report.problems))
    return report


def _check_image(path: Path) -> tuple[ImageSummary | None, list[Problem]]:
    """Reads one image; returns its summary (if readable) and its problems.

    Never raises: an error the checks did not foresee becomes a problem of this file, since an
    exception inside the worker pool would abort the report of the whole cohort.
    """
    try:
        return _read_and_check_image(path)
    except Exception as err:
        logger.debug("unexpected error while checking %s", path, exc_info=True)
        message = f"unexpected error while checking the image: {type(err).__name__}: {err}"
        return None, [Problem(message, path=path, field="image")]


def _read_and_check_image(path: Path) -> tuple[ImageSummary | None, list[Problem]]:
    """The checks of :func:`_check_image`, which may raise on inputs nobody foresaw."""
    if not path.exists():
        return None, [Problem("file not found", path=path, field="image")]
    if not path.is_file():
        return None, [Problem("not a file", path=path, field="image")]
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return None, [Problem("not a NIfTI file name (.nii or .nii.gz)", path=path, field="image")]

    # the whole file, decompressed to its end: nibabel reads only the bytes it needs, so a bad
    # CRC or missing trailer would pass, and a changed byte would decode to wrong voxels
    try:
        raw = _read_decompressed(path)
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:
        return None, [Problem(f"corrupt gzip: {err}", path=path, field="image")]
    except OSError as err:
        return None, [Problem(f"cannot read the file: {err}", path=path, field="image")]

    # the header, parsed from those bytes
    image_class = _nifti_class(raw)
    if image_class is None:
        message = "not a readable NIfTI file: no NIfTI-1 or NIfTI-2 header"
        return None, [Problem(message, path=path, field="image")]
    try:
        image = image_class.from_bytes(raw)
    except Exception as err:  # nibabel raises many types for broken headers
        return None, [Problem(f"not a readable NIfTI file: {err}", path=path, field="image")]

    problems = []
    shape = image.shape
    if len(shape) > 3 and all(size == 1 for size in shape[3:]):
        shape = shape[:3]  # (X, Y, Z, 1) or (X, Y, Z, 1, 1): one volume, as the loader reads it
    elif len(shape) != 3:
        volumes = f" with {shape[3]} volumes" if len(shape) == 4 else ""
        message = f"must be a 3D volume (or 4D with one volume), got shape {shape}{volumes}"
        return None, [Problem(message, path=path, field="image")]
    if min(shape) < MIN_AXIS_VOXELS:
        message = (
            f"every axis must have at least {MIN_AXIS_VOXELS} voxels, got shape {shape}: "
            "a slice or slab, not a volume"
        )
        problems.append(Problem(message, path=path, field="image"))

    # voxel sizes as written (nibabel repairs zero or negative pixdim on load, with a log
    # line only) and as implied by the affine, which is what resampling uses
    header_mm = _raw_voxel_sizes(raw, image_class.header_class)
    affine_mm = tuple(round(float(v), 6) for v in nib.affines.voxel_sizes(image.affine)[:3])
    for source, sizes in (("header", header_mm), ("affine", affine_mm)):
        if not all(MIN_VOXEL_MM <= v <= MAX_VOXEL_MM for v in sizes):
            problems.append(
                Problem(
                    f"voxel size {sizes} mm outside [{MIN_VOXEL_MM}, {MAX_VOXEL_MM}] mm "
                    f"(from the {source})",
                    path=path,
                    field="voxel_size",
                )
            )
            break
    linear = image.affine[:3, :3]
    singular = not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-6
    if singular:
        problems.append(Problem("singular or non-finite affine", path=path, field="affine"))
        orientation = ("?", "?", "?")
    else:
        orientation = nib.aff2axcodes(image.affine)

    # the voxel type: an RGB (structured) or complex volume has no intensity to learn from,
    # and np.isfinite raises on a structured array
    dtype = image.get_data_dtype()
    if dtype.kind not in VOXEL_DTYPE_KINDS:
        label = image.header.get_value_label("datatype")
        message = (
            f"voxel data type must be integer or floating point, got {label} ({dtype}); "
            "convert the image to a single real-valued channel"
        )
        return None, [*problems, Problem(message, path=path, field="dtype")]

    # the voxels
    try:
        data = np.asanyarray(image.dataobj).reshape(shape)
    except Exception as err:  # a short .nii raises from numpy or nibabel
        return None, [
            *problems,
            Problem(f"cannot read the voxels: {err}", path=path, field="image"),
        ]
    finite = np.isfinite(data)
    if not finite.all():
        count = int(data.size - finite.sum())
        problems.append(
            Problem(f"{count} non-finite voxel(s) (NaN or inf)", path=path, field="voxels")
        )
    elif data.size == 0 or data.min() == data.max():
        value = data.flat[0] if data.size else "empty"
        problems.append(Problem(f"all voxels are constant ({value})", path=path, field="voxels"))

    summary = ImageSummary(
        path=path,
        shape=tuple(int(s) for s in shape),
        voxel_mm=header_mm,
        orientation=tuple(orientation),
        dtype=str(image.get_data_dtype()),
        content_hash=_content_hash(data, None if singular else image.affine),
    )
    return summary, problems


def _read_decompressed(path: Path) -> bytes:
    """The file's bytes; a ``.gz`` is decompressed to its end, so gzip checks CRC and length.

    Raises:
        gzip.BadGzipFile, zlib.error, EOFError: For corrupt or truncated gzip data.
        OSError: If the file cannot be read.
    """
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as stream:
            return stream.read()
    return path.read_bytes()


def _nifti_class(raw: bytes) -> type[nib.Nifti1Image] | type[nib.Nifti2Image] | None:
    """The single-file NIfTI image class whose header ``raw`` starts with, if any."""
    # NIfTI-2 first: its check (sizeof_hdr 540) is the stricter of the two
    for image_class in (nib.Nifti2Image, nib.Nifti1Image):
        header_class = image_class.header_class
        if header_class.may_contain_header(raw[: header_class.sizeof_hdr]):
            return image_class
    return None


def _content_hash(data: np.ndarray, affine: np.ndarray | None) -> str:
    """SHA-256 of the voxels as float32 in closest-RAS order, and of their shape.

    Args:
        data: The decoded voxels, ``(X, Y, Z)`` as stored.
        affine: The image's affine; ``None`` (a singular affine) hashes the voxels as stored.
    """
    if affine is not None:
        # nibabel's as_closest_canonical would read the voxels again: its two steps, on the
        # array already read
        data = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(affine))
    values = np.array(data, dtype=np.float32, order="C")
    values += 0.0  # -0.0 becomes 0.0: equal values, equal bytes
    digest = hashlib.sha256(str(values.shape).encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def _raw_voxel_sizes(raw: bytes, header_class: type) -> tuple[float, ...]:
    """pixdim[1:4] exactly as stored, without nibabel's repairs."""
    header = header_class.from_fileobj(io.BytesIO(raw), check=False)
    return tuple(round(float(v), 6) for v in header["pixdim"][1:4])


def _check_cohort_size(cohort: Cohort) -> list[Problem]:
    """No images at all; fewer than two classes (given or found) for a classification."""
    if not cohort.records:
        return [Problem("the cohort has no images", path=cohort.source, field="image")]
    if cohort.task is Task.CLASSIFICATION and len(cohort.classes) < 2:
        message = (
            f"a classification needs at least two classes in {cohort.target!r}, "
            f"got {cohort.classes}"
        )
        return [Problem(message, field=cohort.target)]
    return []


def _check_targets(cohort: Cohort) -> list[Problem]:
    problems = []
    targets_of = defaultdict(set)
    for record in cohort.records:
        targets_of[record.subject_id].add(record.target)
        problem = _target_problem(cohort, record)
        if problem:
            problems.append(Problem(problem, record.subject_id, record.image, cohort.target))

    # one label per subject; a regression target may change between scans (age at each scan)
    if cohort.task is Task.REGRESSION:
        return problems
    for subject_id, targets in targets_of.items():
        if len(targets) > 1:
            shown = ", ".join(sorted(map(repr, targets)))  # repr: None sorts among labels
            message = f"different labels for one subject: {shown}"
            problems.append(Problem(message, subject_id, None, cohort.target))
    return problems


def _target_problem(cohort: Cohort, record: ImageRecord) -> str | None:
    value = record.target
    if value is None:
        return f"missing {cohort.target!r} ({record.source})"
    if cohort.task is Task.REGRESSION:
        if isinstance(value, str):
            return f"{cohort.target!r} must be a number, got {value!r} ({record.source})"
        if not math.isfinite(value):
            return f"{cohort.target!r} must be finite, got {value!r} ({record.source})"
        return None
    if value not in cohort.classes:
        return f"unknown label {value!r}; expected one of {cohort.classes} ({record.source})"
    return None


def _check_duplicates(cohort: Cohort, images: dict[Path, ImageSummary]) -> list[Problem]:
    problems = []

    # the same subject and session in two rows; the images of one row (the T1w runs of a BIDS
    # session, which share the participants.tsv row) are not duplicates
    rows = defaultdict(dict)
    for record in cohort.records:
        row = record.source or record.image  # a cohort built in code may name no rows
        rows[(record.subject_id, record.session_id)].setdefault(row, record)
    for (subject_id, session_id), by_source in rows.items():
        if len(by_source) < 2:
            continue
        session = f" session {session_id!r}" if session_id else ""
        for source, record in by_source.items():
            others = ", ".join(_row_name(r) for row, r in by_source.items() if row != source)
            this = record.source or "this row"
            message = f"duplicate subject id{session}: {len(by_source)} rows, {this} and {others}"
            problems.append(Problem(message, subject_id, record.image, "subject_id"))

    # the same image content under two subject ids: one problem per subject, naming the others
    subjects_of_content = defaultdict(dict)
    for record in cohort.records:
        summary = images.get(record.image)
        if summary is not None:
            subjects_of_content[summary.content_hash].setdefault(record.subject_id, record.image)
    for owners in subjects_of_content.values():
        if len(owners) < 2:
            continue
        for subject_id, image in owners.items():
            others = ", ".join(f"{s} ({p})" for s, p in owners.items() if s != subject_id)
            message = f"the same image content under {len(owners)} subject ids: also {others}"
            problems.append(Problem(message, subject_id, image, "image"))
    return problems


def _row_name(record: ImageRecord) -> str:
    """A row of the cohort for a message: its line and its image."""
    return f"{record.source} ({record.image})" if record.source else str(record.image)
