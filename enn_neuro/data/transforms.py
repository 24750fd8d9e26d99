"""Preprocessing and augmentation of 3D brain MRI, from a NIfTI file to a ``(1, D, H, W)`` tensor.

A sample is a MONAI-style dict ``{"image": path, "label": ..., "subject_id": ..., ...}``. The
deterministic part (:func:`preprocessing_transforms`) loads the file and brings every volume to
one grid: orientation, voxel spacing, intensity scale and shape. It is cached on disk by
:mod:`enn_neuro.data.dataset`, keyed by :meth:`PreprocessingConfig.fingerprint`. The random part
(:func:`augmentation_transforms`) applies TorchIO's MRI-specific augmentations after the cache,
so that every epoch draws new ones.

Everything MONAI can do is done by MONAI; the hand-written steps do what it lacks:
:class:`SingleVolumed` (see ``Note [single volume]``), the foreground mask and the z-score
within it, :class:`ForegroundZScored` (see ``Note [foreground]``), and fitting the foreground
into the output shape, :class:`FitToShaped` (see ``Note [fit]``).

Note [preprocessing order]:
    1. Load with nibabel (scaling slope/intercept applied), channel first; trailing singleton
       dimensions of 4D/5D files are squeezed, so ``(X, Y, Z, 1)`` reads as one volume.
    2. :class:`SingleVolumed`: reject multi-volume or non-3D files, replace NaN/inf by 0.
    3. Reorient to RAS (flips and a permutation, no interpolation). MONAI places the output
       grid of the next step from the input's voxel order, so without this the same image
       stored as RAS and as LPS would be sampled at different points.
    4. Resample to ``spacing_mm`` on a grid aligned with the world axes (``diagonal=True``), so
       that an oblique acquisition ends up in the same voxel frame as an axis-aligned one.
       Outside the field of view is 0. A diagonal grid is RAS: another ``orientation`` is
       reached by a second reorientation right after.
    5. Compute the foreground mask (``Note [foreground]``) and crop image and mask to its
       bounding box, *before* normalising: z-scoring moves the background to nonzero values.
    6. Normalise intensities: z-score with the mean and std of the foreground, the background
       (outside the mask) set to 0; or percentiles of the cropped volume to [0, 1].
    7. Fit to ``shape`` (``Note [fit]``): pad or crop symmetrically (``fit="pad_crop"``, the
       voxel size stays ``spacing_mm``), or scale to fit and pad (``fit="resize"``). Padding
       is 0, which is the background value after either normalisation.
    8. Cast to float32.

Note [fit]:
    A head with its neck, or a wide field of view without ``crop_foreground``, can be larger
    than ``shape × spacing_mm``. ``fit="pad_crop"`` then cuts the excess symmetrically, which
    removes tissue (the top of the skull and the neck): with ``crop_foreground`` on, a warning
    names the file and the millimetres cut per axis. ``fit="resize"`` scales every cropped
    volume, keeping its aspect ratio, so that it just fits ``shape`` along its tightest axis,
    then pads the others: nothing is cut, but the voxel size then differs between images (the
    affine records it) and so absolute head size is no longer visible to the model. MONAI's
    ``Resized(size_mode="longest")`` fits a cube only, hence :class:`FitToShaped`.

Note [foreground]:
    Magnitude MRI has Rician noise in the background, so every voxel is positive: "foreground
    = positive" (or MONAI's ``nonzero=True``) takes the whole field of view, the crop does
    nothing and the z-score mixes in background, whose amount depends on the field of view (a
    site effect). The foreground is instead the voxels above ``foreground_fraction`` of the
    99th percentile of the positive voxels, less connected parts under 1 % of the largest
    (isolated noise voxels above the threshold, which would stretch the bounding box), with
    the holes it encloses filled (dark CSF inside the head, the ventricles among it). On the
    demo cohort at 3 mm, 0.05 of that level marks 37–70 % of the voxels for heads of 30–38 %
    and a crop to the whole field of view; 0.2 marks the head, and at 0.15 only the speck
    removal keeps the box on it. The crop and the z-score use this one mask, carried through
    the crop under a temporary key.

Note [single volume]:
    MONAI reads a 4D file with several volumes as a multi-channel image and carries it through
    every transform, which would break the ``(1, D, H, W)`` contract far from its cause, and
    it passes NaN (the background of some SPM/FSL outputs) into bilinear resampling, where it
    spreads. Both are checked right after loading, naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import monai
import nibabel
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    MapTransform,
    Orientationd,
    Resize,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import convert_to_dst_type
from scipy import ndimage

__all__ = [
    "FIT_MODES",
    "INTENSITY_MODES",
    "AugmentationConfig",
    "FitToShaped",
    "ForegroundZScored",
    "PreprocessingConfig",
    "SingleVolumed",
    "augmentation_transforms",
    "preprocessing_transforms",
]

logger = logging.getLogger(__name__)

INTENSITY_MODES = ("zscore", "percentile")
FIT_MODES = ("pad_crop", "resize")

# Bumped whenever preprocessing_transforms changes what it computes for a given config, so
# that caches written by the old code are not reused (the fingerprint includes it).
_PIPELINE_VERSION = 2  # 2: foreground mask (threshold, specks, holes); masked z-score

# the foreground mask, carried from its computation through the crop to the z-score
_MASK_KEY = "_enn_foreground"
_SPECK_FRACTION = 0.01  # connected parts of the mask smaller than this share of the largest

_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class PreprocessingConfig:
    """How every volume is brought to one grid and intensity scale.

    Sequences given as lists (from YAML) are stored as tuples and ``orientation`` in upper
    case, so that equal settings have equal fingerprints.

    Attributes:
        spacing_mm: Output voxel size ``(x, y, z)`` in millimetres.
        shape: Output spatial shape ``(D, H, W)``, reached by padding or cropping.
        orientation: Axis codes of the output voxel axes, such as ``"RAS"`` or ``"LPS"``.
        intensity: ``"zscore"`` (mean 0, std 1 over the foreground, background 0) or
            ``"percentile"`` (``percentiles`` of the cropped volume mapped to 0 and 1, clipped).
        percentiles: Lower and upper percentile for ``intensity="percentile"``.
        crop_foreground: Crop to the bounding box of the foreground before padding to
            ``shape``, which centres the head in the output.
        foreground_fraction: Foreground is the voxels above this fraction of the 99th
            percentile of the positive intensities, less specks (see ``Note [foreground]``);
            0 means every positive voxel, which suits only images with an exactly zero
            background. Raise it for very noisy scans.
        fit: How a volume larger than ``shape`` is fitted (``Note [fit]``): ``"pad_crop"``
            (keep the voxel size, cut the excess; a warning names the file when the
            foreground is cut) or ``"resize"`` (scale to fit, keeping the aspect ratio).

    Raises:
        ValueError: If any field is invalid; the message lists every invalid field.
    """

    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    shape: tuple[int, int, int] = (64, 64, 64)
    orientation: str = "RAS"
    intensity: str = "zscore"
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    foreground_fraction: float = 0.2
    fit: str = "pad_crop"

    def __post_init__(self) -> None:
        problems = []

        spacing = _as_tuple(self.spacing_mm, float)
        if (
            spacing is None
            or len(spacing) != 3
            or not all(math.isfinite(s) and s > 0 for s in spacing)
        ):
            problems.append(f"spacing_mm must be three positive numbers, got {self.spacing_mm!r}")
        else:
            object.__setattr__(self, "spacing_mm", spacing)

        shape = _as_tuple(self.shape, _strict_int)
        if shape is None or len(shape) != 3 or not all(n > 0 for n in shape):
            problems.append(f"shape must be three positive integers, got {self.shape!r}")
        else:
            object.__setattr__(self, "shape", shape)

        orientation = self.orientation.upper() if isinstance(self.orientation, str) else None
        if orientation is None or not _is_axcodes(orientation):
            problems.append(
                "orientation must be three axis codes, one of L/R, A/P and S/I each "
                f"(such as 'RAS'), got {self.orientation!r}"
            )
        else:
            object.__setattr__(self, "orientation", orientation)

        if self.intensity not in INTENSITY_MODES:
            problems.append(f"intensity must be one of {INTENSITY_MODES}, got {self.intensity!r}")

        percentiles = _as_tuple(self.percentiles, float)
        if (
            percentiles is None
            or len(percentiles) != 2
            or not 0 <= percentiles[0] < percentiles[1] <= 100
        ):
            problems.append(
                "percentiles must be (lower, upper) with 0 <= lower < upper <= 100, "
                f"got {self.percentiles!r}"
            )
        else:
            object.__setattr__(self, "percentiles", percentiles)

        if not isinstance(self.crop_foreground, bool):
            problems.append(f"crop_foreground must be a bool, got {self.crop_foreground!r}")

        fraction = self.foreground_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 <= fraction < 1
        ):
            problems.append(f"foreground_fraction must be in [0, 1), got {fraction!r}")
        else:
            object.__setattr__(self, "foreground_fraction", float(fraction))

        if self.fit not in FIT_MODES:
            problems.append(f"fit must be one of {FIT_MODES}, got {self.fit!r}")

        if problems:
            raise ValueError("invalid PreprocessingConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """A hex SHA-256 that changes whenever the preprocessed output could change.

        It covers every field, the version of this module's pipeline and the versions of MONAI
        (the transforms) and nibabel (the reader); it is stable across processes and machines.
        """
        key = {
            "config": self.to_dict(),
            "pipeline_version": _PIPELINE_VERSION,
            "monai": monai.__version__,
            "nibabel": nibabel.__version__,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def preprocessing_transforms(config: PreprocessingConfig) -> Compose:
    """The deterministic pipeline from a sample with a NIfTI path to a ``(1, D, H, W)`` volume.

    Steps and their order are described in ``Note [preprocessing order]``. Only the
    ``"image"`` key is transformed; every other key passes through untouched.

    Args:
        config: Target grid and intensity scale.

    Returns:
        A MONAI ``Compose`` mapping ``{"image": path, ...}`` to ``{"image": volume, ...}``,
        where ``volume`` is a float32 ``MetaTensor`` of shape ``(1, *config.shape)`` whose
        ``affine`` has voxel size ``config.spacing_mm`` along ``config.orientation``.
        MONAI re-raises any error inside the pipeline as ``RuntimeError("applying transform
        ...")``; the original error (such as :class:`SingleVolumed`'s ``ValueError`` naming
        the file, or one for an image without a positive voxel) is its ``__cause__``.
    """
    keys = "image"
    steps: list[Callable] = [
        # trailing singletons squeezed: a (X, Y, Z, 1) or (X, Y, Z, 1, 1) file is one volume
        LoadImaged(
            keys,
            reader="NibabelReader",
            image_only=True,
            ensure_channel_first=True,
            dtype=np.float32,
            squeeze_non_spatial_dims=True,
        ),
        SingleVolumed(keys),
        # canonical voxel order first: MONAI places the diagonal grid of Spacingd from the
        # input's voxel order, so without this RAS and LPS storage would be sampled differently
        Orientationd(keys, axcodes="RAS", labels=_RAS_LABELS),
        Spacingd(
            keys,
            pixdim=config.spacing_mm,
            diagonal=True,
            mode="bilinear",
            padding_mode="zeros",
            dtype=np.float32,
        ),
    ]
    if config.orientation != "RAS":  # a diagonal grid is RAS: reorient after resampling
        steps.append(Orientationd(keys, axcodes=config.orientation, labels=_RAS_LABELS))
    # one foreground mask for the crop and the z-score, see Note [foreground]
    use_mask = config.crop_foreground or config.intensity == "zscore"
    if use_mask:
        steps.append(
            Lambdad(keys, func=_ForegroundSelector(config.foreground_fraction), overwrite=_MASK_KEY)
        )
    if config.crop_foreground:
        steps.append(
            CropForegroundd(
                [keys, _MASK_KEY],
                source_key=_MASK_KEY,
                allow_smaller=True,
                # no bookkeeping keys: samples keep exactly the keys they came with
                start_coord_key=None,
                end_coord_key=None,
            )
        )
    if config.intensity == "zscore":
        steps.append(ForegroundZScored(keys, mask_key=_MASK_KEY))
    else:
        lower, upper = config.percentiles
        steps.append(
            ScaleIntensityRangePercentilesd(
                keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True
            )
        )
    if use_mask:
        steps.append(DeleteItemsd(_MASK_KEY))
    steps += [
        # the foreground's extent is known only with the crop: without it, warn about nothing
        FitToShaped(keys, config.shape, config.fit, warn_on_cut=config.crop_foreground),
        ResizeWithPadOrCropd(keys, spatial_size=config.shape, mode="constant"),
        EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=True),
    ]
    return Compose(steps)


class SingleVolumed(MapTransform):
    """Checks that each image is one 3D volume and replaces non-finite voxels by 0.

    Expects channel-first images ``(C, X, Y, Z)`` as loaded by ``LoadImaged``; see
    ``Note [single volume]`` for why MONAI alone does not suffice.

    Args:
        keys: Keys of the images to check.

    Raises:
        ValueError: From ``__call__``, if an image has more than one volume, is not 3D, or has
            no nonzero voxel; the message names the file.
    """

    def __init__(self, keys: str | Sequence[str]) -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(data)
        for key in self.key_iterator(sample):
            image = sample[key]  # (C, X, Y, Z)
            source = _source_name(image)
            if image.ndim != 4:
                raise ValueError(
                    f"{source}: expected a 3D volume, got spatial shape {tuple(image.shape[1:])}"
                )
            if image.shape[0] != 1:
                raise ValueError(
                    f"{source}: expected a single volume, got {image.shape[0]} volumes "
                    f"(shape {tuple(image.shape[1:])} + ({image.shape[0]},))"
                )
            finite = torch.isfinite(image)
            if not bool(finite.all()):
                logger.debug("%s: %d non-finite voxels set to 0", source, int((~finite).sum()))
                image = torch.where(finite, image, torch.zeros((), dtype=image.dtype))
            if not bool(image.any()):
                raise ValueError(f"{source}: image is empty (every voxel is 0)")
            sample[key] = image
        return sample


class ForegroundZScored(MapTransform):
    """Z-scores each image with the mean and std of its foreground; the background becomes 0.

    Hand-written because MONAI's ``NormalizeIntensityd`` takes no mask, only ``nonzero``,
    and every voxel of an MRI with a noisy background is nonzero (``Note [foreground]``).
    Statistics are per channel; a channel with a constant foreground is only centred.

    Args:
        keys: Keys of the images, ``(C, X, Y, Z)``.
        mask_key: Key of the foreground mask, boolean and of the images' shape.

    Raises:
        ValueError: From ``__call__``, if the mask's shape differs from an image's.
    """

    def __init__(self, keys: str | Sequence[str], mask_key: str) -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(data)
        mask = sample[self.mask_key]  # (C, X, Y, Z)
        mask = (mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)).bool()
        for key in self.key_iterator(sample):
            image = sample[key]  # (C, X, Y, Z)
            if tuple(mask.shape) != tuple(image.shape):
                raise ValueError(
                    f"{_source_name(image)}: mask {self.mask_key!r} has shape "
                    f"{tuple(mask.shape)}, the image {tuple(image.shape)}"
                )
            plain = image.as_tensor() if isinstance(image, MetaTensor) else image
            mean = torch.zeros(plain.shape[0], dtype=torch.float64)  # (C,)
            std = torch.ones(plain.shape[0], dtype=torch.float64)  # (C,)
            for channel in range(plain.shape[0]):
                values = plain[channel][mask[channel]].double()
                if values.numel():
                    mean[channel] = values.mean()
                    spread = values.std(correction=0)
                    std[channel] = spread if spread > 0 else 1.0
            shape = (-1,) + (1,) * (plain.ndim - 1)  # broadcast over (X, Y, Z)
            mean = mean.to(plain.dtype).view(shape)
            std = std.to(plain.dtype).view(shape)
            sample[key] = ((image - mean) / std).masked_fill(~mask, 0.0)
        return sample


class FitToShaped(MapTransform):
    """Fits each image into ``shape`` before it is padded (or cropped) to it: ``Note [fit]``.

    With ``mode="resize"`` the image is scaled by ``min(shape / size)`` over the axes, keeping
    its aspect ratio (area averaging when it shrinks, trilinear when it grows), so that it
    fits ``shape`` and touches it along one axis; the affine follows. With
    ``mode="pad_crop"`` the image passes unchanged, and a warning names the file and the
    millimetres per axis that the following centre crop will cut, if any.

    Args:
        keys: Keys of the images, ``(C, X, Y, Z)``.
        shape: The output spatial shape ``(D, H, W)``.
        mode: One of :data:`FIT_MODES`.
        warn_on_cut: Whether ``"pad_crop"`` warns when the image exceeds ``shape``; only
            meaningful when the image was cropped to its foreground.

    Raises:
        ValueError: If ``mode`` is not one of :data:`FIT_MODES`.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        shape: Sequence[int],
        mode: str = "pad_crop",
        warn_on_cut: bool = True,
    ) -> None:
        super().__init__(keys)
        if mode not in FIT_MODES:
            raise ValueError(f"mode must be one of {FIT_MODES}, got {mode!r}")
        self.shape = tuple(int(n) for n in shape)
        self.mode = mode
        self.warn_on_cut = warn_on_cut

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(data)
        for key in self.key_iterator(sample):
            image = sample[key]  # (C, X, Y, Z)
            size = tuple(int(n) for n in image.shape[1:])
            if self.mode == "resize":
                sample[key] = _scale_to_fit(image, size, self.shape)
            elif self.warn_on_cut and any(n > m for n, m in zip(size, self.shape, strict=True)):
                voxel_mm = _voxel_mm(image)
                cut_mm = tuple(
                    round(max(n - m, 0) * v, 1)
                    for n, m, v in zip(size, self.shape, voxel_mm, strict=True)
                )
                extent_mm = tuple(round(n * v, 1) for n, v in zip(size, voxel_mm, strict=True))
                logger.warning(
                    "%s: the foreground (%s mm) exceeds the output shape %s; the centre crop "
                    "cuts %s mm per axis of it. Set preprocessing.fit: resize, or a larger "
                    "shape, to keep it whole",
                    _source_name(image),
                    " x ".join(map(str, extent_mm)),
                    self.shape,
                    cut_mm,
                )
        return sample


@dataclass(frozen=True)
class AugmentationConfig:
    """Random MRI augmentations (TorchIO), each applied with its own probability.

    Spatial transforms come first, then MRI artefacts, then intensity changes. Distances are
    in millimetres of the preprocessed grid.

    Attributes:
        enabled: When ``False`` the augmentation is the identity.
        affine_p: Probability of a random affine.
        affine_degrees: Rotations drawn from ``[-degrees, degrees]`` about each axis.
        affine_scales: Scale factors drawn from ``[1 - scales, 1 + scales]`` per axis.
        affine_translation_mm: Translations drawn from ``[-t, t]`` mm per axis.
        elastic_p: Probability of a B-spline elastic deformation.
        elastic_max_displacement_mm: Largest displacement of a control point.
        bias_field_p: Probability of a smooth multiplicative bias field.
        bias_field_coefficients: Polynomial coefficients drawn from ``[-c, c]``.
        motion_p: Probability of simulated patient motion (k-space).
        ghosting_p: Probability of ghosting artefacts (k-space).
        noise_p: Probability of additive Gaussian noise.
        noise_std: Noise standard deviation drawn from ``[0, std]``, in normalised units.
        gamma_p: Probability of a gamma contrast change.
        gamma_log_gamma: ``log(gamma)`` drawn from ``[-g, g]``.

    Raises:
        ValueError: If any field is invalid; the message lists every invalid field.
    """

    enabled: bool = True
    affine_p: float = 0.5
    affine_degrees: float = 10.0
    affine_scales: float = 0.1
    affine_translation_mm: float = 0.0
    elastic_p: float = 0.1
    elastic_max_displacement_mm: float = 5.0
    bias_field_p: float = 0.3
    bias_field_coefficients: float = 0.5
    motion_p: float = 0.1
    ghosting_p: float = 0.1
    noise_p: float = 0.25
    noise_std: float = 0.1
    gamma_p: float = 0.3
    gamma_log_gamma: float = 0.3

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.enabled, bool):
            problems.append(f"enabled must be a bool, got {self.enabled!r}")
        for field in dataclasses.fields(self):
            if field.name == "enabled":
                continue
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{field.name} must be a number, got {value!r}")
                continue
            if field.name.endswith("_p"):
                if not 0 <= value <= 1:
                    problems.append(f"{field.name} must be a probability in [0, 1], got {value!r}")
            elif not (math.isfinite(value) and value >= 0):
                problems.append(f"{field.name} must be finite and >= 0, got {value!r}")
            elif field.name == "affine_scales" and value >= 1:
                problems.append(f"affine_scales must be < 1 (scales 1 ± s), got {value!r}")
        if problems:
            raise ValueError("invalid AugmentationConfig: " + "; ".join(problems))

    @property
    def is_identity(self) -> bool:
        """Whether no transform can ever fire (disabled, or every probability 0)."""
        fields = dataclasses.fields(self)
        return not self.enabled or not any(
            getattr(self, f.name) for f in fields if f.name.endswith("_p")
        )


def augmentation_transforms(
    config: AugmentationConfig,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> Callable[[dict], dict]:
    """Random TorchIO augmentation of the ``"image"`` of a preprocessed sample.

    Randomness comes from torch's global generator (TorchIO draws with it), so
    ``torch.manual_seed`` makes a run reproducible and DataLoader workers draw differently.

    Args:
        config: Which transforms, how likely and how strong.
        spacing_mm: Voxel size of images without an affine (plain tensors), which sets the
            millimetre scale of the elastic, translation and motion parameters. A
            ``MetaTensor``'s own affine is used instead when present.

    Returns:
        A callable mapping a sample whose ``"image"`` is ``(1, D, H, W)`` to a new dict with
        the augmented image as a plain float32 tensor of the same shape and every other key
        unchanged. When ``config.is_identity`` it returns the sample as given.
    """
    if config.is_identity:
        return _identity
    return _TorchIOAugmentation(config, tuple(float(s) for s in spacing_mm))


# private helpers


def _identity(sample: dict) -> dict:
    return sample


class _TorchIOAugmentation:
    """A picklable callable (DataLoader workers) wrapping a ``torchio.Compose``."""

    def __init__(self, config: AugmentationConfig, spacing_mm: tuple[float, ...]) -> None:
        import torchio as tio  # optional at import time: only augmentation needs it

        self.spacing_mm = spacing_mm
        transforms = []
        if config.affine_p:
            transforms.append(
                tio.RandomAffine(
                    scales=config.affine_scales,
                    degrees=config.affine_degrees,
                    translation=config.affine_translation_mm,
                    # the background is 0 after either normalisation; TorchIO's default
                    # ("minimum") would frame a z-scored head in its darkest value
                    default_pad_value=0.0,
                    p=config.affine_p,
                )
            )
        if config.elastic_p:
            transforms.append(
                tio.RandomElasticDeformation(
                    max_displacement=config.elastic_max_displacement_mm, p=config.elastic_p
                )
            )
        if config.motion_p:
            transforms.append(tio.RandomMotion(p=config.motion_p))
        if config.ghosting_p:
            transforms.append(tio.RandomGhosting(p=config.ghosting_p))
        # multiplicative intensity artefacts act on positive intensities: Note [intensity range]
        intensity = []
        if config.bias_field_p:
            intensity.append(
                tio.RandomBiasField(
                    coefficients=config.bias_field_coefficients, p=config.bias_field_p
                )
            )
        if config.gamma_p:
            intensity.append(tio.RandomGamma(log_gamma=config.gamma_log_gamma, p=config.gamma_p))
        noise = []
        if config.noise_p:
            noise.append(tio.RandomNoise(std=(0.0, config.noise_std), p=config.noise_p))
        self.transform = tio.Compose(transforms)
        self.intensity = tio.Compose(intensity)
        self.noise = tio.Compose(noise)

    def __call__(self, sample: dict) -> dict:
        import torchio as tio

        image = sample["image"]
        if image.ndim != 4 or image.shape[0] != 1:
            raise ValueError(f"image must have shape (1, D, H, W), got {tuple(image.shape)}")
        if isinstance(image, MetaTensor):
            affine = image.affine.detach().cpu().numpy().astype(np.float64)
            tensor = image.as_tensor()
        else:
            affine = np.diag([*self.spacing_mm, 1.0])
            tensor = image
        subject = tio.Subject(image=tio.ScalarImage(tensor=tensor.float(), affine=affine))
        subject = self.transform(subject)
        if self.intensity.transforms:
            subject = _in_unit_range(self.intensity, subject)
        augmented = self.noise(subject)["image"].data  # (1, D, H, W)
        out = dict(sample)
        out["image"] = augmented.to(torch.float32).contiguous()
        return out


# Note [intensity range]:
#     A bias field multiplies the scanner's intensities, and gamma acts on intensities in
#     [0, 1]; both assume non-negative values. The cached volumes are normalised (z-scores
#     within the foreground, background 0), so applied as they are, a bias field > 1 would
#     darken tissue below the mean instead of brightening it, and gamma would fold negative
#     values. The two therefore run on the volume mapped linearly onto [0, 1] (its minimum to
#     0, its maximum to 1), which is then mapped back; the background keeps its exact 0, as
#     the affine transform's padding does.


def _in_unit_range(transform: Callable, subject):
    """Applies ``transform`` to the subject's image mapped onto [0, 1], then maps it back."""
    image = subject["image"]
    values = image.data  # (1, D, H, W)
    low, high = values.min(), values.max()
    if not high > low:  # a constant volume: nothing to modulate
        return subject
    background = values == 0
    image.set_data((values - low) / (high - low))
    subject = transform(subject)
    restored = subject["image"].data * (high - low) + low
    subject["image"].set_data(restored.masked_fill(background, 0.0))
    return subject


class _ForegroundSelector:
    """The foreground mask of an image: see ``Note [foreground]``.

    Maps an image ``(C, X, Y, Z)`` to a boolean mask of the same shape and type (a
    ``MetaTensor`` keeps the image's metadata). A class, not a lambda, so that the pipeline
    pickles into DataLoader workers.

    Raises:
        ValueError: From ``__call__``, if the image has no positive voxel; names the file.
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        values = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
        positive = values[values > 0]
        if positive.size == 0:
            raise ValueError(
                f"{_source_name(image)}: no positive voxel, so no foreground to crop to or "
                "to normalise within"
            )
        # the 99th percentile, not the maximum, so that a few hot voxels do not set the level
        threshold = self.fraction * float(np.percentile(positive, 99))
        mask = _clean_mask(values > threshold)
        return convert_to_dst_type(mask, image, dtype=torch.bool)[0]


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """``mask`` ``(C, X, Y, Z)`` less its specks, with its holes filled.

    Specks are connected parts under ``_SPECK_FRACTION`` of the largest. Holes are dark
    regions the foreground encloses, such as the T1-dark ventricles: they keep their
    intensities instead of being flattened to the background value, since their size is
    itself a marker of atrophy.

    Hand-written: MONAI's ``KeepLargestConnectedComponent`` needs scikit-image (not a
    dependency), and keeping only the largest part would drop a real part of a head that the
    threshold happened to split.
    """
    kept = np.zeros_like(mask)
    for channel in range(mask.shape[0]):
        labels, count = ndimage.label(mask[channel])  # (X, Y, Z), 6-connected
        if count == 0:
            continue
        sizes = np.bincount(labels.ravel())  # (count + 1,), background first
        sizes[0] = 0
        keep = sizes >= _SPECK_FRACTION * sizes.max()  # (count + 1,), background dropped
        kept[channel] = ndimage.binary_fill_holes(keep[labels])
    return kept


def _scale_to_fit(image: torch.Tensor, size: tuple[int, ...], shape: tuple[int, ...]) -> Any:
    """``image`` ``(C, *size)`` scaled by one factor per volume to fit within ``shape``."""
    scale = min(m / n for n, m in zip(size, shape, strict=True))
    # rounding could push an axis one voxel past the shape; the tightest axis lands on it
    target = tuple(min(m, max(1, round(n * scale))) for n, m in zip(size, shape, strict=True))
    if target == size:
        return image
    mode = "area" if scale < 1 else "trilinear"  # averaging when shrinking: no aliasing
    return Resize(target, mode=mode)(image)


def _voxel_mm(image: Any) -> tuple[float, ...]:
    """Voxel size of a ``(C, X, Y, Z)`` image from its affine; 1 mm without one."""
    if isinstance(image, MetaTensor):
        return tuple(float(v) for v in affine_to_spacing(image.affine, r=3))
    return (1.0, 1.0, 1.0)


def _source_name(image: Any) -> str:
    if isinstance(image, MetaTensor):
        return str(image.meta.get("filename_or_obj", "image"))
    return "image"


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(value)
    return int(value)


def _as_tuple(value: Any, convert: Callable[[Any], Any]) -> tuple | None:
    """``value`` as a tuple of converted items, or ``None`` if it is not such a sequence."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        return None
    try:
        return tuple(convert(item) for item in value)
    except (TypeError, ValueError):
        return None


def _is_axcodes(codes: str) -> bool:
    return (
        len(codes) == 3
        and all(sum(code in pair for code in codes) == 1 for pair in _AXIS_PAIRS)
        and set(codes) <= set("LRAPSI")
    )
