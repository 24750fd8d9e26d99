"""Data: 3D cohorts with checks, transforms, caching, splits and a demo; 2D image folders.

The path of a study's input: :func:`load_cohort` → :func:`validate_cohort` (every problem at
once, before any work) → :func:`make_splits` (subject-level, leakage-checked) →
:func:`make_dataset` (MONAI preprocessing cached once, TorchIO augmentation after the cache).
"""

from enn_neuro.data.cohort import Cohort, CohortError, ImageRecord, Problem, Task, load_cohort
from enn_neuro.data.dataset import CachedVolumeDataset, make_dataset
from enn_neuro.data.demo import write_demo_cohort
from enn_neuro.data.images2d import (
    ImageFolderDataset,
    check_images,
    eval_transform,
    scan_image_folder,
    train_transform,
    write_digits_folder,
)
from enn_neuro.data.splits import (
    LeakageError,
    Role,
    check_leakage,
    fold_count_problems,
    make_splits,
    read_split_table,
    write_split_table,
)
from enn_neuro.data.transforms import (
    FIT_MODES,
    AugmentationConfig,
    FitToShaped,
    PreprocessingConfig,
    augmentation_transforms,
    preprocessing_transforms,
)
from enn_neuro.data.validation import ValidationReport, validate_cohort

__all__ = [
    "FIT_MODES",
    "AugmentationConfig",
    "CachedVolumeDataset",
    "Cohort",
    "ImageFolderDataset",
    "CohortError",
    "FitToShaped",
    "ImageRecord",
    "LeakageError",
    "PreprocessingConfig",
    "Problem",
    "Role",
    "Task",
    "ValidationReport",
    "augmentation_transforms",
    "check_images",
    "check_leakage",
    "eval_transform",
    "fold_count_problems",
    "load_cohort",
    "make_dataset",
    "make_splits",
    "preprocessing_transforms",
    "read_split_table",
    "scan_image_folder",
    "train_transform",
    "validate_cohort",
    "write_demo_cohort",
    "write_digits_folder",
    "write_split_table",
]
