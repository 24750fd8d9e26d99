"""Cohorts: which images, of which subjects, with which target.

A cohort is read from a table (CSV or TSV, one row per image) or from a BIDS dataset
(``participants.tsv`` plus ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``). Reading is lenient: only
problems that make the source unreadable as a whole (a missing file, a missing column) raise
at once; everything about single rows and images is collected for the pre-flight check
(:func:`enn_neuro.data.validation.validate_cohort`) so that a user sees every problem together.
"""

from __future__ import annotations

import enum
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from enn_neuro.choices import parse_choice

__all__ = [
    "Cohort",
    "CohortError",
    "ImageRecord",
    "Problem",
    "Task",
    "load_cohort",
    "read_bids",
    "read_table",
]

logger = logging.getLogger(__name__)

MISSING_VALUES = ("", "n/a", "na", "nan", "none", "null")


class Task(str, enum.Enum):
    """What the target is: class labels or a continuous value (such as age)."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cohort, located as precisely as possible.

    Attributes:
        message: What is wrong, with the offending value.
        subject_id: The subject concerned, if any.
        path: The file concerned, if any.
        field: The column or property concerned (``"image"``, ``"target"``, ...).
    """

    message: str
    subject_id: str | None = None
    path: Path | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = [part for part in (self.subject_id, self.path and str(self.path)) if part]
        return f"{' '.join(where)}: {self.message}" if where else self.message


class CohortError(ValueError):
    """A cohort cannot be used; ``problems`` lists every reason found."""

    def __init__(self, source: Path | str, problems: Sequence[Problem]) -> None:
        self.source = Path(source)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"cohort {self.source} has {count} problem{'s' * (count != 1)}:\n{lines}")


@dataclass(frozen=True)
class ImageRecord:
    """One image of one subject, with the subject's target and covariates.

    Attributes:
        subject_id: Subject identifier (``sub-001``).
        image: Absolute path of the NIfTI file.
        target: Class label (text) or target value (float); ``None`` when missing. For
            regression a value that is not a number is kept as text for the report.
        session_id: Session identifier, if any.
        site: Acquisition site, if known.
        sex: Sex, if known.
        age: Age in years, if known.
        source: Where the record came from, e.g. ``cohort.csv:12`` (row of the file).
    """

    subject_id: str
    image: Path
    target: str | float | None
    session_id: str | None = None
    site: str | None = None
    sex: str | None = None
    age: float | None = None
    source: str = ""


@dataclass
class Cohort:
    """The images of a study and what to predict from them.

    Attributes:
        records: One per image.
        task: Classification or regression.
        target: Name of the target column.
        source: The table or BIDS root it was read from.
        classes: Class labels in index order (classification only).
        read_problems: Problems found while reading, reported by the pre-flight check.
    """

    records: list[ImageRecord]
    task: Task
    target: str
    source: Path
    classes: list[str] = field(default_factory=list)
    read_problems: list[Problem] = field(default_factory=list)

    @property
    def subjects(self) -> list[str]:
        """Distinct subject ids, in order of first appearance."""
        return list(dict.fromkeys(r.subject_id for r in self.records))

    def subject_table(self) -> pd.DataFrame:
        """One row per subject: ``subject_id``, ``target``, ``site``, ``sex``, ``age``.

        Covariates are those of the subject's first image, and so is a class label (the
        pre-flight check requires one label per subject). A regression target may differ
        between a subject's images (age at each scan): ``target`` is then the mean of the
        subject's values, or the first value if any of them is not a number (the pre-flight
        check reports it).
        """
        rows = {}
        targets_of = defaultdict(list)
        for record in self.records:
            rows.setdefault(
                record.subject_id,
                {
                    "subject_id": record.subject_id,
                    "target": record.target,
                    "site": record.site,
                    "sex": record.sex,
                    "age": record.age,
                },
            )
            targets_of[record.subject_id].append(record.target)
        if self.task is Task.REGRESSION:
            for subject_id, targets in targets_of.items():
                if all(isinstance(t, float) for t in targets):
                    rows[subject_id]["target"] = statistics.fmean(targets)
        return pd.DataFrame(
            list(rows.values()), columns=["subject_id", "target", "site", "sex", "age"]
        )

    def label_of(self, record: ImageRecord) -> int | float:
        """The model's target for a record: class index, or the float value.

        Raises:
            ValueError: If the record's target is missing or unknown (validate first).
        """
        if self.task is Task.REGRESSION:
            if not isinstance(record.target, float) or not math.isfinite(record.target):
                raise ValueError(f"{record.subject_id}: target {record.target!r} is not a number")
            return record.target
        if record.target not in self.classes:
            raise ValueError(
                f"{record.subject_id}: label {record.target!r} is not one of {self.classes}"
            )
        return self.classes.index(record.target)

    def to_samples(self, subjects: Sequence[str] | None = None) -> list[dict]:
        """MONAI-style samples ``{"image", "label", "subject_id", "session_id", "image_path"}``.

        ``image_path`` repeats the path, since the dataset replaces ``image`` by the volume.

        Args:
            subjects: Keep only these subjects; all when ``None``.
        """
        keep = None if subjects is None else set(subjects)
        return [
            {
                "image": str(r.image),
                "label": self.label_of(r),
                "subject_id": r.subject_id,
                "session_id": r.session_id or "",
                "image_path": str(r.image),
            }
            for r in self.records
            if keep is None or r.subject_id in keep
        ]


def load_cohort(
    path: str | Path,
    target: str,
    task: Task | str = Task.CLASSIFICATION,
    classes: Sequence[str] | None = None,
    image_column: str = "image",
) -> Cohort:
    """Reads a cohort from a table (``.csv``/``.tsv``) or a BIDS directory.

    Args:
        path: A CSV/TSV file, or the root of a BIDS dataset.
        target: The column holding the label or value to predict.
        task: ``"classification"`` or ``"regression"``.
        classes: Allowed class labels, in index order; the sorted labels found when ``None``.
        image_column: Column of image paths in a table (relative to the table's folder).

    Returns:
        The cohort; problems with single rows are in ``read_problems``.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CohortError: If the source lacks a required column or cannot be parsed.
        ValueError: For an unknown task.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cohort not found: {path}")
    if path.is_dir():
        return read_bids(path, target, task, classes)
    return read_table(path, target, task, classes, image_column)


def read_table(
    path: str | Path,
    target: str,
    task: Task | str = Task.CLASSIFICATION,
    classes: Sequence[str] | None = None,
    image_column: str = "image",
) -> Cohort:
    """Reads a cohort table: one row per image.

    Required columns: ``subject_id``, ``image_column`` and ``target``; optional
    ``session_id``, ``site``, ``sex``, ``age``. Image paths are relative to the table's folder
    (absolute paths are kept).

    Args:
        path: A ``.csv`` or ``.tsv`` file.
        target: The target column.
        task: ``"classification"`` or ``"regression"``.
        classes: Allowed labels in index order.
        image_column: The column of image paths.

    Returns:
        The cohort.

    Raises:
        FileNotFoundError: If the file does not exist.
        CohortError: For an unknown extension, an unparsable file or missing columns.
    """
    path = Path(path).resolve()
    task = _parse_task(task)
    if not path.is_file():
        raise FileNotFoundError(f"cohort table not found: {path}")
    table = _read_text_table(path)
    _require_columns(path, table, ["subject_id", image_column, target])

    records, problems = [], []
    for index, row in table.iterrows():
        line = f"{path.name}:{index + 2}"  # header is line 1
        subject_id = row["subject_id"].strip()
        if not subject_id:
            problems.append(Problem(f"{line}: empty subject_id", field="subject_id"))
            continue
        image_text = row[image_column].strip()
        if not image_text:
            problems.append(Problem(f"{line}: empty {image_column!r}", subject_id, field="image"))
            continue
        image = Path(image_text)
        image = image if image.is_absolute() else path.parent / image
        records.append(
            ImageRecord(
                subject_id=subject_id,
                image=image,
                target=_parse_target(row[target], task),
                session_id=_optional(row, "session_id"),
                site=_optional(row, "site"),
                sex=_optional(row, "sex"),
                age=_age(row, line, subject_id, problems, target),
                source=line,
            )
        )
    cohort = Cohort(records, task, target, path, read_problems=problems)
    cohort.classes = _classes_of(cohort, classes)
    logger.info("read %d images of %d subjects from %s", len(records), len(cohort.subjects), path)
    return cohort


def read_bids(
    root: str | Path,
    target: str,
    task: Task | str = Task.CLASSIFICATION,
    classes: Sequence[str] | None = None,
) -> Cohort:
    """Reads the T1-weighted images of a BIDS dataset and its ``participants.tsv``.

    Images are ``sub-<id>/anat/*_T1w.nii[.gz]`` and ``sub-<id>/ses-<id>/anat/*_T1w.nii[.gz]``,
    names ending exactly so (``*_T1w.nii.gz.orig`` is not an image); several per session (runs,
    acquisitions) are several images of the subject. Subject covariates come from
    ``participants.tsv`` (``participant_id`` and the target, with optional ``site``, ``sex``,
    ``age``). A participant without an image, an image without a participant row, and one
    image name stored both as ``.nii`` and as ``.nii.gz`` are reported.

    Args:
        root: The dataset's root folder.
        target: The column of ``participants.tsv`` to predict.
        task: ``"classification"`` or ``"regression"``.
        classes: Allowed labels in index order.

    Returns:
        The cohort.

    Raises:
        FileNotFoundError: If ``participants.tsv`` is missing.
        CohortError: If it lacks ``participant_id`` or the target column.
    """
    root = Path(root).resolve()
    task = _parse_task(task)
    participants_path = root / "participants.tsv"
    if not participants_path.is_file():
        raise FileNotFoundError(f"BIDS dataset {root} has no participants.tsv")
    participants = _read_text_table(participants_path)
    _require_columns(participants_path, participants, ["participant_id", target])

    rows = {}
    problems = []
    for index, row in participants.iterrows():
        subject_id = row["participant_id"].strip()
        if subject_id in rows:
            problems.append(
                Problem(
                    f"participants.tsv:{index + 2}: duplicate participant_id {subject_id!r}",
                    subject_id,
                    participants_path,
                    "subject_id",
                )
            )
            continue
        rows[subject_id] = (index, row)

    images = _t1w_images(root)
    problems.extend(_stored_twice(root, images))
    records, subjects_with_images = [], set()
    age_of: dict[str, float | None] = {}  # parsed once per subject: reported once, not per image
    for image in images:
        subject_id = image.relative_to(root).parts[0]
        session = image.parent.parent.name if image.parent.parent.name.startswith("ses-") else None
        if subject_id not in rows:
            problems.append(
                Problem("image has no row in participants.tsv", subject_id, image, "subject_id")
            )
            continue
        subjects_with_images.add(subject_id)
        index, row = rows[subject_id]
        line = f"participants.tsv:{index + 2}"
        if subject_id not in age_of:
            age_of[subject_id] = _age(row, line, subject_id, problems, target)
        records.append(
            ImageRecord(
                subject_id=subject_id,
                image=image,
                target=_parse_target(row[target], task),
                session_id=session,
                site=_optional(row, "site"),
                sex=_optional(row, "sex"),
                age=age_of[subject_id],
                source=line,
            )
        )
    for subject_id in rows.keys() - subjects_with_images:
        problems.append(
            Problem(
                "no T1w image found (sub-*/[ses-*/]anat/*_T1w.nii[.gz])",
                subject_id,
                root / subject_id,
                "image",
            )
        )
    cohort = Cohort(records, task, target, root, read_problems=problems)
    cohort.classes = _classes_of(cohort, classes)
    logger.info("read %d images of %d subjects from %s", len(records), len(cohort.subjects), root)
    return cohort


def _t1w_images(root: Path) -> list[Path]:
    """The T1w images of a BIDS dataset: sessionless first, each group sorted."""
    images = []
    for folder in ("sub-*/anat", "sub-*/ses-*/anat"):
        # two exact patterns: "*_T1w.nii*" would also match backups such as *_T1w.nii.gz.orig
        found = [*root.glob(f"{folder}/*_T1w.nii"), *root.glob(f"{folder}/*_T1w.nii.gz")]
        images.extend(sorted(found))
    return images


def _stored_twice(root: Path, images: Sequence[Path]) -> list[Problem]:
    """One problem per BIDS image name found both as ``.nii`` and as ``.nii.gz``."""
    by_stem = defaultdict(list)
    for image in images:
        by_stem[image.parent / image.name.removesuffix(".gz").removesuffix(".nii")].append(image)
    return [
        Problem(
            f"the same image stored twice: {', '.join(p.name for p in paths)}; keep one",
            paths[0].relative_to(root).parts[0],
            paths[0],
            "image",
        )
        for paths in by_stem.values()
        if len(paths) > 1
    ]


def _parse_task(task: Task | str) -> Task:
    return parse_choice(Task, task, "task")


def _read_text_table(path: Path) -> pd.DataFrame:
    separators = {".csv": ",", ".tsv": "\t"}
    if path.suffix.lower() not in separators:
        raise CohortError(
            path, [Problem(f"table must be .csv or .tsv, got {path.suffix!r}", path=path)]
        )
    try:
        # every cell as text: labels such as "01" must not become numbers
        return pd.read_csv(
            path, sep=separators[path.suffix.lower()], dtype=str, keep_default_na=False
        )
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CohortError(path, [Problem(f"cannot parse table: {err}", path=path)]) from err


def _require_columns(path: Path, table: pd.DataFrame, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        problem = Problem(
            f"missing column(s) {missing}; the columns are {list(table.columns)}", path=path
        )
        raise CohortError(path, [problem])


def _is_missing(text: str) -> bool:
    return text.strip().lower() in MISSING_VALUES


def _parse_target(text: str, task: Task) -> str | float | None:
    if _is_missing(text):
        return None
    if task is Task.CLASSIFICATION:
        return text.strip()
    try:
        return float(text)
    except ValueError:
        return text.strip()  # reported by the pre-flight check


def _optional(row: pd.Series, column: str) -> str | None:
    if column not in row.index or _is_missing(row[column]):
        return None
    return row[column].strip()


def _age(
    row: pd.Series, line: str, subject_id: str, problems: list[Problem], target: str
) -> float | None:
    """The optional ``age`` covariate; a value that is not a number is reported.

    When age is also the target, the target check reports a bad value: not reported twice.
    """
    text = _optional(row, "age")
    if text is None:
        return None
    if target == "age":
        problems = []
    try:
        return float(text)
    except ValueError:
        problems.append(
            Problem(f"{line}: 'age' must be a number, got {text!r}", subject_id, field="age")
        )
        return None


def _classes_of(cohort: Cohort, classes: Sequence[str] | None) -> list[str]:
    if cohort.task is Task.REGRESSION:
        return []
    if classes is not None:
        return [str(c) for c in classes]
    return sorted({r.target for r in cohort.records if isinstance(r.target, str)})
