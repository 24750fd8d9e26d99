from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from enn_neuro.data import validation
from enn_neuro.data.cohort import CohortError, load_cohort
from enn_neuro.data.validation import validate_cohort
from tests.data.conftest import patch_header, write_table, write_volume

# subject → its file(s) → the words the report must use, in a problem naming both
BROKEN = {
    "missing": (["missing.nii.gz"], "file not found"),
    "unreadable": (["unreadable.nii"], "cannot read the file: [Errno 5]"),
    "folder": (["folder.nii.gz"], "not a file"),
    "garbage": (["garbage.nii"], "not a readable NIfTI file"),
    "truncated": (
        ["truncated.nii.gz"],
        "corrupt gzip: Compressed file ended before the end-of-stream marker",
    ),
    "corrupt": (["corrupt.nii.gz"], "corrupt gzip: "),
    "mgh": (["scan.mgz"], "not a NIfTI file name"),
    "flat2d": (["flat2d.nii.gz"], "must be a 3D volume (or 4D with one volume), got shape (8, 8)"),
    "fourd": (["fourd.nii.gz"], "got shape (8, 8, 8, 3) with 3 volumes"),
    "rgb": (
        ["rgb.nii.gz"],
        "voxel data type must be integer or floating point, got RGB "
        "([('R', 'u1'), ('G', 'u1'), ('B', 'u1')])",
    ),
    "complex": (
        ["complex.nii.gz"],
        "voxel data type must be integer or floating point, got complex64 (complex64)",
    ),
    "nan": (["nan.nii.gz"], "2 non-finite voxel(s)"),
    "constant": (["constant.nii.gz"], "all voxels are constant (7)"),
    "zero_voxel": (
        ["zero_voxel.nii.gz"],
        "voxel size (2.0, 2.0, 0.0) mm outside [0.05, 20.0] mm (from the header)",
    ),
    "negative_voxel": (["negative_voxel.nii.gz"], "voxel size (2.0, -2.0, 2.0) mm outside"),
    "huge_voxel": (["huge_voxel.nii.gz"], "voxel size (2.0, 2.0, 50.0) mm outside"),
    "singular": (["singular.nii.gz"], "singular or non-finite affine"),
    "nolabel": (["nolabel.nii.gz"], "missing 'diagnosis'"),
    "badlabel": (["badlabel.nii.gz"], "unknown label 'pateint'"),
    "twice": (["twice_a.nii.gz", "twice_b.nii.gz"], "duplicate subject id: 2 rows, cohort.csv:"),
    "copy": (["copy.nii.gz"], "the same image content under 2 subject ids: also good3"),
}

# /proc/self/mem is a regular file whose first bytes cannot be read, even by root (for whom
# a permission of 000 changes nothing)
UNREADABLE = Path("/proc/self/mem")


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
    (root / "unreadable.nii").symlink_to(UNREADABLE)
    add("unreadable", "unreadable.nii")
    (root / "folder.nii.gz").mkdir()
    add("folder", "folder.nii.gz")
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
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = np.random.default_rng(0).integers(0, 255, (8, 8, 8))
    write_volume(root / "rgb.nii.gz", data=rgb)
    add("rgb", "rgb.nii.gz")
    complex_data = np.random.rand(8, 8, 8) + 1j * np.random.rand(8, 8, 8)
    write_volume(root / "complex.nii.gz", data=complex_data.astype(np.complex64))
    add("complex", "complex.nii.gz")
    nan_data = np.random.rand(8, 8, 8).astype(np.float32)
    nan_data[0, 0, :2] = np.nan
    write_volume(root / "nan.nii.gz", data=nan_data)
    add("nan", "nan.nii.gz")
    write_volume(root / "constant.nii.gz", data=np.full((8, 8, 8), 7, np.int16))
    add("constant", "constant.nii.gz")
    write_volume(root / "zero_voxel.nii.gz", seed=51)
    patch_header(root / "zero_voxel.nii.gz", pixdim=[1, 2, 2, 0, 1, 1, 1, 1])
    add("zero_voxel", "zero_voxel.nii.gz")
    write_volume(root / "negative_voxel.nii.gz", seed=58)
    patch_header(root / "negative_voxel.nii.gz", pixdim=[1, 2, -2, 2, 1, 1, 1, 1])
    add("negative_voxel", "negative_voxel.nii.gz")
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
    fingerprints = _fingerprints(root)
    cohort = load_cohort(table, target="diagnosis", classes=["control", "patient"])
    report = validate_cohort(cohort, n_folds=5)
    return report, root, fingerprints


def _fingerprints(root: Path) -> dict[Path, tuple[int, str]]:
    """Modification time and hash of every plain file (not the folder or the link)."""
    return {
        p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.iterdir()
        if p.is_file() and not p.is_symlink()
    }


@pytest.mark.parametrize("subject", list(BROKEN))
def test_each_problem_names_its_subject_file_and_words(broken_report, subject):
    report, root, _ = broken_report
    if subject == "unreadable" and not UNREADABLE.exists():
        pytest.skip(f"{UNREADABLE} does not exist on this system")
    names, words = BROKEN[subject]
    files = [root / name for name in names]
    mine = [p for p in report.problems if p.subject_id == subject]
    assert mine, subject
    assert all(p.path in files for p in mine), [str(p) for p in mine]
    for file in files:
        assert any(p.path == file and words in p.message for p in mine), (file, mine)


def test_copy_is_reported_for_both_subjects_naming_the_other(broken_report):
    report, root, _ = broken_report
    copies = [p for p in report.problems if "same image content" in p.message]
    assert [(p.subject_id, p.path, p.message) for p in copies] == [
        (
            "good3",
            root / "good3.nii.gz",
            f"the same image content under 2 subject ids: also copy ({root / 'copy.nii.gz'})",
        ),
        (
            "copy",
            root / "copy.nii.gz",
            f"the same image content under 2 subject ids: also good3 ({root / 'good3.nii.gz'})",
        ),
    ]


def test_good_subjects_have_no_problems_but_the_copy_and_summary_lists_all(broken_report):
    report, root, _ = broken_report
    good = [p for p in report.problems if p.subject_id and p.subject_id.startswith("good")]
    assert [(p.subject_id, p.path) for p in good] == [("good3", root / "good3.nii.gz")]
    assert "same image content" in good[0].message
    assert not report.ok
    with pytest.raises(CohortError) as caught:
        report.raise_if_problems()
    assert len(caught.value.problems) == len(report.problems) >= len(BROKEN)
    assert "problems:" in report.summary()


def test_validation_never_modifies_input_files(broken_report):
    _, root, before = broken_report
    assert _fingerprints(root) == before


def test_duplicate_rows_are_reported_per_row_naming_the_other(broken_report):
    report, root, _ = broken_report
    a, b = root / "twice_a.nii.gz", root / "twice_b.nii.gz"
    line = {r.image: r.source for r in report.cohort.records}  # cohort.csv:<line>
    assert [(p.path, p.message) for p in report.problems if p.subject_id == "twice"] == [
        (a, f"duplicate subject id: 2 rows, {line[a]} and {line[b]} ({b})"),
        (b, f"duplicate subject id: 2 rows, {line[b]} and {line[a]} ({a})"),
    ]


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0,
    reason="root reads a file whatever its permissions (see the /proc/self/mem case instead)",
)
def test_file_without_read_permission_is_reported(tmp_path):
    path = write_volume(tmp_path / "locked.nii.gz")
    path.chmod(0)
    table = write_table(tmp_path / "c.csv", [{"subject_id": "s1", "image": path.name, "age": 7}])
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
    (problem,) = report.problems
    assert (problem.subject_id, problem.path) == ("s1", path)
    assert problem.message.startswith("cannot read the file: [Errno 13] Permission denied")


def test_an_unexpected_error_is_a_problem_of_its_file_only(tmp_path, monkeypatch):
    write_volume(tmp_path / "a.nii.gz", seed=1)
    write_volume(tmp_path / "b.nii.gz", seed=2)
    rows = [
        {"subject_id": "s1", "image": "a.nii.gz", "age": 60},
        {"subject_id": "s2", "image": "b.nii.gz", "age": 70},
    ]
    table = write_table(tmp_path / "c.csv", rows)
    read = validation._read_decompressed

    def read_or_fail(path):
        if path.name == "b.nii.gz":
            raise RuntimeError("disk on fire")
        return read(path)

    monkeypatch.setattr(validation, "_read_decompressed", read_or_fail)
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
    assert [(p.subject_id, p.path, p.message) for p in report.problems] == [
        (
            "s2",
            tmp_path / "b.nii.gz",
            "unexpected error while checking the image: RuntimeError: disk on fire",
        )
    ]
    assert list(report.images) == [tmp_path / "a.nii.gz"]


@pytest.mark.parametrize("shape", [(8, 8, 8, 1), (8, 8, 8, 1, 1)])
def test_single_volume_with_trailing_dimensions_is_accepted(tmp_path, shape):
    write_volume(tmp_path / "one.nii.gz", data=np.random.rand(*shape).astype(np.float32))
    table = write_table(tmp_path / "c.csv", [{"subject_id": "s", "image": "one.nii.gz", "age": 70}])
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
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


@pytest.mark.parametrize(
    ("subjects", "n_folds", "messages"),
    [
        (
            2,
            2,
            ["2 subjects in 2 folds leave 1 subject(s) outside a test fold; at least 2 are needed"],
        ),
        (3, 4, ["3 subjects cannot fill 4 folds"]),
        (6, 3, []),
    ],
)
def test_too_few_subjects_to_train_and_validate_in_every_fold(
    tmp_path, subjects, n_folds, messages
):
    rows = []
    for index in range(subjects):
        write_volume(tmp_path / f"s{index}.nii.gz", seed=index)
        rows.append({"subject_id": f"s{index}", "image": f"s{index}.nii.gz", "age": 60 + index})
    table = write_table(tmp_path / "c.csv", rows)
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=n_folds)
    found = [p.message for p in report.problems]
    assert len(found) == len(messages)
    assert all(m.startswith(expected) for m, expected in zip(found, messages, strict=True)), found


def test_regression_target_must_be_numeric(tmp_path):
    write_volume(tmp_path / "a.nii.gz")
    table = write_table(
        tmp_path / "c.csv", [{"subject_id": "s1", "image": "a.nii.gz", "age": "old"}]
    )
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
    assert [p.message for p in report.problems] == ["'age' must be a number, got 'old' (c.csv:2)"]


# --- gzip integrity: nibabel alone reads only the bytes it needs


def _stored_gzip(tmp_path) -> bytes:
    """A volume gzipped with stored (uncompressed) blocks: a changed byte still inflates."""
    raw = write_volume(tmp_path / "plain.nii", seed=7).read_bytes()
    return gzip.compress(raw, compresslevel=0)


def _bad_crc(payload: bytes) -> bytes:
    corrupted = bytearray(payload)
    corrupted[-8] ^= 0xFF  # the trailer: CRC32, then the length
    return bytes(corrupted)


def _no_trailer(payload: bytes) -> bytes:
    return payload[:-4]


def _changed_byte(payload: bytes) -> bytes:
    corrupted = bytearray(payload)
    corrupted[len(corrupted) // 2] ^= 0x01  # a voxel byte
    return bytes(corrupted)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_bad_crc, "corrupt gzip: CRC check failed"),
        (_no_trailer, "corrupt gzip: Compressed file ended before the end-of-stream marker"),
        (_changed_byte, "corrupt gzip: CRC check failed"),
    ],
    ids=["bad_crc", "truncated_trailer", "changed_byte"],
)
def test_corrupt_gzip_is_reported_naming_the_file(tmp_path, corrupt, message):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(corrupt(_stored_gzip(tmp_path)))
    nib.load(path).get_fdata()  # nibabel alone does not notice
    table = write_table(tmp_path / "c.csv", [{"subject_id": "s1", "image": path.name, "age": 7}])
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
    (problem,) = report.problems
    assert problem.message.startswith(message), problem.message
    assert (problem.subject_id, problem.path) == ("s1", path)
    assert path not in report.images


def test_intact_stored_gzip_passes(tmp_path):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(_stored_gzip(tmp_path))
    table = write_table(tmp_path / "c.csv", [{"subject_id": "s1", "image": path.name, "age": 7}])
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
    assert report.ok, report.summary()


# --- the same content under two subject ids, whatever its storage


def _integer_scan() -> tuple[np.ndarray, np.ndarray]:
    data = np.round(np.random.default_rng(3).normal(100, 20, (8, 9, 10)))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -9.0
    return data, affine


def _as_int16(data, affine):
    return data.astype(np.int16), affine


def _as_lps(data, affine):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(data.shape[:2]) - 1  # voxel i' holds old voxel n - 1 - i'
    return data[::-1, ::-1].copy(), affine @ flip


def _as_permuted_float64(data, affine):
    swap = np.eye(4)[[1, 0, 2, 3]]  # voxel axes (j, i, k): the same world positions
    return data.transpose(1, 0, 2).astype(np.float64), affine @ swap


def _mirrored(data, affine):
    return data[::-1].copy(), affine  # the same affine: a left-right mirrored head


def _other_scan(data, affine):
    return data + 1, affine


@pytest.mark.parametrize(
    ("variant", "flagged"),
    [
        (_as_int16, True),
        (_as_lps, True),
        (_as_permuted_float64, True),
        (_mirrored, False),
        (_other_scan, False),
    ],
    ids=["int16", "lps", "permuted_float64", "mirrored", "other"],
)
def test_same_content_is_found_across_dtype_and_voxel_order(tmp_path, variant, flagged):
    data, affine = _integer_scan()
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(*variant(data, affine)), tmp_path / "b.nii.gz")
    rows = [
        {"subject_id": "s1", "image": "a.nii.gz", "age": 60},
        {"subject_id": "s2", "image": "b.nii.gz", "age": 70},
    ]
    table = write_table(tmp_path / "c.csv", rows)
    report = validate_cohort(load_cohort(table, target="age", task="regression"), n_folds=None)
    found = [(p.subject_id, p.path, p.message) for p in report.problems]
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert found == (
        [
            ("s1", a, f"the same image content under 2 subject ids: also s2 ({b})"),
            ("s2", b, f"the same image content under 2 subject ids: also s1 ({a})"),
        ]
        if flagged
        else []
    )


# --- targets per subject and per image


def _sessions_table(tmp_path, column: str, values: list) -> Path:
    rows = []
    for index, value in enumerate(values):
        subject, session = f"s{index // 2}", f"ses-{index % 2}"
        write_volume(tmp_path / f"{subject}_{session}.nii.gz", seed=index)
        rows.append(
            {
                "subject_id": subject,
                "session_id": session,
                "image": f"{subject}_{session}.nii.gz",
                column: value,
            }
        )
    return write_table(tmp_path / "c.csv", rows)


def test_regression_target_may_differ_between_a_subjects_scans(tmp_path):
    table = _sessions_table(tmp_path, "age", [60.5, 62.0, 71.0, 74.5])  # age at each scan
    cohort = load_cohort(table, target="age", task="regression")
    report = validate_cohort(cohort, n_folds=None)  # two subjects: too few for any folds
    assert report.ok, report.summary()
    assert cohort.subject_table()["target"].tolist() == [61.25, 72.75]


def test_class_label_must_not_differ_between_a_subjects_scans(tmp_path):
    table = _sessions_table(tmp_path, "dx", ["control", "patient", "control", "control"])
    report = validate_cohort(load_cohort(table, target="dx"), n_folds=None)
    assert [str(p) for p in report.problems] == [
        "s0: different labels for one subject: 'control', 'patient'"
    ]


# --- cohorts and images that cannot be trained on


def test_cohort_without_images_is_rejected(tmp_path):
    table = tmp_path / "c.csv"
    table.write_text("subject_id,image,dx\n")
    report = validate_cohort(load_cohort(table, target="dx"), n_folds=None)
    assert [str(p) for p in report.problems] == [f"{table}: the cohort has no images"]


@pytest.mark.parametrize("classes", [None, ["a"]], ids=["found", "given"])
def test_classification_needs_two_classes(tmp_path, classes):
    rows = []
    for index in range(3):
        write_volume(tmp_path / f"s{index}.nii.gz", seed=index)
        rows.append({"subject_id": f"s{index}", "image": f"s{index}.nii.gz", "dx": "a"})
    table = write_table(tmp_path / "c.csv", rows)
    report = validate_cohort(load_cohort(table, target="dx", classes=classes), n_folds=None)
    assert [p.message for p in report.problems] == [
        "a classification needs at least two classes in 'dx', got ['a']"
    ]


@pytest.mark.parametrize("shape", [(64, 64, 1), (3, 64, 64), (64, 64, 1, 1)])
def test_slice_is_not_a_volume(tmp_path, shape):
    write_volume(tmp_path / "slice.nii.gz", data=np.random.rand(*shape).astype(np.float32))
    table = write_table(tmp_path / "c.csv", [{"subject_id": "s", "image": "slice.nii.gz", "t": 1}])
    report = validate_cohort(load_cohort(table, target="t", task="regression"), n_folds=None)
    spatial = shape[:3]
    assert [str(p) for p in report.problems] == [
        f"s {tmp_path / 'slice.nii.gz'}: every axis must have at least 8 voxels, "
        f"got shape {spatial}: a slice or slab, not a volume"
    ]
