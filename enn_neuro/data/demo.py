"""Synthetic demo cohort: a small, deterministic patient/control BIDS dataset of T1w volumes.

The cohort stands in for a clinical study so that the whole pipeline (BIDS discovery,
preprocessing, training, evaluation) can run end to end without patient data. Every image is
derived from the MNI152 2009 T1 template and its grey- and white-matter maps, which ship inside
the nilearn wheel, so nothing is downloaded. See Note [generative model].

Note [generative model]:
    The template and its tissue maps are resampled to a 3 mm working grid; CSF is what the
    brain mask holds besides grey and white matter. For each subject:

    1. Anatomy. Grey matter loses a fraction of its probability everywhere in proportion to
       age (55–85 years), and more inside two soft spheres over the left and right medial
       temporal lobes in proportion to disease severity. The lateral ventricles grow outwards,
       along their distance map, by a number of millimetres that rises with age and severity.
       Lost tissue becomes CSF. The new T1 intensity is the template's plus the tissue
       changes weighted by per-tissue intensities fitted to the template, which keeps the
       template's own texture.
    2. Pose and shape. The head sits in the scanner with a random rotation (3° s.d. per axis),
       translation (4 mm s.d.) and scale (3 % s.d., men 2 % larger and women 2 % smaller),
       and is warped by a smooth random displacement field of a few millimetres.
    3. Acquisition. The site sets the voxel size (by default 3.5 mm, 3 × 3 × 4.5 mm and
       4 mm), intensity scale, noise level, data type (int16 or float32) and storage
       orientation (RAS or LPS; the affine always matches the stored array). A smooth
       multiplicative bias field and Rician noise are applied.

    Patients have severity ``effect_size · u`` with ``u ~ U(0.5, 1.5)``; controls have none.
    At severity 1 grey matter at the temporal centres loses a quarter of its probability and
    the ventricles grow by 1.2 mm, comparable to ageing over the whole 55–85 range (8 % of
    grey matter everywhere, 2 mm of ventricle growth); everyone also varies by chance (about
    2 % of grey matter, 4 % more at the temporal centres, 0–1 mm of ventricle growth). At
    ``effect_size=1`` the mean intensity of a fixed box around the ventricles separates 60
    patients and controls with an AUC of 0.7–0.85, and the demo study on 100 subjects
    (``enn-neuro demo --effect-size 1``) reached a balanced accuracy of 0.70 and an AUC of
    0.76 over 5 folds (``benchmarks/results/demo_study.json``): learnable, not trivial.

    Every random draw is made whatever the diagnosis and effect size, so cohorts written with
    the same seed differ only through the disease: a control's image does not depend on
    ``effect_size``, and at ``effect_size=0`` patients are made exactly as controls are.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, special

__all__ = ["write_demo_cohort"]

logger = logging.getLogger(__name__)

# anatomy, see Note [generative model]
_WORK_SPACING_MM = 3.0
_AGE_RANGE = (55.0, 85.0)
_GM_LOSS_OVER_AGE_RANGE = 0.08
_VENTRICLE_GROWTH_OVER_AGE_RANGE_MM = 2.0
_DISEASE_CENTRES_MM = ((-28.0, -22.0, -14.0), (28.0, -22.0, -14.0))  # medial temporal lobes
_DISEASE_SIGMA_MM = 12.0
_GM_LOSS_PER_SEVERITY = 0.25
_VENTRICLE_GROWTH_PER_SEVERITY_MM = 1.2
_VENTRICLE_EDGE_MM = 1.0

# pose, shape and acquisition
_ROTATION_SD_DEG = 3.0
_TRANSLATION_SD_MM = 4.0
_SCALE_LOG_SD = 0.03
_SEX_SCALE = {"M": 1.02, "F": 0.98}
_WARP_SD_MM = 2.5
_WARP_CONTROL_POINTS = (5, 6, 5)
_BIAS_LOG_SD = 0.12
_BIAS_CONTROL_POINTS = (3, 3, 3)
_FOV_MARGIN_MM = 10.0
_MAX_SITES = 26  # labelled site-A … site-Z

# every 10th subject has a session folder; every 5th, from the 3rd, is stored uncompressed
_SESSION_EVERY = 10
_PLAIN_NII_EVERY = 5


def write_demo_cohort(
    root: str | os.PathLike[str],
    n_subjects: int = 60,
    seed: int = 0,
    effect_size: float = 1.0,
    n_sites: int = 3,
    overwrite: bool = False,
    *,
    voxel_size_mm: float = 3.5,
) -> Path:
    """Writes a synthetic patient/control cohort of T1w volumes as a BIDS dataset.

    The layout is::

        root/
            dataset_description.json, participants.tsv, participants.json, README
            sub-001/anat/sub-001_T1w.nii.gz
            sub-010/ses-01/anat/sub-010_ses-01_T1w.nii.gz   (every 10th subject)

    ``participants.tsv`` has the columns ``participant_id``, ``diagnosis`` (``patient`` or
    ``control``, balanced within each site), ``age`` (55–85, one decimal), ``sex`` (``M`` or
    ``F``) and ``site`` (``site-A``, ...). Every 5th subject from ``sub-003`` on is stored as
    plain ``.nii``. At the default voxel size images have 39 to 66 voxels per side. How they
    are made is described in the module's Note [generative model].

    The same arguments give the same image arrays and the same ``participants.tsv``; gzip
    headers hold a timestamp, so compare arrays rather than files. The cohort is built in a
    hidden sibling of ``root`` and renamed into place at the end, so an interrupted run never
    leaves a partial cohort at ``root``.

    Args:
        root: Directory to write. It must not exist, be empty, or (with ``overwrite``) hold a
            BIDS dataset, which is then replaced.
        n_subjects: Number of subjects; at least ``2 * n_sites``, so that every site has a
            patient and a control.
        seed: Seed for :func:`numpy.random.default_rng`; each subject gets its own generator
            spawned from it.
        effect_size: Scale of the disease effect, at least 0. At 0 patients and controls
            come from the same distribution; 1 is moderate and 2 is strong.
        n_sites: Number of acquisition sites, 1 to 26. Sites differ in voxel size, intensity
            scale, noise, data type and orientation; the second is stored LPS at
            ``6/7 × 6/7 × 9/7`` of ``voxel_size_mm``.
        overwrite: Replace an existing BIDS dataset at ``root``.
        voxel_size_mm: Isotropic voxel size of the first site, in [2, 8]; the other sites'
            voxel sizes are fixed multiples of it.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If an argument is out of range; every problem is reported at once.
        FileExistsError: If ``root`` is a file, is a non-empty directory and ``overwrite`` is
            false, or is a non-empty directory without ``dataset_description.json``.

    Example:
        >>> root = write_demo_cohort("demo_cohort", n_subjects=20, effect_size=1.5)
        >>> sorted(p.name for p in root.glob("sub-001/anat/*"))
        ['sub-001_T1w.nii.gz']
    """
    # arguments and destination, checked before any work
    problems = _argument_problems(n_subjects, seed, effect_size, n_sites, voxel_size_mm)
    if problems:
        raise ValueError("invalid demo cohort arguments: " + "; ".join(problems))
    root = Path(root).expanduser()
    _check_destination(root, overwrite)
    start = time.perf_counter()

    # who is in the cohort; the subjects' own generators are spawned from the same seed
    seed_sequence = np.random.SeedSequence(seed)
    subjects = _draw_subjects(np.random.default_rng(seed_sequence), n_subjects, n_sites)
    subject_rngs = [np.random.default_rng(child) for child in seed_sequence.spawn(n_subjects)]
    sites = [_site(index, voxel_size_mm) for index in range(n_sites)]
    template = _load_template()

    # write into a hidden sibling, then move it into place
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        generated_by = (
            f"write_demo_cohort(n_subjects={n_subjects}, seed={seed}, "
            f"effect_size={effect_size}, n_sites={n_sites}, voxel_size_mm={voxel_size_mm})"
        )
        _write_metadata(staging, subjects, sites, generated_by)
        for subject, rng in zip(subjects, subject_rngs, strict=True):
            image = _render_subject(template, subject, sites[subject.site_index], effect_size, rng)
            path = staging / subject.relative_path
            path.parent.mkdir(parents=True)
            nib.save(image, path)
        _move_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    n_patients = sum(subject.diagnosis == "patient" for subject in subjects)
    logger.info(
        "wrote demo cohort to %s: %d subjects (%d patients, %d controls), %d sites, "
        "effect_size=%g, seed=%d, in %.1f s",
        root,
        n_subjects,
        n_patients,
        n_subjects - n_patients,
        n_sites,
        effect_size,
        seed,
        time.perf_counter() - start,
    )
    return root


@dataclasses.dataclass(frozen=True)
class _Site:
    """How one site acquires and stores its images."""

    label: str
    spacing_mm: tuple[float, float, float]
    intensity_scale: float
    noise_sd: float  # Rician σ, relative to a template intensity of 1 (white matter ≈ 0.88)
    dtype: type[np.generic]
    orientation: str  # "RAS" or "LPS": the axis directions of the stored array


# (spacing relative to voxel_size_mm, intensity scale, noise, dtype, orientation); sites past
# the fourth reuse the patterns with brighter, noisier images
_SITE_PATTERNS = (
    ((1.0, 1.0, 1.0), 1000.0, 0.025, np.int16, "RAS"),
    ((6 / 7, 6 / 7, 9 / 7), 1.0, 0.04, np.float32, "LPS"),  # thick axial slices
    ((8 / 7, 8 / 7, 8 / 7), 2400.0, 0.03, np.int16, "RAS"),
    ((9 / 7, 6 / 7, 6 / 7), 180.0, 0.05, np.float32, "LPS"),  # thick sagittal slices
)


@dataclasses.dataclass(frozen=True)
class _Subject:
    """One row of participants.tsv, and where its image goes."""

    participant_id: str
    diagnosis: str  # "patient" or "control"
    age: float
    sex: str  # "M" or "F"
    site_index: int
    session: str | None
    extension: str  # ".nii.gz" or ".nii"

    @property
    def relative_path(self) -> Path:
        folder = Path(self.participant_id)
        stem = self.participant_id
        if self.session is not None:
            folder /= self.session
            stem += f"_{self.session}"
        return folder / "anat" / f"{stem}_T1w{self.extension}"


@dataclasses.dataclass(frozen=True)
class _Template:
    """MNI152 on the working grid; the volumes are ``(X, Y, Z)`` and read-only."""

    t1: np.ndarray  # intensity, 0 to 1
    gm: np.ndarray  # tissue probabilities
    wm: np.ndarray
    ventricle_distance_mm: np.ndarray  # signed distance to the lateral ventricles, < 0 inside
    disease_weight: np.ndarray  # 1 at the temporal centres, falling off as a Gaussian
    contrasts: tuple[float, float, float]  # T1 intensity of pure GM, WM, CSF
    affine: np.ndarray  # (4, 4) working voxel → MNI mm
    brain_centre_mm: np.ndarray  # (3,) centre of the brain's bounding box
    brain_extent_mm: np.ndarray  # (3,) size of the brain's bounding box


def _argument_problems(
    n_subjects: object,
    seed: object,
    effect_size: object,
    n_sites: object,
    voxel_size_mm: object,
) -> list[str]:
    """Every problem with the arguments of :func:`write_demo_cohort`, as messages."""
    problems = []
    sites_ok = _is_int(n_sites) and 1 <= n_sites <= _MAX_SITES
    if not sites_ok:
        problems.append(f"n_sites must be an integer in [1, {_MAX_SITES}], got {n_sites!r}")
    minimum = 2 * n_sites if sites_ok else 2
    if not _is_int(n_subjects) or n_subjects < minimum:
        problems.append(
            f"n_subjects must be an integer of at least 2 * n_sites = {minimum}, so that every "
            f"site has a patient and a control, got {n_subjects!r}"
        )
    if not _is_int(seed) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_real(effect_size) or not effect_size >= 0:
        problems.append(f"effect_size must be a finite number >= 0, got {effect_size!r}")
    if not _is_real(voxel_size_mm) or not 2.0 <= voxel_size_mm <= 8.0:
        problems.append(f"voxel_size_mm must be a number in [2, 8], got {voxel_size_mm!r}")
    return problems


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_destination(root: Path, overwrite: bool) -> None:
    """Raises unless ``root`` is absent, empty, or a BIDS dataset that may be replaced."""
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"root {str(root)!r} exists and is not a directory")
    if not any(root.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"root {str(root)!r} exists and is not empty; pass overwrite=True to replace it"
        )
    # overwrite deletes the directory: a mistyped root must not cost someone their files
    if not (root / "dataset_description.json").is_file():
        raise FileExistsError(
            f"root {str(root)!r} is not empty and holds no dataset_description.json; refusing "
            "to overwrite what does not look like a BIDS dataset"
        )


def _move_into_place(staging: Path, root: Path) -> None:
    """Renames the finished ``staging`` directory to ``root``, retiring any old one."""
    os.chmod(staging, 0o755)  # mkdtemp made it private
    if not root.exists():
        os.replace(staging, root)
        return
    retired = staging.with_name(staging.name + ".old")
    os.replace(root, retired)
    os.replace(staging, root)
    shutil.rmtree(retired)


def _site(index: int, voxel_size_mm: float) -> _Site:
    relative_spacing, scale, noise_sd, dtype, orientation = _SITE_PATTERNS[
        index % len(_SITE_PATTERNS)
    ]
    cycle = index // len(_SITE_PATTERNS)
    return _Site(
        label=f"site-{chr(ord('A') + index)}",
        spacing_mm=tuple(round(voxel_size_mm * factor, 4) for factor in relative_spacing),
        intensity_scale=scale * (1.0 + 0.25 * cycle),
        noise_sd=noise_sd * (1.0 + 0.1 * cycle),
        dtype=dtype,
        orientation=orientation,
    )


def _draw_subjects(rng: np.random.Generator, n_subjects: int, n_sites: int) -> list[_Subject]:
    """Site, diagnosis (balanced within each site), age and sex of every subject."""
    site_index = rng.permutation(np.arange(n_subjects) % n_sites)
    is_patient = np.zeros(n_subjects, dtype=bool)
    for site in range(n_sites):
        members = np.flatnonzero(site_index == site)
        # odd-sized sites alternate between one extra patient and one extra control
        labels = (np.arange(len(members)) + site) % 2 == 0
        is_patient[members] = rng.permutation(labels)
    ages = np.round(rng.uniform(*_AGE_RANGE, size=n_subjects), 1)
    is_male = rng.random(n_subjects) < 0.5

    width = max(3, len(str(n_subjects)))
    subjects = []
    for i in range(n_subjects):
        number = i + 1
        subjects.append(
            _Subject(
                participant_id=f"sub-{number:0{width}d}",
                diagnosis="patient" if is_patient[i] else "control",
                age=float(ages[i]),
                sex="M" if is_male[i] else "F",
                site_index=int(site_index[i]),
                session="ses-01" if number % _SESSION_EVERY == 0 else None,
                extension=".nii" if number % _PLAIN_NII_EVERY == 3 else ".nii.gz",
            )
        )
    return subjects


def _write_metadata(
    root: Path, subjects: list[_Subject], sites: list[_Site], generated_by: str
) -> None:
    """Writes dataset_description.json, README, participants.tsv and participants.json."""
    description = {
        "Name": "enn-neuro synthetic demo cohort",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "Acknowledgements": (
            "Images are synthetic, derived from the MNI ICBM152 2009 nonlinear symmetric "
            "template as distributed with nilearn. They contain no data of any person."
        ),
        "ReferencesAndLinks": ["https://doi.org/10.1016/j.neuroimage.2010.07.033"],
        "GeneratedBy": [{"Name": "enn_neuro.data.demo", "Description": generated_by}],
    }
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    (root / "README").write_text(
        "Synthetic patient/control T1w cohort for testing the enn-neuro pipeline, written by\n"
        f"{generated_by}.\nSee the docstring of enn_neuro.data.demo for the generative model.\n"
    )

    rows = ["participant_id\tdiagnosis\tage\tsex\tsite"]
    rows += [
        f"{s.participant_id}\t{s.diagnosis}\t{s.age:.1f}\t{s.sex}\t{sites[s.site_index].label}"
        for s in subjects
    ]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")

    columns = {
        "participant_id": {"Description": "Subject label"},
        "diagnosis": {
            "Description": "Group",
            "Levels": {"patient": "synthetic disease effect", "control": "no disease effect"},
        },
        "age": {"Description": "Age at scan", "Units": "year"},
        "sex": {"Description": "Sex", "Levels": {"M": "male", "F": "female"}},
        "site": {"Description": "Acquisition site", "Levels": {s.label: s.label for s in sites}},
    }
    (root / "participants.json").write_text(json.dumps(columns, indent=2) + "\n")


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    """MNI152 T1, grey and white matter from nilearn's package data, on the working grid."""
    # only the demo needs nilearn, and importing it is slow; these loaders read files inside
    # the installed package and never download
    from nilearn import datasets

    images = [
        load(resolution=2)
        for load in (
            datasets.load_mni152_template,
            datasets.load_mni152_gm_template,
            datasets.load_mni152_wm_template,
        )
    ]
    t1, gm, wm = (np.asarray(image.get_fdata(), dtype=np.float64) for image in images)
    affine = images[0].affine
    spacing = nib.affines.voxel_sizes(affine)
    # resampling leaves values near 1e-40 around the skull-stripped brain
    brain = t1 > 1e-3
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain

    # intensity of each pure tissue, by least squares inside the brain
    design = np.stack([gm[brain], wm[brain], csf[brain]], axis=1)
    contrasts, *_ = np.linalg.lstsq(design, t1[brain], rcond=None)

    # signed distance to the lateral ventricles, the boundary at 0
    ventricles = _lateral_ventricles(csf, _world_coordinates(affine, t1.shape))
    half_voxel = spacing.mean() / 2
    distance = np.where(
        ventricles,
        half_voxel - ndimage.distance_transform_edt(ventricles, sampling=spacing),
        ndimage.distance_transform_edt(~ventricles, sampling=spacing) - half_voxel,
    )

    brain_world = _world_coordinates(affine, t1.shape)[brain]  # (N, 3)
    low, high = brain_world.min(axis=0), brain_world.max(axis=0)

    # working grid: blur by the extra width of the coarser voxels, so that they hold partial
    # volumes rather than aliased samples, then zoom
    factor = spacing / _WORK_SPACING_MM
    sigma = np.sqrt(np.maximum(_WORK_SPACING_MM**2 - spacing**2, 0.0) / 12.0) / spacing
    work = [ndimage.zoom(ndimage.gaussian_filter(a, sigma), factor, order=1) for a in (t1, gm, wm)]
    work.append(ndimage.zoom(distance, factor, order=1))
    shape_in, shape_out = np.array(t1.shape), np.array(work[0].shape)
    # zoom maps corner voxel centres onto each other
    work_affine = affine @ np.diag([*((shape_in - 1) / (shape_out - 1)), 1.0])

    xyz = _world_coordinates(work_affine, work[0].shape)
    weight = np.zeros(work[0].shape)
    for centre in _DISEASE_CENTRES_MM:
        squared = np.sum((xyz - np.asarray(centre)) ** 2, axis=-1)
        weight = np.maximum(weight, np.exp(-squared / (2 * _DISEASE_SIGMA_MM**2)))

    arrays = [*work, weight]
    for array in arrays:
        array.setflags(write=False)
    t1_work, gm_work, wm_work, distance_work, weight = arrays
    return _Template(
        t1=t1_work,
        gm=gm_work,
        wm=wm_work,
        ventricle_distance_mm=distance_work,
        disease_weight=weight,
        contrasts=tuple(float(c) for c in contrasts),
        affine=work_affine,
        brain_centre_mm=(low + high) / 2,
        brain_extent_mm=high - low,
    )


def _lateral_ventricles(csf: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """The largest connected CSF region near the centre of the brain.

    Args:
        csf: CSF probability, ``(X, Y, Z)``.
        xyz: MNI coordinates of each voxel in mm, ``(X, Y, Z, 3)``.
    """
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    near_centre = (np.abs(x) < 30) & (y > -45) & (y < 30) & (z > -5) & (z < 35)
    labels, count = ndimage.label((csf > 0.5) & near_centre)
    if count == 0:
        raise RuntimeError("found no lateral ventricles in nilearn's MNI152 template")
    sizes = ndimage.sum_labels(np.ones_like(csf), labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _world_coordinates(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World coordinates of every voxel centre, ``(X, Y, Z, 3)``."""
    index = np.indices(shape, dtype=np.float64)  # (3, X, Y, Z)
    return np.moveaxis(np.tensordot(affine[:3, :3], index, axes=1), 0, -1) + affine[:3, 3]


def _render_subject(
    template: _Template,
    subject: _Subject,
    site: _Site,
    effect_size: float,
    rng: np.random.Generator,
) -> nib.Nifti1Image:
    """One subject's stored T1w image, as the site would write it."""
    # draws, in a fixed order whatever the diagnosis and effect size (Note [generative model])
    severity_draw = rng.uniform(0.5, 1.5)
    natural_gm_loss = rng.normal(0.0, 0.02)
    natural_regional_loss = rng.normal(0.0, 0.04)
    natural_ventricle_growth_mm = rng.uniform(0.0, 1.0)
    rotation_deg = np.clip(rng.normal(0.0, _ROTATION_SD_DEG, 3), -8.0, 8.0)
    translation_mm = rng.normal(0.0, _TRANSLATION_SD_MM, 3)
    scale = _SEX_SCALE[subject.sex] * math.exp(rng.normal(0.0, _SCALE_LOG_SD))
    warp_coarse = rng.normal(0.0, _WARP_SD_MM, (3, *_WARP_CONTROL_POINTS))
    bias_coarse = rng.normal(0.0, _BIAS_LOG_SD, _BIAS_CONTROL_POINTS)

    # anatomy, in template space
    severity = effect_size * severity_draw if subject.diagnosis == "patient" else 0.0
    ageing = (subject.age - _AGE_RANGE[0]) / (_AGE_RANGE[1] - _AGE_RANGE[0])
    intensity = _atrophied_t1(
        template,
        global_gm_loss=_GM_LOSS_OVER_AGE_RANGE * ageing + natural_gm_loss,
        regional_gm_loss=_GM_LOSS_PER_SEVERITY * severity + natural_regional_loss,
        ventricle_growth_mm=(
            _VENTRICLE_GROWTH_OVER_AGE_RANGE_MM * ageing
            + _VENTRICLE_GROWTH_PER_SEVERITY_MM * severity
            + natural_ventricle_growth_mm
        ),
    )

    # pose and warp: where in the template each scanner voxel samples
    spacing = np.asarray(site.spacing_mm)
    extent = template.brain_extent_mm + 2 * _FOV_MARGIN_MM
    shape = tuple(int(n) for n in np.ceil(extent / spacing))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = template.brain_centre_mm - (np.asarray(shape) - 1) / 2 * spacing
    scanner = _world_coordinates(affine, shape).reshape(-1, 3).T  # (3, N)
    # the head sits at scanner = centre + scale · R · (mni − centre) + translation
    centre = template.brain_centre_mm[:, None]
    rotation = _rotation_matrix(rotation_deg)
    mni = centre + rotation.T @ (scanner - centre - translation_mm[:, None]) / scale
    mni += np.stack([_smooth_field(c, shape).ravel() for c in warp_coarse])  # (3, N)
    to_voxel = np.linalg.inv(template.affine)
    coordinates = (to_voxel[:3, :3] @ mni + to_voxel[:3, 3:]).reshape(3, *shape)
    signal = ndimage.map_coordinates(intensity, coordinates, order=1, mode="constant")

    # acquisition: bias field, Rician noise, the site's scale and data type
    signal *= np.exp(_smooth_field(bias_coarse, shape))
    real = signal + rng.normal(0.0, site.noise_sd, shape)
    imaginary = rng.normal(0.0, site.noise_sd, shape)
    stored = np.hypot(real, imaginary) * site.intensity_scale
    if np.issubdtype(site.dtype, np.integer):
        stored = np.clip(np.rint(stored), 0, np.iinfo(site.dtype).max)
    data = stored.astype(site.dtype)
    if site.orientation == "LPS":
        data, affine = _as_lps(data, affine)

    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # 1: scanner-based anatomical coordinates
    image.set_sform(affine, code=1)
    return image


def _atrophied_t1(
    template: _Template,
    global_gm_loss: float,
    regional_gm_loss: float,
    ventricle_growth_mm: float,
) -> np.ndarray:
    """The template's T1 intensity after ventricle growth and grey-matter loss, ``(X, Y, Z)``."""
    # ventricles grow outwards: tissue up to ventricle_growth_mm outside them becomes CSF
    distance = template.ventricle_distance_mm
    converted = special.expit((ventricle_growth_mm - distance) / _VENTRICLE_EDGE_MM)
    converted -= special.expit(-distance / _VENTRICLE_EDGE_MM)
    gm = template.gm * (1.0 - converted)
    wm = template.wm * (1.0 - converted)

    # grey matter thins, everywhere with age and at the temporal centres with disease
    loss = np.clip(global_gm_loss + regional_gm_loss * template.disease_weight, 0.0, 0.9)
    gm *= 1.0 - loss

    # lost tissue becomes CSF: only the differences from the template change its intensity
    gm_intensity, wm_intensity, csf_intensity = template.contrasts
    t1 = (
        template.t1
        + (gm_intensity - csf_intensity) * (gm - template.gm)
        + (wm_intensity - csf_intensity) * (wm - template.wm)
    )
    return np.clip(t1, 0.0, None)


def _smooth_field(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Cubic-spline upsampling of a coarse grid of values to ``shape``."""
    field = coarse
    for axis, (n, c) in enumerate(zip(shape, coarse.shape, strict=True)):
        # splines are separable, so each axis is a small matrix product; zooming the whole
        # volume at once costs 20 times more
        weights = ndimage.zoom(np.eye(c), (n / c, 1), order=3, mode="nearest")  # (n, c)
        field = np.moveaxis(np.tensordot(weights, field, axes=([1], [axis])), 0, axis)
    return field


def _rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation by the given angles about x, then y, then z, ``(3, 3)``."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _as_lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stores a RAS array with i running right→left and j anterior→posterior.

    The affine absorbs the flips, so every voxel keeps its world position.
    """
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(data.shape[:2]) - 1  # new index i' is old index n − 1 − i'
    return np.ascontiguousarray(data[::-1, ::-1, :]), affine @ flip
