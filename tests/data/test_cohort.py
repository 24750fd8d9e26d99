from __future__ import annotations

import pytest

from enn_neuro.data.cohort import CohortError, Task, load_cohort, read_bids
from enn_neuro.data.validation import validate_cohort
from tests.data.conftest import write_table, write_volume


class TestTable:
    def test_reads_rows_with_paths_relative_to_the_table(self, valid_table):
        cohort = load_cohort(valid_table, target="diagnosis")
        assert len(cohort.records) == 10 and cohort.subjects[0] == "sub-00"
        assert cohort.classes == ["control", "patient"]
        record = cohort.records[1]
        assert record.image == valid_table.parent / "images" / "sub-01.nii.gz"
        assert (record.target, record.site, record.sex, record.age) == ("patient", "A", "F", 61.0)
        assert record.source == "cohort.csv:3"
        samples = cohort.to_samples(["sub-01"])
        assert samples == [
            {
                "image": str(record.image),
                "label": 1,
                "subject_id": "sub-01",
                "session_id": "",
                "image_path": str(record.image),
            }
        ]

    def test_reads_tsv_and_regression_targets(self, tmp_path):
        write_volume(tmp_path / "a.nii")
        table = write_table(
            tmp_path / "c.tsv", [{"subject_id": "s1", "image": "a.nii", "age": "71.5"}], "\t"
        )
        cohort = load_cohort(table, target="age", task="regression")
        assert cohort.task is Task.REGRESSION and cohort.records[0].target == 71.5
        assert cohort.to_samples()[0]["label"] == 71.5

    def test_missing_column_names_the_column_and_file(self, valid_table):
        with pytest.raises(CohortError, match=r"cohort.csv.*missing column\(s\) \['dx'\]"):
            load_cohort(valid_table, target="dx")

    def test_unknown_extension_and_task(self, tmp_path):
        path = tmp_path / "cohort.xlsx"
        path.write_text("x")
        with pytest.raises(CohortError, match=r"table must be .csv or .tsv, got '.xlsx'"):
            load_cohort(path, target="dx")
        with pytest.raises(ValueError, match="task must be one of .*got 'survival'"):
            load_cohort(path, target="dx", task="survival")

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="cohort not found: .*nope.csv"):
            load_cohort(tmp_path / "nope.csv", target="dx")


class TestBids:
    def _dataset(self, root):
        write_volume(root / "sub-01" / "anat" / "sub-01_T1w.nii.gz", seed=1)
        write_volume(root / "sub-02" / "ses-01" / "anat" / "sub-02_ses-01_T1w.nii.gz", seed=2)
        write_volume(root / "sub-02" / "ses-02" / "anat" / "sub-02_ses-02_T1w.nii", seed=3)
        write_volume(root / "sub-09" / "anat" / "sub-09_T1w.nii.gz", seed=4)  # no row
        rows = [
            {"participant_id": "sub-01", "diagnosis": "control", "age": 70, "site": "X"},
            {"participant_id": "sub-02", "diagnosis": "patient", "age": 75, "site": "Y"},
            {"participant_id": "sub-03", "diagnosis": "patient", "age": 80, "site": "Y"},
            {"participant_id": "sub-01", "diagnosis": "patient", "age": 70, "site": "X"},
        ]
        write_table(root / "participants.tsv", rows, "\t")
        return root

    def test_reads_sessions_and_reports_orphans(self, tmp_path):
        cohort = read_bids(self._dataset(tmp_path), target="diagnosis")
        assert [(r.subject_id, r.session_id) for r in cohort.records] == [
            ("sub-01", None),
            ("sub-02", "ses-01"),
            ("sub-02", "ses-02"),
        ]
        assert cohort.records[1].age == 75.0 and cohort.records[1].site == "Y"
        messages = sorted(str(p) for p in cohort.read_problems)
        assert any("sub-01" in m and "duplicate participant_id 'sub-01'" in m for m in messages)
        assert any("sub-03" in m and "no T1w image found" in m for m in messages)
        assert any("sub-09" in m and "image has no row in participants.tsv" in m for m in messages)

    def test_t1w_runs_are_images_of_one_subject_and_backups_are_ignored(self, tmp_path):
        anat = tmp_path / "sub-01" / "anat"
        write_volume(anat / "sub-01_run-1_T1w.nii.gz", seed=1)
        write_volume(anat / "sub-01_run-2_T1w.nii.gz", seed=2)
        write_volume(tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii", seed=3)
        (tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.gz.orig").write_bytes(b"backup")
        (tmp_path / "sub-02" / "anat" / "sub-02_T1w.nii.bak").write_bytes(b"backup")
        rows = [
            {"participant_id": "sub-01", "diagnosis": "control"},
            {"participant_id": "sub-02", "diagnosis": "patient"},
        ]
        write_table(tmp_path / "participants.tsv", rows, "\t")

        cohort = read_bids(tmp_path, target="diagnosis")
        assert [r.image.name for r in cohort.records] == [
            "sub-01_run-1_T1w.nii.gz",
            "sub-01_run-2_T1w.nii.gz",
            "sub-02_T1w.nii",
        ]
        report = validate_cohort(cohort, n_folds=None)
        assert report.ok, report.summary()

    def test_one_image_stored_as_nii_and_nii_gz_is_reported(self, tmp_path):
        anat = tmp_path / "sub-01" / "anat"
        write_volume(anat / "sub-01_T1w.nii", seed=1)
        write_volume(anat / "sub-01_T1w.nii.gz", seed=1)
        write_table(tmp_path / "participants.tsv", [{"participant_id": "sub-01", "dx": "a"}], "\t")
        cohort = read_bids(tmp_path, target="dx")
        assert [str(p) for p in cohort.read_problems] == [
            f"sub-01 {anat / 'sub-01_T1w.nii'}: the same image stored twice: "
            "sub-01_T1w.nii, sub-01_T1w.nii.gz; keep one"
        ]

    def test_bad_age_of_a_subject_with_several_sessions_is_reported_once(self, tmp_path):
        for seed, session in enumerate(("ses-01", "ses-02", "ses-03")):
            anat = tmp_path / "sub-01" / session / "anat"
            write_volume(anat / f"sub-01_{session}_T1w.nii.gz", seed=seed)
        rows = [{"participant_id": "sub-01", "dx": "a", "age": "sixty"}]
        write_table(tmp_path / "participants.tsv", rows, "\t")
        cohort = read_bids(tmp_path, target="dx")
        assert len(cohort.records) == 3 and all(r.age is None for r in cohort.records)
        assert [str(p) for p in cohort.read_problems] == [
            "sub-01: participants.tsv:2: 'age' must be a number, got 'sixty'"
        ]

    def test_missing_participants_tsv(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="has no participants.tsv"):
            read_bids(tmp_path, target="diagnosis")


def test_non_numeric_age_is_reported(tmp_path):
    write_volume(tmp_path / "a.nii")
    table = write_table(
        tmp_path / "c.csv", [{"subject_id": "s1", "image": "a.nii", "dx": "x", "age": "sixty"}]
    )
    cohort = load_cohort(table, target="dx")
    assert [str(p) for p in cohort.read_problems] == [
        "s1: c.csv:2: 'age' must be a number, got 'sixty'"
    ]
    assert cohort.records[0].age is None


def test_subject_table_averages_regression_targets_and_keeps_class_labels(tmp_path):
    write_volume(tmp_path / "a.nii")
    rows = [
        {"subject_id": "s1", "session_id": "ses-1", "image": "a.nii", "age": 60, "dx": "x"},
        {"subject_id": "s1", "session_id": "ses-2", "image": "a.nii", "age": 63, "dx": "x"},
        {"subject_id": "s2", "session_id": "ses-1", "image": "a.nii", "age": 70, "dx": "y"},
        {"subject_id": "s3", "session_id": "ses-1", "image": "a.nii", "age": "old", "dx": "y"},
        {"subject_id": "s3", "session_id": "ses-2", "image": "a.nii", "age": 75, "dx": "y"},
    ]
    table = write_table(tmp_path / "c.csv", rows)
    regression = load_cohort(table, target="age", task="regression").subject_table()
    # a value that is not a number is left for the pre-flight check to report
    assert regression["target"].tolist() == [61.5, 70.0, "old"]
    classification = load_cohort(table, target="dx").subject_table()
    assert classification["target"].tolist() == ["x", "y", "y"]
