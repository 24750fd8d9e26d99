from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from enn_neuro.data import demo
from enn_neuro.data.cohort import read_bids
from enn_neuro.data.demo import write_demo_cohort
from enn_neuro.data.validation import validate_cohort

N_SUBJECTS = 12
COLUMNS = ["participant_id", "diagnosis", "age", "sex", "site"]
TEMPORAL_CENTRES_MM = ((-28.0, -22.0, -14.0), (28.0, -22.0, -14.0))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """12 subjects, 3 sites, a strong disease effect."""
    return write_demo_cohort(
        tmp_path_factory.mktemp("demo") / "cohort", n_subjects=N_SUBJECTS, seed=0, effect_size=2.0
    )


@pytest.fixture(scope="module")
def no_effect_cohort(tmp_path_factory) -> Path:
    """The same subjects as ``cohort``, without the disease effect."""
    return write_demo_cohort(
        tmp_path_factory.mktemp("demo") / "cohort", n_subjects=N_SUBJECTS, seed=0, effect_size=0.0
    )


def _participants(root: Path) -> list[dict[str, str]]:
    with open(root / "participants.tsv", newline="") as file:
        return list(csv.DictReader(file, delimiter="\t"))


def _image_path(root: Path, participant_id: str) -> Path:
    (path,) = (root / participant_id).rglob("*_T1w.nii*")
    return path


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {
        row["participant_id"]: np.asanyarray(
            nib.load(_image_path(root, row["participant_id"])).dataobj
        )
        for row in _participants(root)
    }


def _images(root: Path) -> list[nib.Nifti1Image]:
    return [nib.load(_image_path(root, row["participant_id"])) for row in _participants(root)]


def _world_coordinates(image: nib.Nifti1Image) -> np.ndarray:
    index = np.indices(image.shape).reshape(3, -1).T
    return nib.affines.apply_affine(image.affine, index).reshape(*image.shape, 3)


def _atrophy_statistic(image: nib.Nifti1Image) -> float:
    """Mean intensity over the temporal spheres plus over a box around the ventricles.

    Both regions are fixed in world coordinates, so the statistic also relies on the affine
    being right; each is scaled by the 95th percentile of the image to remove the site scale.
    """
    data = np.asanyarray(image.dataobj).astype(np.float64)
    xyz = _world_coordinates(image)
    temporal = np.zeros(image.shape, dtype=bool)
    for centre in TEMPORAL_CENTRES_MM:
        temporal |= np.sum((xyz - np.asarray(centre)) ** 2, axis=-1) < 12.0**2
    x, y, z = np.moveaxis(xyz, -1, 0)
    ventricles = (np.abs(x) < 20) & (y > -35) & (y < 10) & (z > 5) & (z < 30)
    reference = np.percentile(data, 95)
    return (data[temporal].mean() + data[ventricles].mean()) / reference


def _group_gap(root: Path) -> float:
    """Mean atrophy statistic of controls minus that of patients."""
    rows = _participants(root)
    statistic = np.array([_atrophy_statistic(image) for image in _images(root)])
    is_patient = np.array([row["diagnosis"] == "patient" for row in rows])
    return statistic[~is_patient].mean() - statistic[is_patient].mean()


def _tiny_cohort(root: Path, **kwargs) -> Path:
    return write_demo_cohort(root, n_subjects=2, n_sites=1, **kwargs)


class TestLayout:
    def test_participants_tsv_columns_and_values(self, cohort):
        text = (cohort / "participants.tsv").read_text()
        assert text.splitlines()[0].split("\t") == COLUMNS
        rows = _participants(cohort)
        assert [row["participant_id"] for row in rows] == [
            f"sub-{i:03d}" for i in range(1, N_SUBJECTS + 1)
        ]
        for row in rows:
            assert row["diagnosis"] in {"patient", "control"}
            assert re.fullmatch(r"\d{2}\.\d", row["age"])
            assert 55.0 <= float(row["age"]) <= 85.0
            assert row["sex"] in {"M", "F"}
            assert row["site"] in {"site-A", "site-B", "site-C"}
        assert {row["sex"] for row in rows} == {"M", "F"}

    def test_diagnosis_is_balanced_within_every_site(self, cohort):
        rows = _participants(cohort)
        for site in ("site-A", "site-B", "site-C"):
            labels = [row["diagnosis"] for row in rows if row["site"] == site]
            assert labels.count("patient") == labels.count("control") == 2

    def test_dataset_description_is_bids_raw(self, cohort):
        description = json.loads((cohort / "dataset_description.json").read_text())
        assert description["Name"]
        assert description["BIDSVersion"] == "1.8.0"
        assert description["DatasetType"] == "raw"

    def test_every_participant_has_exactly_one_t1w(self, cohort):
        ids = [row["participant_id"] for row in _participants(cohort)]
        assert sorted(p.name for p in cohort.glob("sub-*")) == ids
        for participant_id in ids:
            assert len(list((cohort / participant_id).rglob("*_T1w.nii*"))) == 1

    def test_every_tenth_subject_has_a_session(self, cohort):
        path = _image_path(cohort, "sub-010")
        assert path.relative_to(cohort) == Path("sub-010/ses-01/anat/sub-010_ses-01_T1w.nii.gz")
        assert _image_path(cohort, "sub-001").relative_to(cohort) == Path(
            "sub-001/anat/sub-001_T1w.nii.gz"
        )
        assert len(list(cohort.glob("sub-*/ses-*"))) == 1

    def test_leaves_no_staging_directory(self, cohort):
        assert [p.name for p in cohort.parent.iterdir()] == [cohort.name]


class TestImages:
    def test_both_orientations_are_stored(self, cohort):
        codes = {nib.aff2axcodes(image.affine) for image in _images(cohort)}
        assert codes == {("R", "A", "S"), ("L", "P", "S")}

    def test_one_site_has_anisotropic_voxels(self, cohort):
        spacings = {
            tuple(np.round(nib.affines.voxel_sizes(image.affine), 3)) for image in _images(cohort)
        }
        assert spacings == {(3.5, 3.5, 3.5), (3.0, 3.0, 4.5), (4.0, 4.0, 4.0)}

    def test_int16_and_float32_are_stored(self, cohort):
        dtypes = {array.dtype for array in _arrays(cohort).values()}
        assert dtypes == {np.dtype(np.int16), np.dtype(np.float32)}

    def test_nii_and_nii_gz_are_stored(self, cohort):
        names = [_image_path(cohort, row["participant_id"]).name for row in _participants(cohort)]
        plain = [name for name in names if name.endswith(".nii")]
        assert plain == ["sub-003_T1w.nii", "sub-008_T1w.nii"]

    def test_images_are_small_finite_and_not_constant(self, cohort):
        for array in _arrays(cohort).values():
            assert array.ndim == 3
            assert all(36 <= n <= 72 for n in array.shape)
            assert np.isfinite(array).all()
            assert array.min() >= 0
            assert array.std() > 0.1 * array.max()

    def test_qform_and_sform_match_the_affine(self, cohort):
        for image in _images(cohort):
            np.testing.assert_allclose(image.get_qform(), image.affine, atol=1e-4)
            np.testing.assert_allclose(image.get_sform(), image.affine, atol=1e-6)

    def test_affine_places_every_brain_on_the_template(self, cohort):
        # a y flip that the affine did not follow would correlate much worse with the template
        from nilearn.datasets import load_mni152_template

        template = load_mni152_template(resolution=2)
        to_template = np.linalg.inv(template.affine)

        def correlation(data: np.ndarray, affine: np.ndarray) -> float:
            index = np.indices(data.shape).reshape(3, -1)
            voxel = nib.affines.apply_affine(to_template @ affine, index.T).T
            expected = ndimage.map_coordinates(template.get_fdata(), voxel, order=1)
            return float(np.corrcoef(expected, data.ravel())[0, 1])

        for image in _images(cohort):
            data = np.asanyarray(image.dataobj).astype(np.float64)
            matched = correlation(data, image.affine)
            assert matched > 0.75
            assert matched > correlation(data[:, ::-1, :], image.affine) + 0.03


@pytest.mark.parametrize("fixture", ["cohort", "demo_cohort"])
def test_demo_cohort_validates_with_zero_problems(request, fixture):
    # every site's storage (int16 and float32, RAS and LPS, .nii and .nii.gz) passes, and no
    # two subjects' images hash alike
    root = request.getfixturevalue(fixture)
    report = validate_cohort(read_bids(root, target="diagnosis"), n_folds=5)
    assert report.problems == []
    assert len(report.images) == N_SUBJECTS
    assert len(set(report.content_hashes().values())) == N_SUBJECTS


class TestDeterminism:
    def test_same_seed_gives_same_arrays_and_table(self, cohort, tmp_path):
        again = write_demo_cohort(
            tmp_path / "again", n_subjects=N_SUBJECTS, seed=0, effect_size=2.0
        )
        assert (again / "participants.tsv").read_bytes() == (
            cohort / "participants.tsv"
        ).read_bytes()
        expected, actual = _arrays(cohort), _arrays(again)
        for participant_id, array in expected.items():
            assert actual[participant_id].dtype == array.dtype
            np.testing.assert_array_equal(actual[participant_id], array)
        for first, second in zip(_images(cohort), _images(again), strict=True):
            np.testing.assert_array_equal(first.affine, second.affine)

    def test_different_seed_gives_different_cohort(self, cohort, tmp_path):
        other = write_demo_cohort(
            tmp_path / "other", n_subjects=N_SUBJECTS, seed=1, effect_size=2.0
        )
        assert (other / "participants.tsv").read_text() != (cohort / "participants.tsv").read_text()
        expected, actual = _arrays(cohort), _arrays(other)
        for participant_id, array in expected.items():
            if actual[participant_id].shape == array.shape:
                assert not np.array_equal(actual[participant_id], array)


class TestEffects:
    def test_same_subjects_whatever_the_effect_size(self, cohort, no_effect_cohort):
        table = (cohort / "participants.tsv").read_text()
        assert (no_effect_cohort / "participants.tsv").read_text() == table

    def test_controls_do_not_depend_on_effect_size(self, cohort, no_effect_cohort):
        with_effect, without = _arrays(cohort), _arrays(no_effect_cohort)
        for row in _participants(cohort):
            participant_id = row["participant_id"]
            same = np.array_equal(with_effect[participant_id], without[participant_id])
            assert same == (row["diagnosis"] == "control"), participant_id

    def test_every_patient_is_darker_where_the_disease_acts(self, cohort, no_effect_cohort):
        for row in _participants(cohort):
            if row["diagnosis"] == "patient":
                participant_id = row["participant_id"]
                with_effect = nib.load(_image_path(cohort, participant_id))
                without = nib.load(_image_path(no_effect_cohort, participant_id))
                assert _atrophy_statistic(with_effect) < _atrophy_statistic(without) - 0.02

    def test_groups_differ_with_effect_and_hardly_without(self, cohort, no_effect_cohort):
        gap = _group_gap(cohort)
        assert gap > 0.15
        assert abs(_group_gap(no_effect_cohort)) < gap / 2

    def test_older_subjects_have_darker_ventricles(self, no_effect_cohort):
        ages = [float(row["age"]) for row in _participants(no_effect_cohort)]
        statistic = [_atrophy_statistic(image) for image in _images(no_effect_cohort)]
        assert np.corrcoef(ages, statistic)[0, 1] < -0.3


class TestArguments:
    def test_refuses_a_non_empty_root_without_overwrite(self, tmp_path):
        root = tmp_path / "taken"
        root.mkdir()
        (root / "notes.txt").write_text("keep me")
        with pytest.raises(FileExistsError, match=re.escape(str(root))):
            _tiny_cohort(root)
        assert (root / "notes.txt").read_text() == "keep me"

    def test_refuses_to_overwrite_a_directory_that_is_not_bids(self, tmp_path):
        root = tmp_path / "taken"
        root.mkdir()
        (root / "notes.txt").write_text("keep me")
        with pytest.raises(FileExistsError, match="dataset_description.json"):
            _tiny_cohort(root, overwrite=True)
        assert (root / "notes.txt").read_text() == "keep me"

    def test_refuses_a_root_that_is_a_file(self, tmp_path):
        root = tmp_path / "file"
        root.write_text("")
        with pytest.raises(FileExistsError, match="not a directory"):
            _tiny_cohort(root)

    def test_overwrite_replaces_a_previous_cohort(self, tmp_path):
        root = _tiny_cohort(tmp_path / "cohort", seed=0)
        (root / "stale.txt").write_text("")
        assert _tiny_cohort(root, seed=1, overwrite=True) == root
        assert not (root / "stale.txt").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]

    def test_writes_into_an_empty_directory(self, tmp_path):
        root = tmp_path / "empty"
        root.mkdir()
        _tiny_cohort(root)
        assert len(_participants(root)) == 2

    def test_interrupted_run_leaves_nothing_behind(self, tmp_path, monkeypatch):
        render = demo._render_subject
        calls = []

        def fail_on_second(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return render(*args, **kwargs)

        monkeypatch.setattr(demo, "_render_subject", fail_on_second)
        with pytest.raises(KeyboardInterrupt):
            _tiny_cohort(tmp_path / "cohort")
        assert list(tmp_path.iterdir()) == []

    def test_logs_a_one_line_summary(self, tmp_path, caplog):
        with caplog.at_level(logging.INFO, logger="enn_neuro.data.demo"):
            _tiny_cohort(tmp_path / "cohort")
        (record,) = caplog.records
        assert "2 subjects (1 patients, 1 controls), 1 sites" in record.getMessage()

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"n_subjects": 5}, r"n_subjects must be .* at least 2 \* n_sites = 6.*got 5"),
            ({"n_subjects": 2.0}, r"n_subjects must be an integer .*got 2\.0"),
            ({"effect_size": -0.5}, r"effect_size must be a finite number >= 0, got -0\.5"),
            ({"effect_size": math.nan}, r"effect_size must be .*got nan"),
            ({"n_sites": 0}, r"n_sites must be an integer in \[1, 26\], got 0"),
            ({"n_sites": 27}, r"n_sites must be .*got 27"),
            ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
            ({"voxel_size_mm": 1.0}, r"voxel_size_mm must be a number in \[2, 8\], got 1\.0"),
        ],
    )
    def test_rejects_bad_arguments(self, tmp_path, kwargs, message):
        with pytest.raises(ValueError, match=message):
            write_demo_cohort(tmp_path / "cohort", **kwargs)
        assert not (tmp_path / "cohort").exists()

    def test_reports_every_bad_argument_at_once(self, tmp_path):
        with pytest.raises(ValueError, match="n_subjects.*effect_size.*voxel_size_mm"):
            write_demo_cohort(tmp_path / "cohort", n_subjects=1, effect_size=-1, voxel_size_mm=0)
