from __future__ import annotations

import gzip
import hashlib

import nibabel as nib
import numpy as np
import pytest

from enn_neuro.data.cohort import CohortError, load_cohort
from enn_neuro.data.validation import validate_cohort
from tests.data.conftest import patch_header, write_table, write_volume

# subject → what is wrong with it → the words the report must use
BROKEN = {
    "missing": "file not found",
    "garbage": "not a readable NIfTI file",
    "truncated": "truncated or corrupt gzip",
    "corrupt": "gzip",
    "mgh": "not a NIfTI file name",
    "flat2d": "must be a 3D volume (or 4D with one volume), got shape (8, 8)",
    "fourd": "got shape (8, 8, 8, 3) with 3 volumes",
    "nan": "2 non-finite voxel(s)",
    "constant": "all voxels are constant (7)",
    "zero_voxel": "voxel size (2.0, 2.0, 0.0) mm outside [0.05, 20.0] mm (from the header)",
    "huge_voxel": "voxel size (2.0, 2.0, 50.0) mm outside",
    "singular": "singular or non-finite affine",
    "nolabel": "missing 'diagnosis'",
    "badlabel": "unknown label 'pateint'",
    "twice": "duplicate subject id: 2 rows",
    "copy": "the same image content under 2 subject ids",
}


@pytest.fixture(scope="module")
def broken_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    rows = []

    def add(subject, image, diagnosis="patient"):
        rows.append({"subject_id": subject, "image": image, "diagnosis": diagnosis})

    # five good subjects per class
    for index in range(10):
        write_volume(root / f"good{index}.nii.gz", seed=index)
        add(f"good{index}", f"good{index}.nii.gz", ["control", "patient"][index % 2])

    add("missing", "missing.nii.gz")
    (root / "garbage.nii").write_bytes(b"this is not an image" * 30)
    add("garbage", "garbage.nii")
    payload = gzip.compress(write_volume(root / "tmp.nii", seed=50).read_bytes())
    (root / "truncated.nii.gz").write_bytes(payload[: len(payload) // 2])
    add("truncated", "truncated.nii.gz")
    corrupted = bytearray(payload)
    corrupted[len(corrupted) // 2 : len(corrupted) // 2 + 64] = b"\x00" * 64
    (root / "corrupt.nii.gz").write_bytes(bytes(corrupted))
    add("corrupt", "corrupt.nii.gz")
    nib.save(nib.MGHImage(np.ones((4, 4, 4), np.float32), np.eye(4)), root / "scan.mgz")
    add("mgh", "scan.mgz")
    write_volume(root / "flat2d.nii.gz", data=np.random.rand(8, 8).astype(np.float32))
    add("flat2d", "flat2d.nii.gz")
    write_volume(root / "fourd.nii.gz", data=np.random.rand(8, 8, 8, 3).astype(np.float32))
    add("fourd", "fourd.nii.gz")
    nan_data = np.random.rand(8, 8, 8).astype(np.float32)
    nan_data[0, 0, :2] = np.nan
    write_volume(root / "nan.nii.gz", data=nan_data)
    add("nan", "nan.nii.gz")
    write_volume(root / "constant.nii.gz", data=np.full((8, 8, 8), 7, np.int16))
    add("constant", "constant.nii.gz")
    write_volume(root / "zero_voxel.nii.gz", seed=51)
    patch_header(root / "zero_voxel.nii.gz", pixdim=[1, 2, 2, 0, 1, 1, 1, 1])
    add("zero_voxel", "zero_voxel.nii.gz")
    write_volume(root / "huge_voxel.nii.gz", affine=np.diag([2.0, 2.0, 50.0, 1.0]), seed=52)
    add("huge_voxel", "huge_voxel.nii.gz")
    write_volume(root / "singular.nii.gz", seed=53)
    patch_header(root / "singular.nii.gz", srow_z=[0, 0, 0, 0], sform_code=1, qform_code=0)
    add("singular", "singular.nii.gz")
    write_volume(root / "nolabel.nii.gz", seed=54)
    add("nolabel", "nolabel.nii.gz", diagnosis="")
    write_volume(root / "badlabel.nii.gz", seed=55)
    add("badlabel", "badlabel.nii.gz", diagnosis="pateint")
    write_volume(root / "twice_a.nii.gz", seed=56)
    write_volume(root / "twice_b.nii.gz", seed=57)
    add("twice", "twice_a.nii.gz")
    add("twice", "twice_b.nii.gz")
    write_volume(root / "copy.nii.gz", seed=3)  # the content of good3
    add("copy", "copy.nii.gz")

    table = write_table(root / "cohort.csv", rows)
    fingerprints = {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.iterdir()
    }
    cohort = load_cohort(table, target="diagnosis", classes=["control", "patient"])
    report = validate_cohort(cohort, n_folds=5)
    return report, root, fingerprints


@pytest.mark.parametrize("subject", list(BROKEN))
def test_each_problem_is_reported_with_subject_and_words(broken_report, subject):
    report, _, _ = broken_report
    messages = [str(p) for p in report.problems if p.subject_id == subject or subject in str(p)]
    assert any(BROKEN[subject] in m for m in messages), (subject, messages)


def test_file_problems_name_the_file(broken_report):
    report, root, _ = broken_report
    by_subject = {p.subject_id: p for p in report.problems if p.path is not None}
    assert by_subject["truncated"].path == root / "truncated.nii.gz"
    assert str(root / "missing.nii.gz") in str(by_subject["missing"])


def test_copy_names_both_subjects(broken_report):
    report, _, _ = broken_report
    (problem,) = [p for p in report.problems if "same image content" in p.message]
    assert "good3" in problem.message and "copy" in problem.message


def test_good_subjects_have_no_problems_and_summary_lists_all(broken_report):
    report, _, _ = broken_report
    assert not [p for p in report.problems if p.subject_id and p.subject_id.startswith("good")]
    assert not report.ok
    with pytest.raises(CohortError) as caught:
        report.raise_if_problems()
    assert len(caught.value.problems) == len(report.problems) >= len(BROKEN)
    assert "problems:" in report.summary()


def test_validation_never_modifies_input_files(broken_report):
    _, root, before = broken_report
    after = {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.iterdir()
    }
    assert after == before


@pytest.mark.parametrize("shape", [(8, 8, 8, 1), (8, 8, 8, 1, 1)])
def test_single_volume_with_trailing_dimensions_is_accepted(tmp_path, shape):
    write_volume(tmp_path / "one.nii.gz", data=np.random.rand(*shape).astype(np.float32))
    table = write_table(tmp_path / "c.csv", [{"subject_id": "s", "image": "one.nii.gz", "dx": "a"}])
    report = validate_cohort(load_cohort(table, target="dx"), n_folds=None)
    assert report.ok, report.summary()
    assert report.images[tmp_path / "one.nii.gz"].shape == (8, 8, 8)


def test_valid_cohort_passes(valid_table):
    report = validate_cohort(load_cohort(valid_table, target="diagnosis"), n_folds=5)
    assert report.ok, report.summary()
    assert len(report.images) == 10


def test_too_few_subjects_per_class_for_the_folds(valid_table):
    report = validate_cohort(load_cohort(valid_table, target="diagnosis"), n_folds=6)
    messages = [p.message for p in report.problems]
    assert "class 'control' has 5 subject(s), fewer than the 6 folds requested" in messages
    assert "class 'patient' has 5 subject(s), fewer than the 6 folds requested" in messages


def test_regression_target_must_be_numeric(tmp_path):
    write_volume(tmp_path / "a.nii.gz")
    table = write_table(
        tmp_path / "c.csv", [{"subject_id": "s1", "image": "a.nii.gz", "age": "old"}]
    )
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
    assert [p.message for p in report.problems] == ["'age' must be a number, got 'old' (c.csv:2)"]
