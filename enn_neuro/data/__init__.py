"""Cohort data: tables and BIDS, pre-flight checks, transforms, caching, splits, the demo cohort.

The path of a study's input: :func:`load_cohort` → :func:`validate_cohort` (every problem at
once, before any work) → :func:`make_splits` (subject-level, leakage-checked) →
:func:`make_dataset` (MONAI preprocessing cached once, TorchIO augmentation after the cache).
"""

from enn_neuro.data.cohort import Cohort, CohortError, ImageRecord, Problem, Task, load_cohort
from enn_neuro.data.dataset import CachedVolumeDataset, make_dataset
from enn_neuro.data.demo import write_demo_cohort
from enn_neuro.data.splits import (
    LeakageError,
    Role,
    check_leakage,
    make_splits,
    read_split_table,
    write_split_table,
)
from enn_neuro.data.transforms import (
    AugmentationConfig,
    PreprocessingConfig,
    augmentation_transforms,
    preprocessing_transforms,
)
from enn_neuro.data.validation import ValidationReport, validate_cohort

__all__ = [
    "AugmentationConfig",
    "CachedVolumeDataset",
    "Cohort",
    "CohortError",
    "ImageRecord",
    "LeakageError",
    "PreprocessingConfig",
    "Problem",
    "Role",
    "Task",
    "ValidationReport",
    "augmentation_transforms",
    "check_leakage",
    "load_cohort",
    "make_dataset",
    "make_splits",
    "preprocessing_transforms",
    "read_split_table",
    "validate_cohort",
    "write_demo_cohort",
    "write_split_table",
]
