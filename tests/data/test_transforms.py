"""Preprocessing (grid, orientation, intensity, file variety) and TorchIO augmentation."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from enn_neuro.data.transforms import (
    AugmentationConfig,
    FitToShaped,
    PreprocessingConfig,
    augmentation_transforms,
    preprocessing_transforms,
)

SIDE = 24  # voxels per side of the written volumes
CONFIG = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), shape=(16, 16, 16))


def phantom(seed: int = 0, side: int = SIDE) -> np.ndarray:
    """An off-centre ellipsoidal "head" of noisy intensity ~100 on a zero background."""
    x, y, z = np.mgrid[:side, :side, :side].astype(np.float64)
    inside = ((x - 10) / 8) ** 2 + ((y - 12) / 9) ** 2 + ((z - 12) / 7) ** 2 < 1
    noise = np.random.default_rng(seed).normal(0.0, 10.0, (side,) * 3)
    return np.where(inside, 100.0 + noise, 0.0)


def ras_affine(spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -20.0
    return affine


def write(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data).astype(dtype), affine), path)
    return path


def as_lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with the first two voxel axes reversed (LPS voxel order)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(data.shape[:2]) - 1
    return data[::-1, ::-1].copy(), affine @ flip


def oblique_affine(degrees: float = 20.0) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.array(
        [
            [np.cos(angle), -np.sin(angle), 0.0],
            [np.sin(angle), np.cos(angle), 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 2.0, 2.0])
    affine[:3, 3] = -20.0
    return affine


def preprocess(path: Path, config: PreprocessingConfig = CONFIG) -> dict:
    sample = {"image": str(path), "label": 1, "subject_id": "sub-001", "site": "A"}
    return preprocessing_transforms(config)(sample)


def foreground_voxels(image: torch.Tensor) -> torch.Tensor:
    return image[image != 0]


# --- file variety: shape, spacing, orientation


def _ras(tmp_path: Path) -> Path:
    return write(tmp_path / "ras.nii.gz", phantom(), ras_affine())


def _lps(tmp_path: Path) -> Path:
    return write(tmp_path / "lps.nii.gz", *as_lps(phantom(), ras_affine()))


def _anisotropic(tmp_path: Path) -> Path:
    return write(tmp_path / "aniso.nii.gz", phantom(), ras_affine((1.0, 1.5, 4.0)))


def _oblique(tmp_path: Path) -> Path:
    return write(tmp_path / "oblique.nii.gz", phantom(), oblique_affine())


def _int16(tmp_path: Path) -> Path:
    return write(tmp_path / "int16.nii.gz", phantom() * 10, ras_affine(), np.int16)


def _uint8(tmp_path: Path) -> Path:
    return write(tmp_path / "uint8.nii.gz", phantom(), ras_affine(), np.uint8)


def _float64(tmp_path: Path) -> Path:
    return write(tmp_path / "float64.nii.gz", phantom(), ras_affine(), np.float64)


def _uncompressed(tmp_path: Path) -> Path:
    return write(tmp_path / "plain.nii", phantom(), ras_affine())


def _single_volume_4d(tmp_path: Path) -> Path:
    return write(tmp_path / "four_d.nii.gz", phantom()[..., None], ras_affine())


VARIANTS = {
    "ras": _ras,
    "lps": _lps,
    "anisotropic": _anisotropic,
    "oblique": _oblique,
    "int16": _int16,
    "uint8": _uint8,
    "float64": _float64,
    "nii": _uncompressed,
    "4d_single_volume": _single_volume_4d,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_preprocessing_output_grid(tmp_path, variant):
    path = VARIANTS[variant](tmp_path)
    out = preprocess(path)
    image = out["image"]

    assert tuple(image.shape) == (1, 16, 16, 16)
    assert image.dtype == torch.float32
    affine = image.affine.numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [3.0, 3.0, 3.0], atol=1e-5)
    # axis-aligned grid even for the oblique input (Spacingd diagonal=True)
    np.testing.assert_allclose(affine[:3, :3], np.diag([3.0, 3.0, 3.0]), atol=1e-5)
    assert torch.isfinite(image).all()
    assert {k: out[k] for k in ("label", "subject_id", "site")} == {
        "label": 1,
        "subject_id": "sub-001",
        "site": "A",
    }
    assert set(out) == {"image", "label", "subject_id", "site"}


def test_orientation_other_than_ras(tmp_path):
    config = dataclasses.replace(CONFIG, orientation="lps")
    image = preprocess(_ras(tmp_path), config)["image"]
    assert config.orientation == "LPS"
    assert nib.aff2axcodes(image.affine.numpy()) == ("L", "P", "S")


def test_ras_and_lps_storage_give_same_tensor(tmp_path):
    ras = preprocess(_ras(tmp_path))["image"]
    lps = preprocess(_lps(tmp_path))["image"]
    torch.testing.assert_close(ras.as_tensor(), lps.as_tensor(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ras.affine.numpy(), lps.affine.numpy(), atol=1e-5)


def test_integer_and_float_storage_agree(tmp_path):
    # the same integer-valued data stored as float32 and as int16
    as_float = preprocess(write(tmp_path / "f.nii.gz", np.round(phantom()), ras_affine()))
    as_int = preprocess(write(tmp_path / "i.nii.gz", np.round(phantom()), ras_affine(), np.int16))
    torch.testing.assert_close(as_float["image"].as_tensor(), as_int["image"].as_tensor())


def test_anisotropic_input_is_resampled_to_physical_size(tmp_path):
    # the same head sampled at 2 mm isotropic and at 1 × 2 × 4 mm
    side = 48
    x, y, z = np.mgrid[:side, :side, :side].astype(np.float64)
    fine = np.where(((x - 24) / 16) ** 2 + ((y - 24) / 18) ** 2 + ((z - 24) / 14) ** 2 < 1, 1, 0)
    isotropic = write(tmp_path / "iso.nii.gz", fine[::2, ::2, ::2] * 100, ras_affine((2.0,) * 3))
    aniso = write(tmp_path / "an.nii.gz", fine[:, ::2, ::4] * 100, ras_affine((1.0, 2.0, 4.0)))
    config = dataclasses.replace(CONFIG, shape=(20, 20, 20), intensity="percentile")
    extents = []
    for path in (isotropic, aniso):
        inside = (preprocess(path, config)["image"][0] > 0.5).nonzero()  # (N, 3)
        extents.append(inside.amax(0) - inside.amin(0))
    # diameters 32, 36, 28 mm: about 10, 11 and 8 voxel steps of 3 mm in both
    assert (extents[0] - extents[1]).abs().max() <= 1
    assert [9, 10, 7] <= extents[0].tolist() <= [11, 12, 9]


# --- intensity and foreground


def test_zscore_has_zero_mean_unit_std_in_foreground(tmp_path):
    image = preprocess(_ras(tmp_path))["image"]
    values = foreground_voxels(image).double()
    assert values.numel() > 500
    assert abs(float(values.mean())) < 1e-3
    assert float(values.std(unbiased=False)) == pytest.approx(1.0, abs=1e-2)
    # background stays exactly 0 (padding and outside the head)
    assert float(image.min()) < -1.0 and int((image == 0).sum()) > 1000


def test_percentile_scaling_is_within_unit_interval(tmp_path):
    config = dataclasses.replace(CONFIG, intensity="percentile", percentiles=(1.0, 99.0))
    image = preprocess(_ras(tmp_path), config)["image"]
    assert float(image.min()) == 0.0
    assert float(image.max()) == 1.0
    # clipped: at least the top 1 % of the cropped volume sits exactly at 1
    assert int((image == 1.0).sum()) > 0


def test_crop_foreground_centres_an_off_centre_head(tmp_path):
    data = np.zeros((40, 40, 40))
    data[2:12, 3:11, 25:37] = 100.0 + np.random.default_rng(0).normal(0, 5, (10, 8, 12))
    path = write(tmp_path / "corner.nii.gz", data, ras_affine((1.0, 1.0, 1.0)))
    config = dataclasses.replace(CONFIG, spacing_mm=(1.0, 1.0, 1.0), shape=(16, 16, 16))

    image = preprocess(path, config)["image"][0]
    assert int((image != 0).sum()) == 10 * 8 * 12  # every head voxel kept
    lo, hi = image.nonzero().amin(0), image.nonzero().amax(0)
    assert lo.tolist() == [3, 4, 2] and hi.tolist() == [12, 11, 13]  # centred in 16³

    uncropped = preprocess(path, dataclasses.replace(config, crop_foreground=False))["image"]
    assert int((uncropped != 0).sum()) < 10 * 8 * 12  # the centre crop cuts the head


# --- fitting a foreground larger than the output shape: Note [fit]


def _head_with_neck(tmp_path: Path) -> Path:
    """A foreground of 20 x 10 x 10 voxels of 2 mm: 40 mm long, for a 32 mm output."""
    data = np.zeros((32, 32, 32))
    data[4:24, 10:20, 10:20] = 100.0 + np.random.default_rng(0).normal(0, 5, (20, 10, 10))
    return write(tmp_path / "long_head.nii.gz", data, ras_affine((2.0, 2.0, 2.0)))


FIT_CONFIG = dataclasses.replace(CONFIG, spacing_mm=(2.0, 2.0, 2.0), shape=(16, 16, 16))


def test_pad_crop_warns_naming_the_file_and_the_millimetres_cut(tmp_path, caplog):
    path = _head_with_neck(tmp_path)
    with caplog.at_level(logging.WARNING, logger="enn_neuro.data.transforms"):
        image = preprocess(path, FIT_CONFIG)["image"]
    assert image.shape == (1, 16, 16, 16)
    lo, hi = image[0].nonzero().amin(0), image[0].nonzero().amax(0)
    assert (hi - lo + 1).tolist() == [16, 10, 10]  # 4 of 20 voxels cut along x
    (record,) = caplog.records
    assert record.getMessage() == (
        f"{path}: the foreground (40.0 x 20.0 x 20.0 mm) exceeds the output shape "
        "(16, 16, 16); the centre crop cuts (8.0, 0.0, 0.0) mm per axis of it. Set "
        "preprocessing.fit: resize, or a larger shape, to keep it whole"
    )


def test_pad_crop_is_silent_when_the_foreground_fits(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="enn_neuro.data.transforms"):
        preprocess(_ras(tmp_path))  # a 30 x 34 x 26 mm head in 48 mm
    assert not caplog.records


def test_resize_scales_the_whole_foreground_into_the_shape(tmp_path, caplog):
    config = dataclasses.replace(FIT_CONFIG, fit="resize")
    with caplog.at_level(logging.WARNING, logger="enn_neuro.data.transforms"):
        image = preprocess(_head_with_neck(tmp_path), config)["image"]
    assert not caplog.records
    assert image.shape == (1, 16, 16, 16)
    lo, hi = image[0].nonzero().amin(0), image[0].nonzero().amax(0)
    # 20 x 10 x 10 scaled by 0.8, aspect kept, then centred by the padding
    assert lo.tolist() == [0, 4, 4] and hi.tolist() == [15, 11, 11]
    voxel_mm = np.linalg.norm(image.affine[:3, :3].numpy(), axis=0)
    np.testing.assert_allclose(voxel_mm, [2.5, 2.5, 2.5])


@pytest.mark.parametrize(
    ("size", "shape", "expected"),
    [
        ((20, 10, 10), (16, 16, 8), (16, 8, 8)),  # shrunk by the tightest axes
        ((8, 4, 4), (16, 16, 16), (16, 8, 8)),  # grown until one axis touches
        ((16, 12, 9), (16, 16, 16), (16, 12, 9)),  # already touching: unchanged
    ],
)
def test_fit_resize_keeps_the_aspect_ratio(size, shape, expected):
    image = MetaTensor(torch.rand(1, *size), affine=torch.eye(4))
    out = FitToShaped("image", shape, "resize")({"image": image})["image"]
    assert tuple(out.shape[1:]) == expected


def test_fit_mode_is_checked():
    with pytest.raises(ValueError, match=r"mode must be one of \('pad_crop', 'resize'\), got 'x'"):
        FitToShaped("image", (8, 8, 8), "x")


def rician_background(phantom_data: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Magnitude of the phantom plus complex Gaussian noise: positive everywhere, as in MRI."""
    rng = np.random.default_rng(seed)
    real = phantom_data + rng.normal(0.0, sigma, phantom_data.shape)
    return np.hypot(real, rng.normal(0.0, sigma, phantom_data.shape))


HEAD_BOX = 15 * 17 * 13  # bounding box of the phantom's head


def test_foreground_fraction_zero_takes_every_positive_voxel(tmp_path):
    data = phantom() + np.random.default_rng(1).uniform(0.5, 3.0, (SIDE,) * 3)
    path = write(tmp_path / "noisy.nii.gz", data, ras_affine((1.0, 1.0, 1.0)))
    config = dataclasses.replace(CONFIG, spacing_mm=(1.0, 1.0, 1.0), shape=(24, 24, 24))
    plain = preprocess(path, dataclasses.replace(config, foreground_fraction=0.0))["image"][0]
    robust = preprocess(path, config)["image"][0]
    # a positive background makes the whole field of view foreground: nothing to pad
    assert int((plain == 0).sum()) <= 1
    # with the default threshold the crop keeps the head's box and pads the rest
    assert int((robust == 0).sum()) >= 24**3 - HEAD_BOX


def test_zscore_uses_the_foreground_of_a_noisy_background(tmp_path):
    head = phantom() > 0
    data = rician_background(phantom(), sigma=4.0, seed=2)
    assert data.min() > 0  # every voxel positive, as in the demo cohort
    path = write(tmp_path / "noisy.nii.gz", data, ras_affine((1.0, 1.0, 1.0)))
    config = dataclasses.replace(CONFIG, spacing_mm=(1.0, 1.0, 1.0), shape=(24, 24, 24))
    image = preprocess(path, config)["image"][0]

    # the foreground is the head: z-scored there, 0 elsewhere (background and padding)
    values = foreground_voxels(image).double()
    assert values.numel() == int(head.sum())
    assert abs(float(values.mean())) < 1e-4
    assert float(values.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    assert int((image == 0).sum()) == 24**3 - int(head.sum())
    # the crop removed the background: the head is centred, its box padded
    lo, hi = image.nonzero().amin(0), image.nonzero().amax(0)
    assert (hi - lo + 1).tolist() == [15, 17, 13]
    assert lo.tolist() == [4, 3, 5]


def test_zscore_does_not_depend_on_the_field_of_view(tmp_path):
    # the same head, scanned with 8 more voxels of noisy background on every side
    small = rician_background(phantom(), sigma=4.0, seed=3)
    large = rician_background(np.pad(phantom(), 8), sigma=4.0, seed=4)
    large[8:-8, 8:-8, 8:-8] = small
    large_affine = ras_affine((1.0, 1.0, 1.0))
    large_affine[:3, 3] -= 8.0
    config = dataclasses.replace(CONFIG, spacing_mm=(1.0, 1.0, 1.0), shape=(24, 24, 24))
    first = preprocess(write(tmp_path / "s.nii.gz", small, ras_affine((1.0, 1.0, 1.0))), config)
    second = preprocess(write(tmp_path / "l.nii.gz", large, large_affine), config)
    torch.testing.assert_close(
        first["image"].as_tensor(), second["image"].as_tensor(), atol=1e-5, rtol=0
    )


def test_dark_regions_inside_the_head_keep_their_intensities(tmp_path):
    # a bright shell around a dark cavity (a ventricle in T1): below the threshold, enclosed
    data = rician_background(np.zeros((24, 24, 24)), sigma=2.0, seed=6)
    data[6:18, 6:18, 6:18] = 100.0
    data[10:14, 10:14, 10:14] = 10.0
    path = write(tmp_path / "cavity.nii.gz", data, ras_affine((1.0, 1.0, 1.0)))
    config = dataclasses.replace(CONFIG, spacing_mm=(1.0, 1.0, 1.0), shape=(24, 24, 24))
    image = preprocess(path, config)["image"][0]
    inside = image[image != 0]
    assert inside.numel() == 12**3  # shell and cavity: the cavity is foreground
    cavity = inside[inside < 0]
    assert cavity.numel() == 4**3 and float(cavity.max()) < -2  # darker than the shell


def test_specks_of_noise_do_not_stretch_the_crop_but_parts_of_a_head_stay(tmp_path):
    data = np.zeros((40, 40, 40))
    rng = np.random.default_rng(5)
    data[4:12, 4:20, 20:36] = 100.0 + rng.normal(0, 5, (8, 16, 16))  # two halves of a head,
    data[14:22, 4:20, 20:36] = 100.0 + rng.normal(0, 5, (8, 16, 16))  # split by a dark gap
    data[38, 38, 2] = 90.0  # a hot noise voxel far away
    path = write(tmp_path / "specks.nii.gz", data, ras_affine((1.0, 1.0, 1.0)))
    config = dataclasses.replace(CONFIG, spacing_mm=(1.0, 1.0, 1.0), shape=(24, 24, 24))
    image = preprocess(path, config)["image"][0]
    assert int((image != 0).sum()) == 2 * 8 * 16 * 16  # both halves, not the speck
    lo, hi = image.nonzero().amin(0), image.nonzero().amax(0)
    assert (hi - lo + 1).tolist() == [18, 16, 16]


def test_image_without_positive_voxels_is_rejected_naming_it(tmp_path):
    path = write(tmp_path / "negative.nii.gz", -1.0 - phantom(), ras_affine())
    with pytest.raises(RuntimeError) as excinfo:
        preprocess(path)
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert "negative.nii.gz: no positive voxel" in str(excinfo.value.__cause__)


def test_demo_cohort_preprocesses_without_its_background(demo_cohort):
    # the demo's Rician background is positive everywhere: the default must still find heads
    paths = sorted(demo_cohort.glob("sub-*/**/*_T1w.nii*"))
    assert len(paths) == 12
    for path in paths:
        image = preprocess(path, PreprocessingConfig())["image"]
        assert tuple(image.shape) == (1, 64, 64, 64) and torch.isfinite(image).all()
        values = foreground_voxels(image).double()
        assert abs(float(values.mean())) < 1e-3, path.name
        assert float(values.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3), path.name
        # a brain of about 1.4 litres in 27 mm³ voxels, not the field of view
        assert 0.1 < values.numel() / 64**3 < 0.35, (path.name, values.numel())


def test_non_finite_voxels_become_zero(tmp_path):
    data = phantom()
    data[0:3, 0:3, 0:3] = np.nan
    data[12, 12, 12] = np.inf
    image = preprocess(write(tmp_path / "nan.nii.gz", data, ras_affine()))["image"]
    assert torch.isfinite(image).all()


# --- files that cannot be used


def test_multi_volume_file_is_rejected_naming_it(tmp_path):
    path = write(tmp_path / "bold.nii.gz", np.stack([phantom(), phantom(1)], -1), ras_affine())
    with pytest.raises(RuntimeError) as excinfo:  # MONAI wraps errors raised inside Compose
        preprocess(path)
    cause = excinfo.value.__cause__
    assert isinstance(cause, ValueError)
    assert "bold.nii.gz: expected a single volume, got 2 volumes" in str(cause)


def test_empty_image_is_rejected(tmp_path):
    path = write(tmp_path / "empty.nii.gz", np.zeros((8, 8, 8)), ras_affine())
    with pytest.raises(RuntimeError) as excinfo:
        preprocess(path)
    assert isinstance(excinfo.value.__cause__, ValueError)
    assert "empty.nii.gz: image is empty" in str(excinfo.value.__cause__)


# --- configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("spacing_mm", (3.0, 0.0, 3.0)),
        ("spacing_mm", (3.0, 3.0)),
        ("spacing_mm", (3.0, -1.0, float("nan"))),
        ("shape", (64, 64, 0)),
        ("shape", (64.5, 64, 64)),
        ("shape", 64),
        ("orientation", "RAA"),
        ("orientation", "RASX"),
        ("orientation", "XYZ"),
        ("intensity", "minmax"),
        ("percentiles", (99.5, 0.5)),
        ("percentiles", (-1.0, 99.0)),
        ("crop_foreground", "yes"),
        ("foreground_fraction", 1.0),
        ("fit", "stretch"),
    ],
)
def test_preprocessing_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"{field} must .*got {re.escape(repr(value))}"):
        PreprocessingConfig(**{field: value})


def test_preprocessing_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as excinfo:
        PreprocessingConfig(spacing_mm=(0, 1, 1), shape=(1, 2), intensity="other")
    message = str(excinfo.value)
    for field in ("spacing_mm", "shape", "intensity"):
        assert f"{field} must" in message


def test_fingerprint_is_stable_and_tracks_every_field():
    base = PreprocessingConfig()
    # lists (as from YAML), lower-case codes and ints normalise to the same config
    same = PreprocessingConfig(spacing_mm=[3, 3, 3], shape=[64, 64, 64], orientation="ras")
    assert same == base and same.fingerprint() == base.fingerprint()
    assert len(base.fingerprint()) == 64

    changed = [
        dataclasses.replace(base, spacing_mm=(2.0, 2.0, 2.0)),
        dataclasses.replace(base, shape=(64, 64, 32)),
        dataclasses.replace(base, orientation="LPS"),
        dataclasses.replace(base, intensity="percentile"),
        dataclasses.replace(base, percentiles=(1.0, 99.0)),
        dataclasses.replace(base, crop_foreground=False),
        dataclasses.replace(base, foreground_fraction=0.1),
        dataclasses.replace(base, fit="resize"),
    ]
    fingerprints = {config.fingerprint() for config in changed}
    assert len(fingerprints) == len(changed) and base.fingerprint() not in fingerprints
    assert base.to_dict()["spacing_mm"] == [3.0, 3.0, 3.0]


# --- augmentation

PROBABILITIES = [f.name for f in dataclasses.fields(AugmentationConfig) if f.name.endswith("_p")]
NOTHING = AugmentationConfig(**dict.fromkeys(PROBABILITIES, 0.0))


def cached_sample() -> dict:
    image = torch.zeros(1, 16, 16, 16)
    image[:, 3:13, 4:12, 2:14] = torch.randn(1, 10, 8, 12)
    return {"image": image, "label": torch.tensor(1), "subject_id": "sub-001", "site": "A"}


@pytest.mark.parametrize(
    "config",
    [AugmentationConfig(enabled=False), NOTHING],
    ids=["disabled", "all_p_zero"],
)
def test_augmentation_identity(config):
    sample = cached_sample()
    assert config.is_identity
    out = augmentation_transforms(config)(sample)
    assert torch.equal(out["image"], sample["image"])
    assert out["subject_id"] == "sub-001"


@pytest.mark.parametrize("probability", PROBABILITIES)
def test_each_augmentation_changes_image_and_keeps_contract(probability):
    config = dataclasses.replace(NOTHING, **{probability: 1.0})
    sample = cached_sample()
    original = sample["image"].clone()

    out = augmentation_transforms(config, spacing_mm=(3.0, 3.0, 3.0))(sample)

    assert out["image"].shape == (1, 16, 16, 16)
    assert out["image"].dtype == torch.float32
    assert float((out["image"] - original).abs().max()) > 1e-3
    assert torch.equal(sample["image"], original)  # the input (a cached item) is not modified
    assert out["subject_id"] == "sub-001" and out["site"] == "A"
    assert torch.equal(out["label"], torch.tensor(1))


@pytest.mark.parametrize("probability", ["bias_field_p", "gamma_p"])
def test_intensity_artefacts_act_on_positive_intensities(probability):
    # z-scores in the head, 0 outside: a bias field or gamma must not push the darkest
    # tissue below the volume's minimum (multiplying negative z-scores would), nor touch
    # the background
    config = dataclasses.replace(NOTHING, **{probability: 1.0}, bias_field_coefficients=0.9)
    augment = augmentation_transforms(config, spacing_mm=(3.0, 3.0, 3.0))
    sample = cached_sample()
    image = sample["image"]
    head = image != 0
    for seed in range(5):
        torch.manual_seed(seed)
        out = augment(sample)["image"]
        assert float(out[head].min()) >= float(image.min()) - 1e-5, seed
        assert torch.equal(out[~head], torch.zeros_like(out[~head]))
        assert float((out - image).abs().max()) > 1e-3


def test_augmentation_is_deterministic_under_manual_seed():
    augment = augmentation_transforms(AugmentationConfig(), spacing_mm=(3.0, 3.0, 3.0))
    sample = cached_sample()
    torch.manual_seed(123)
    first = [augment(sample)["image"] for _ in range(3)]
    torch.manual_seed(123)
    second = [augment(sample)["image"] for _ in range(3)]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # but successive draws differ


def test_augmentation_accepts_metatensor_from_preprocessing(tmp_path):
    sample = preprocess(_ras(tmp_path))
    config = dataclasses.replace(NOTHING, affine_p=1.0)
    out = augmentation_transforms(config)(sample)
    assert type(out["image"]) is torch.Tensor
    assert out["image"].shape == (1, 16, 16, 16) and out["label"] == 1


def test_augmentation_rejects_wrong_shape():
    augment = augmentation_transforms(AugmentationConfig(affine_p=1.0))
    with pytest.raises(ValueError, match=r"image must have shape \(1, D, H, W\), got \(16, 16\)"):
        augment({"image": torch.zeros(16, 16)})


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("affine_p", 1.5, "affine_p must be a probability in \\[0, 1\\], got 1.5"),
        ("noise_std", -0.1, "noise_std must be finite and >= 0, got -0.1"),
        ("affine_scales", 1.0, "affine_scales must be < 1"),
        ("gamma_p", "high", "gamma_p must be a number, got 'high'"),
        ("enabled", 1, "enabled must be a bool, got 1"),
    ],
)
def test_augmentation_config_rejects_bad_values(field, value, expected):
    with pytest.raises(ValueError, match=expected):
        AugmentationConfig(**{field: value})
