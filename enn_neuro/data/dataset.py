"""A dataset of preprocessed volumes: deterministic work cached once, augmentation every read.

Preprocessing (:func:`enn_neuro.data.transforms.preprocessing_transforms`) costs far more
than a training step's share of data time at 3D, and it gives the same result every epoch,
fold and run. It is therefore cached: on disk by MONAI's ``PersistentDataset`` when a
``cache_dir`` is given, in memory by ``CacheDataset`` otherwise. Random augmentation is applied
to the cached volume on every read, so the cache never holds an augmented image.

Note [cache key]:
    ``PersistentDataset`` names each cache file ``<hash_func(item)><transform_hash>.pt``.
    MONAI's default ``hash_func`` pickles the sample, i.e. hashes the *path string*, and its
    ``hash_transform`` hashes the transform objects, which may not serialise and fall back to
    their class names. Neither notices a changed file or a changed parameter, so both are
    replaced:

    - the item part (:class:`FileKey`) hashes the resolved path, the file's size and
      ``mtime_ns``, and SHA-256 of its first and last MiB (the whole file up to 2 MiB). A
      change of size or time is always caught. A rewrite that keeps both, as ``cp -p`` or
      ``rsync -a`` of another version can, is caught if it touches the header, the first or
      last MiB: for a ``.nii.gz`` that is always (the tail holds the CRC32 and length of the
      whole uncompressed image, barring a CRC collision); for a ``.nii`` over 2 MiB a change
      confined to the middle is missed. Hashing whole files would catch that too, at the
      cost of reading the cohort again at every start. The content hash is memoised per
      ``(path, size, mtime_ns)`` so that a warm read costs one ``stat``;
    - the transform part is :meth:`PreprocessingConfig.fingerprint`: every field, the
      pipeline version and the MONAI and nibabel versions.

    Only ``{"image": path}`` goes through the cache. Labels and other keys are taken from the
    live sample on every read, so relabelling a cohort never serves a stale label, and the key
    need not cover them. Entries for old configs or old file versions are not deleted; clear
    the directory to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, MetaTensor, PersistentDataset
from torch.utils.data import Dataset

from enn_neuro.data.transforms import (
    AugmentationConfig,
    PreprocessingConfig,
    augmentation_transforms,
    preprocessing_transforms,
)

__all__ = ["CachedVolumeDataset", "FileKey", "make_dataset"]

logger = logging.getLogger(__name__)

_CONTENT_BYTES = 1 << 20  # hashed at each end of a file, see Note [cache key]


class CachedVolumeDataset(Dataset):
    """Samples with a NIfTI path, read as preprocessed and (optionally) augmented volumes.

    Item ``i`` is a new dict with every key of ``samples[i]``, where ``"image"`` is a plain
    float32 tensor ``(1, D, H, W)`` and ``"label"`` (when the samples have one) is a 0-d
    tensor: ``torch.long`` if every label of the cohort is an integer (classification),
    ``torch.float32`` otherwise (regression). The preprocessing is computed at the first read
    of a sample and cached (see ``Note [cache key]``).

    Args:
        samples: Dicts with ``"image"`` (path to a ``.nii``/``.nii.gz`` file) and optionally
            ``"label"`` (int class index or float target); other keys pass through.
        preprocessing: Target grid and intensity scale.
        augmentation: Random augmentation applied after the cache; none when ``None``.
        cache_dir: Directory of the persistent cache, shared by runs with the same
            preprocessing; created if missing. When ``None`` the cache is in memory, filled
            at first read in each process: with several DataLoader workers, each worker fills
            its own, and without ``persistent_workers`` it is lost at the end of the epoch.

    Raises:
        TypeError: If a sample is not a mapping, its image not a path or its label not a
            number.
        ValueError: If some samples have a label and others do not, or a label is not finite.
        FileNotFoundError: If image files are missing.

    Every problem of the cohort is collected before one of these is raised. A file that
    cannot be preprocessed raises when its item is first read (see
    :func:`~enn_neuro.data.transforms.preprocessing_transforms`); run
    :func:`enn_neuro.data.validation.validate_cohort` first to find those up front.
    """

    def __init__(
        self,
        samples: Sequence[Mapping[str, Any]],
        preprocessing: PreprocessingConfig,
        augmentation: AugmentationConfig | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.samples = [dict(sample) for sample in _check_samples(samples)]
        self.preprocessing = preprocessing
        self.augmentation = augmentation
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.label_dtype = _label_dtype(self.samples)

        # only the image path enters the cache: see Note [cache key]
        images = [{"image": str(Path(sample["image"]).resolve())} for sample in self.samples]
        transform = preprocessing_transforms(preprocessing)
        if self.cache_dir is None:
            self._volumes: Dataset = CacheDataset(
                images, transform, runtime_cache=True, progress=False
            )
        else:
            fingerprint = preprocessing.fingerprint()
            self._volumes = PersistentDataset(
                images,
                transform,
                cache_dir=self.cache_dir,
                hash_func=FileKey(),
                hash_transform=lambda _transforms: fingerprint.encode(),
            )

        self._augment = None
        if augmentation is not None and not augmentation.is_identity:
            self._augment = augmentation_transforms(augmentation, preprocessing.spacing_mm)
        logger.debug(
            "%d samples, preprocessing %s, cache %s, augmentation %s",
            len(self.samples),
            preprocessing.fingerprint()[:12],
            self.cache_dir or "in memory",
            "on" if self._augment else "off",
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self._volumes[index]["image"]  # (1, D, H, W)
        # a computed item is a MetaTensor, one read back from disk a plain tensor: make both
        # plain, so that batches collate alike whatever the cache state
        if isinstance(image, MetaTensor):
            image = image.as_tensor()

        item = dict(self.samples[index])
        item["image"] = image
        if self.label_dtype is not None:
            item["label"] = torch.tensor(item["label"], dtype=self.label_dtype)
        if self._augment is not None:
            item = self._augment(item)
        return item


def make_dataset(
    samples: Sequence[Mapping[str, Any]],
    preprocessing: PreprocessingConfig,
    augmentation: AugmentationConfig | None = None,
    cache_dir: str | Path | None = None,
) -> CachedVolumeDataset:
    """Builds a :class:`CachedVolumeDataset`; see there for the arguments and errors.

    Example:
        >>> train = make_dataset(
        ...     cohort.to_samples(train_subjects),
        ...     PreprocessingConfig(spacing_mm=(2.0, 2.0, 2.0), shape=(96, 96, 96)),
        ...     AugmentationConfig(),
        ...     cache_dir="~/.cache/enn_neuro/volumes",
        ... )
    """
    if cache_dir is not None:
        cache_dir = Path(cache_dir).expanduser()
    return CachedVolumeDataset(samples, preprocessing, augmentation, cache_dir)


class FileKey:
    """``hash_func`` of ``PersistentDataset``: a key from the file's path, size, time and ends.

    What it catches, and the one rewrite it misses, is in ``Note [cache key]``. A class, not a
    closure, so that it pickles into DataLoader workers; each process keeps its own memo.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple[str, int, int], bytes] = {}

    def __call__(self, item: Mapping[str, Any]) -> bytes:
        """The hex SHA-256 key (as bytes, which MONAI expects) of ``item["image"]``.

        Raises:
            FileNotFoundError: If the file no longer exists.
        """
        path = str(Path(item["image"]).resolve())
        status = os.stat(path)
        signature = (path, status.st_size, status.st_mtime_ns)
        key = self._memo.get(signature)
        if key is None:
            content = _head_tail_digest(path, status.st_size)
            text = json.dumps([*signature, content])
            key = hashlib.sha256(text.encode()).hexdigest().encode()
            self._memo[signature] = key
        return key


# private helpers


def _head_tail_digest(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(_CONTENT_BYTES))
        if size > _CONTENT_BYTES:
            file.seek(max(_CONTENT_BYTES, size - _CONTENT_BYTES))
            digest.update(file.read(_CONTENT_BYTES))
    return digest.hexdigest()


def _check_samples(samples: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """Returns ``samples`` unchanged if usable; raises with every problem found otherwise."""
    type_problems, value_problems, missing = [], [], []
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            type_problems.append(f"sample {index} must be a mapping, got {type(sample).__name__}")
            continue
        where = f"sample {index} ({sample.get('subject_id', 'no subject_id')})"
        image = sample.get("image")
        if not isinstance(image, (str, os.PathLike)):
            type_problems.append(f"{where}: image must be a path, got {image!r}")
        elif not Path(image).is_file():
            missing.append(f"{where}: {image}")
        if "label" in sample:
            label = sample["label"]
            if not isinstance(label, numbers.Real):
                type_problems.append(f"{where}: label must be an int or a float, got {label!r}")
            elif not math.isfinite(label):
                value_problems.append(f"{where}: label must be finite, got {label!r}")

    labelled = sum(isinstance(s, Mapping) and "label" in s for s in samples)
    if 0 < labelled < len(samples):
        value_problems.append(
            f"either every sample or none must have a label, got {labelled} of {len(samples)}"
        )
    if type_problems:
        raise TypeError(_listing("invalid samples", type_problems + value_problems))
    if value_problems:
        raise ValueError(_listing("invalid samples", value_problems))
    if missing:
        raise FileNotFoundError(_listing("image files not found", missing))
    return samples


def _label_dtype(samples: Sequence[Mapping[str, Any]]) -> torch.dtype | None:
    if not samples or "label" not in samples[0]:
        return None
    # decided for the whole cohort, so that an age of 45 and one of 45.5 collate together
    if all(isinstance(s["label"], numbers.Integral) for s in samples):
        return torch.long
    return torch.float32


def _listing(title: str, problems: Sequence[str]) -> str:
    lines = "\n".join(f"  - {problem}" for problem in problems)
    return f"{title} ({len(problems)}):\n{lines}"
