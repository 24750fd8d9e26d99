"""Subject-level cross-validation splits, with a leakage check.

Every image of a subject stays in one role of a fold. Outer folds come from scikit-learn's
:class:`~sklearn.model_selection.StratifiedGroupKFold` (groups = subjects), stratified by the
label (for regression by quantile bins of each subject's mean target, since a target may
differ between a subject's scans) and optionally by site or sex. Each
outer fold's training part is split again into ``train`` and ``val``: the validation part
serves early stopping and model selection, the ``test`` fold is never used for either.

The splits depend only on the set of subjects and the seed, not on the order of the cohort's
rows: scikit-learn's splitters work on row positions, so the subjects are sorted by id first.

A split table has one row per subject and fold: ``subject_id``, ``fold``, ``role``.
"""

from __future__ import annotations

import enum
import logging
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from enn_neuro.data.cohort import Cohort, CohortError, Problem, Task
from enn_neuro.files import write_text_atomic

__all__ = [
    "LeakageError",
    "Role",
    "check_leakage",
    "fold_count_problems",
    "make_splits",
    "read_split_table",
    "write_split_table",
]

logger = logging.getLogger(__name__)

SPLIT_COLUMNS = ["subject_id", "fold", "role"]
STRATIFY_OPTIONS = ("site", "sex")


class Role(str, enum.Enum):
    """The part a subject plays in one fold."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class LeakageError(ValueError):
    """A subject or an image content appears in two roles of one fold."""


def make_splits(
    cohort: Cohort,
    n_folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    stratify_by: Sequence[str] = (),
    n_bins: int = 4,
    content_hashes: Mapping[Path | str, str] | None = None,
) -> pd.DataFrame:
    """Subject-level stratified k-fold with an inner train/validation split.

    Args:
        cohort: A validated cohort.
        n_folds: Outer folds; each subject is ``test`` in exactly one.
        val_fraction: Share of each fold's training subjects held out for validation.
        seed: Makes the splits reproducible; with the set of subjects, it alone decides them.
        stratify_by: Extra subject columns to stratify on: ``"site"``, ``"sex"``. Subjects
            without a value form their own stratum; a column no subject has is an error.
        n_bins: Quantile bins of the subjects' mean targets for regression; fewer when a bin
            would hold fewer subjects than there are folds.
        content_hashes: Image path → content hash (``ValidationReport.content_hashes()``);
            when given, the leakage check also catches one image stored under two subjects.

    Returns:
        The split table, sorted by fold and subject.

    Raises:
        ValueError: For a bad argument or a ``stratify_by`` column the cohort lacks.
        CohortError: If the cohort is too small for the folds (a class with fewer subjects
            than folds, a fold without a subject to train and one to validate), listing
            each class and count.
        LeakageError: If an image content ends up in two roles of one fold.
    """
    if not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer ≥ 2, got {n_folds!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    unknown = [c for c in stratify_by if c not in STRATIFY_OPTIONS]
    if unknown:
        raise ValueError(f"stratify_by must name columns among {STRATIFY_OPTIONS}, got {unknown}")
    # sorted: scikit-learn splits row positions, so the row order would otherwise decide
    subjects = cohort.subject_table().sort_values("subject_id", kind="stable")
    subjects = subjects.reset_index(drop=True)
    too_small = fold_count_problems(cohort, n_folds)
    if too_small:
        raise CohortError(cohort.source, too_small)
    absent = [c for c in stratify_by if subjects[c].isna().all()]
    if absent:
        raise ValueError(
            f"stratify_by names {absent}, but no subject of cohort {cohort.source} has a value "
            "there; add the column or drop it from stratify_by"
        )
    # regression bins of at least n_folds subjects each, so that each can reach every fold
    n_bins = max(1, min(n_bins, len(subjects) // n_folds))
    strata = _strata(subjects, cohort.task, stratify_by, n_bins)
    labels_only = _strata(subjects, cohort.task, (), n_bins)
    if pd.Series(strata).value_counts().max() < n_folds:
        # scikit-learn refuses strata that are all smaller than the folds: the label alone
        logger.warning(
            "test folds stratified by the label only: every stratum of %s is smaller than "
            "the %d folds",
            ["label", *stratify_by],
            n_folds,
        )
        strata = labels_only

    # outer folds: groups are the subjects themselves (one row per subject)
    outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    rows = []
    with warnings.catch_warnings():
        # small strata: scikit-learn warns and still balances what it can
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = list(outer.split(subjects, strata, groups=subjects["subject_id"]))
    for fold, (train_index, test_index) in enumerate(folds):
        if len(train_index) < 2:  # uneven strata can leave a fold smaller than the counts say
            message = (
                f"fold {fold} leaves {len(train_index)} subject(s) outside its test part; at "
                "least 2 are needed, one to train and one to validate"
            )
            raise CohortError(cohort.source, [Problem(message, field="subject_id")])
        train_part, val_part = _inner_split(
            train_index, (strata, labels_only), val_fraction, seed + fold
        )
        for index, role in (
            *((i, Role.TRAIN) for i in train_part),
            *((i, Role.VAL) for i in val_part),
            *((i, Role.TEST) for i in test_index),
        ):
            rows.append((subjects.at[index, "subject_id"], fold, role.value))
    table = pd.DataFrame(rows, columns=SPLIT_COLUMNS).sort_values(["fold", "subject_id"])
    table = table.reset_index(drop=True)
    check_leakage(table, cohort, content_hashes)
    logger.info("made %d folds over %d subjects (seed %d)", n_folds, len(subjects), seed)
    return table


def fold_count_problems(cohort: Cohort, n_folds: int) -> list[Problem]:
    """Why ``cohort`` is too small for ``n_folds`` subject-level folds; empty if it is not.

    Each class needs a subject in every test fold, and every fold needs at least two subjects
    outside its test part: one to train and one to validate.

    Args:
        cohort: The cohort; subjects of a classification with an unknown label are not counted.
        n_folds: Outer folds of the planned cross-validation.

    Returns:
        One problem per class with too few subjects, and one for too few subjects overall.
    """
    subjects = cohort.subject_table()
    problems = []
    if cohort.task is Task.CLASSIFICATION:
        counts = Counter(t for t in subjects["target"] if t in cohort.classes)
        problems += [
            Problem(
                f"class {label!r} has {counts.get(label, 0)} subject(s), fewer than the "
                f"{n_folds} folds requested",
                field=cohort.target,
            )
            for label in cohort.classes
            if counts.get(label, 0) < n_folds
        ]
    count = len(subjects)
    if count < n_folds:
        message = f"{count} subjects cannot fill {n_folds} folds"
        problems.append(Problem(message, field="subject_id"))
    elif count - math.ceil(count / n_folds) < 2:
        message = (
            f"{count} subjects in {n_folds} folds leave {count - math.ceil(count / n_folds)} "
            "subject(s) outside a test fold; at least 2 are needed, one to train and one to "
            "validate"
        )
        problems.append(Problem(message, field="subject_id"))
    return problems


def check_leakage(
    split_table: pd.DataFrame,
    cohort: Cohort,
    content_hashes: Mapping[Path | str, str] | None = None,
) -> None:
    """Raises if any subject, or any image content, appears in two roles of one fold.

    Args:
        split_table: ``subject_id``, ``fold``, ``role``.
        cohort: The cohort the table splits.
        content_hashes: Image path → content hash (from the validation report); when given,
            the same image stored under two subjects in different roles is caught too.

    Raises:
        LeakageError: Naming the fold, the subjects and the roles.
    """
    for fold, part in split_table.groupby("fold"):
        roles_of = part.groupby("subject_id")["role"].unique()
        doubled = {s: sorted(r) for s, r in roles_of.items() if len(r) > 1}
        if doubled:
            raise LeakageError(f"fold {fold}: subjects in more than one role: {doubled}")
        if content_hashes is None:
            continue
        role_of = dict(zip(part["subject_id"], part["role"], strict=True))
        seen: dict[str, tuple[str, str]] = {}
        for record in cohort.records:
            content = content_hashes.get(record.image)
            role = role_of.get(record.subject_id)
            if content is None or role is None:
                continue
            other = seen.setdefault(content, (record.subject_id, role))
            if other[1] != role:
                raise LeakageError(
                    f"fold {fold}: the same image content is {other[1]} ({other[0]}) and "
                    f"{role} ({record.subject_id}, {record.image})"
                )


def write_split_table(split_table: pd.DataFrame, path: str | Path) -> Path:
    """Writes the table as TSV (or CSV for a ``.csv`` path), atomically."""
    separator = "," if Path(path).suffix.lower() == ".csv" else "\t"
    return write_text_atomic(path, split_table[SPLIT_COLUMNS].to_csv(sep=separator, index=False))


def read_split_table(
    path: str | Path,
    cohort: Cohort,
    content_hashes: Mapping[Path | str, str] | None = None,
) -> pd.DataFrame:
    """Reads a user-supplied split table and checks it against ``cohort``.

    Every fold needs subjects in all three roles; subjects must belong to the cohort and
    play one role per fold. Cohort subjects absent from a fold are left out of it (logged).

    Args:
        path: A ``.tsv`` (or ``.csv``) file with ``subject_id``, ``fold``, ``role``.
        cohort: The cohort the table splits.
        content_hashes: Image path → content hash (``ValidationReport.content_hashes()``);
            when given, one image stored under subjects of two roles is caught too.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If the file is empty, unparsable or has no rows; otherwise naming the
            column, value or subject that is wrong.
        LeakageError: If a subject, or an image content, plays two roles in one fold.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split table not found: {path}")
    separator = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        table = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"split table {path} is empty; expected columns {SPLIT_COLUMNS}") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"split table {path}: cannot parse: {err}") from err
    missing = [c for c in SPLIT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"split table {path}: missing column(s) {missing}")
    if table.empty:
        raise ValueError(f"split table {path} has a header but no rows")
    table = table[SPLIT_COLUMNS].copy()
    table["subject_id"] = table["subject_id"].str.strip()
    bad_folds = sorted({f for f in table["fold"] if not f.strip().isdigit()})
    if bad_folds:
        raise ValueError(f"split table {path}: 'fold' must be integers ≥ 0, got {bad_folds}")
    table["fold"] = table["fold"].astype(int)
    roles = {r.value for r in Role}
    bad_roles = sorted(set(table["role"]) - roles)
    if bad_roles:
        raise ValueError(
            f"split table {path}: 'role' must be one of {sorted(roles)}, got {bad_roles}"
        )
    unknown = sorted(set(table["subject_id"]) - set(cohort.subjects))
    if unknown:
        raise ValueError(f"split table {path}: subjects not in the cohort: {unknown[:10]}")
    for fold, part in table.groupby("fold"):
        absent = sorted(roles - set(part["role"]))
        if absent:
            raise ValueError(f"split table {path}: fold {fold} has no {absent} subjects")
        left_out = len(set(cohort.subjects) - set(part["subject_id"]))
        if left_out:
            logger.info("split table %s: fold %d leaves out %d subject(s)", path, fold, left_out)
    check_leakage(table, cohort, content_hashes)
    return table.sort_values(["fold", "subject_id"]).reset_index(drop=True)


def _strata(
    subjects: pd.DataFrame, task: Task, stratify_by: Sequence[str], n_bins: int
) -> np.ndarray:
    """One stratum label per subject: the label (or target bin), joined with covariates."""
    if task is Task.REGRESSION:
        values = pd.to_numeric(subjects["target"])
        bins = pd.qcut(values, q=min(n_bins, len(values)), labels=False, duplicates="drop")
        key = bins.fillna(0).astype(int).astype(str)  # one value throughout: no bin edges, NaN
    else:
        key = subjects["target"].astype(str)
    for column in stratify_by:
        key = key + "|" + subjects[column].fillna("unknown").astype(str)
    return key.to_numpy()


def _inner_split(
    train_index: np.ndarray,
    strata_choices: Sequence[np.ndarray],
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Splits a fold's training subjects into train and validation, as stratified as possible.

    The first of ``strata_choices`` that fits is used (joint strata, then the label alone);
    the split is unstratified only if none does.
    """
    n_val = max(1, round(val_fraction * len(train_index)))
    stratify = None
    for strata in strata_choices:
        labels = strata[train_index]
        counts = pd.Series(labels).value_counts()
        # every stratum twice, room for one of each in val and in train
        if counts.min() >= 2 and len(counts) <= min(n_val, len(train_index) - n_val):
            stratify = labels
            break
    if stratify is None:
        logger.warning("validation split not stratified: strata too small (%s)", dict(counts))
    train_part, val_part = train_test_split(
        train_index, test_size=n_val, random_state=seed, stratify=stratify
    )
    return np.sort(train_part), np.sort(val_part)
