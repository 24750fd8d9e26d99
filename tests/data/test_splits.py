from __future__ import annotations

import dataclasses
import random
import re

import pandas as pd
import pytest

from enn_neuro.data.cohort import Cohort, CohortError, ImageRecord, Task
from enn_neuro.data.splits import (
    LeakageError,
    check_leakage,
    make_splits,
    read_split_table,
    write_split_table,
)


def _cohort(n_subjects=40, task=Task.CLASSIFICATION, images_per_subject=2) -> Cohort:
    records = []
    for index in range(n_subjects):
        target = (
            float(50 + index)
            if task is Task.REGRESSION
            else ("patient" if index % 3 == 0 else "control")
        )
        for session in range(images_per_subject):
            records.append(
                ImageRecord(
                    subject_id=f"sub-{index:03d}",
                    image=f"/data/sub-{index:03d}_ses-{session}.nii.gz",
                    target=target,
                    session_id=f"ses-{session}",
                    site=["A", "B"][index % 2],
                    sex=["F", "M"][(index // 2) % 2],
                )
            )
    classes = [] if task is Task.REGRESSION else ["control", "patient"]
    return Cohort(records, task, "target", "/data/cohort.csv", classes=classes)


class TestMakeSplits:
    def test_each_subject_is_tested_once_and_plays_one_role_per_fold(self):
        cohort = _cohort()
        table = make_splits(cohort, n_folds=5, seed=0)
        assert set(table["role"]) == {"train", "val", "test"}
        assert table.groupby(["fold", "subject_id"]).size().max() == 1
        tested = table[table["role"] == "test"]["subject_id"]
        assert sorted(tested) == sorted(cohort.subjects)
        assert all(len(part) == 40 for _, part in table.groupby("fold"))

    def test_is_reproducible_for_a_seed_and_changes_with_it(self):
        cohort = _cohort()
        first, again = make_splits(cohort, seed=3), make_splits(cohort, seed=3)
        pd.testing.assert_frame_equal(first, again)
        assert not first.equals(make_splits(cohort, seed=4))

    @pytest.mark.parametrize("task", [Task.CLASSIFICATION, Task.REGRESSION])
    def test_depends_on_the_set_of_subjects_not_on_the_row_order(self, task):
        cohort = _cohort(task=task)
        reversed_rows = dataclasses.replace(cohort, records=cohort.records[::-1])
        shuffled = list(cohort.records)
        random.Random(7).shuffle(shuffled)
        shuffled_rows = dataclasses.replace(cohort, records=shuffled)
        table = make_splits(cohort, seed=5, stratify_by=["site"])
        for other in (reversed_rows, shuffled_rows):
            pd.testing.assert_frame_equal(make_splits(other, seed=5, stratify_by=["site"]), table)

    @pytest.mark.parametrize("seed", [0, 1])
    def test_images_of_the_roles_of_every_fold_are_disjoint(self, seed):
        cohort = _cohort(n_subjects=30, images_per_subject=3)
        table = make_splits(cohort, n_folds=3, seed=seed)
        every_image = {str(r.image) for r in cohort.records}
        for fold, part in table.groupby("fold"):
            images = {
                role: {s["image"] for s in cohort.to_samples(group["subject_id"].tolist())}
                for role, group in part.groupby("role")
            }
            assert sorted(images) == ["test", "train", "val"], fold
            assert not images["train"] & images["val"], fold
            assert not images["train"] & images["test"], fold
            assert not images["val"] & images["test"], fold
            assert images["train"] | images["val"] | images["test"] == every_image, fold

    def test_content_shared_by_two_subjects_is_caught_when_hashes_are_given(self):
        cohort = _cohort(n_subjects=20, images_per_subject=1)
        hashes = {r.image: f"hash-{r.subject_id}" for r in cohort.records}
        # the same scan under every subject: whatever the split, two roles share it
        shared = dict.fromkeys(hashes, "one-scan")
        make_splits(cohort, n_folds=2, content_hashes=hashes)
        with pytest.raises(LeakageError, match=r"fold 0: the same image content is"):
            make_splits(cohort, n_folds=2, content_hashes=shared)

    @pytest.mark.parametrize(
        ("counts", "n_folds", "messages"),
        [
            (
                {"a": 1, "b": 1},
                2,
                [
                    r"class 'a' has 1 subject\(s\), fewer than the 2 folds requested",
                    r"class 'b' has 1 subject\(s\), fewer than the 2 folds requested",
                    r"2 subjects in 2 folds leave 1 subject\(s\) outside a test fold; at least 2",
                ],
            ),
            (
                {"a": 10, "b": 2},
                3,
                [r"class 'b' has 2 subject\(s\), fewer than the 3 folds requested"],
            ),
            ({"a": 4, "b": 0}, 2, [r"class 'b' has 0 subject\(s\), fewer than the 2 folds"]),
        ],
        ids=["two_subjects", "small_class", "empty_class"],
    )
    def test_too_small_a_cohort_is_a_cohort_error_naming_class_and_count(
        self, counts, n_folds, messages
    ):
        labels = [label for label, count in counts.items() for _ in range(count)]
        records = [
            ImageRecord(f"s{i:02d}", f"/d/s{i:02d}.nii.gz", label) for i, label in enumerate(labels)
        ]
        cohort = Cohort(records, Task.CLASSIFICATION, "dx", "/d/c.csv", classes=list(counts))
        with pytest.raises(CohortError) as caught:
            make_splits(cohort, n_folds=n_folds)
        problems = [p.message for p in caught.value.problems]
        assert len(problems) == len(messages), problems
        for problem, message in zip(problems, messages, strict=True):
            assert re.match(message, problem), problem
        assert str(caught.value).startswith("cohort /d/c.csv has")

    def test_smallest_splittable_regression_cohort(self):
        records = [ImageRecord(f"s{i}", f"/d/{i}.nii.gz", 60.0 + i) for i in range(4)]
        cohort = Cohort(records, Task.REGRESSION, "age", "/d/c.csv")
        table = make_splits(cohort, n_folds=2, seed=0)
        for _, part in table.groupby("fold"):
            assert part["role"].value_counts().to_dict() == {"test": 2, "train": 1, "val": 1}
        with pytest.raises(CohortError, match=r"3 subjects in 2 folds leave 1 subject\(s\)"):
            make_splits(dataclasses.replace(cohort, records=records[:3]), n_folds=2)

    def test_strata_all_smaller_than_the_folds_fall_back_to_the_label(self, caplog):
        # every label × site stratum holds one subject
        records = [
            ImageRecord(f"s{i}", f"/d/{i}.nii.gz", "ab"[i % 2], site=f"site{i}") for i in range(4)
        ]
        cohort = Cohort(records, Task.CLASSIFICATION, "dx", "/d/c.csv", classes=["a", "b"])
        table = make_splits(cohort, n_folds=2, stratify_by=["site"], seed=0)
        labels = {r.subject_id: r.target for r in records}
        for _, part in table[table["role"] == "test"].groupby("fold"):
            assert sorted(labels[s] for s in part["subject_id"]) == ["a", "b"]
        assert "stratified by the label only" in caplog.text

    def test_test_folds_are_stratified_by_label(self):
        cohort = _cohort(n_subjects=40)  # 14 patients, 26 controls
        table = make_splits(cohort, n_folds=5, seed=1)
        labels = cohort.subject_table().set_index("subject_id")["target"]
        for _, part in table[table["role"] == "test"].groupby("fold"):
            patients = (labels[part["subject_id"]] == "patient").sum()
            assert patients in (2, 3), patients

    def test_validation_share_and_stratification_by_site(self):
        cohort = _cohort(n_subjects=40)
        table = make_splits(cohort, n_folds=4, val_fraction=0.25, stratify_by=["site"], seed=0)
        sites = cohort.subject_table().set_index("subject_id")["site"]
        for _, part in table.groupby("fold"):
            val = part[part["role"] == "val"]["subject_id"]
            assert len(val) == round(0.25 * 30)
            assert abs((sites[val] == "A").sum() - (sites[val] == "B").sum()) <= 1

    def test_regression_is_stratified_by_target_bins(self):
        cohort = _cohort(n_subjects=40, task=Task.REGRESSION)
        table = make_splits(cohort, n_folds=4, seed=0)
        targets = cohort.subject_table().set_index("subject_id")["target"]
        # quartile bins: each test fold holds about a quarter of each bin, so means stay close
        means = [
            targets[p["subject_id"]].mean()
            for _, p in table[table["role"] == "test"].groupby("fold")
        ]
        assert max(means) - min(means) < 5

    def test_regression_strata_use_each_subjects_mean_target(self):
        # the first scans all have one value; the subjects differ only in the later ones
        records = []
        for index in range(40):
            for session, target in enumerate((60.0, 40.0 + 2 * index)):
                records.append(
                    ImageRecord(
                        f"sub-{index:03d}", f"/d/{index}_{session}.nii.gz", target, f"ses-{session}"
                    )
                )
        cohort = Cohort(records, Task.REGRESSION, "age", "/d/cohort.csv")
        table = make_splits(cohort, n_folds=4, seed=0)
        means = cohort.subject_table().set_index("subject_id")["target"]
        quartile = pd.qcut(means, 4, labels=False)
        for _, part in table[table["role"] == "test"].groupby("fold"):
            counts = quartile[part["subject_id"]].value_counts()
            assert sorted(counts.index) == [0, 1, 2, 3] and set(counts) <= {2, 3}, counts

    def test_regression_with_one_target_value_still_splits(self):
        records = [ImageRecord(f"s{i:02d}", f"/d/{i}.nii.gz", 70.0) for i in range(10)]
        cohort = Cohort(records, Task.REGRESSION, "age", "/d/cohort.csv")
        table = make_splits(cohort, n_folds=2, seed=0)
        assert sorted(table[table["role"] == "test"]["subject_id"]) == cohort.subjects

    def test_stratifying_on_a_column_no_subject_has_is_an_error(self):
        cohort = _cohort()
        cohort.records[:] = [dataclasses.replace(r, site=None) for r in cohort.records]
        with pytest.raises(
            ValueError,
            match=r"stratify_by names \['site'\], but no subject of cohort .*cohort.csv has a",
        ):
            make_splits(cohort, stratify_by=["sex", "site"])

    def test_subjects_without_a_stratify_value_share_a_stratum(self):
        cohort = _cohort()
        cohort.records[:] = [
            dataclasses.replace(r, site=None) if r.subject_id < "sub-010" else r
            for r in cohort.records
        ]
        table = make_splits(cohort, stratify_by=["site"], seed=0)
        assert table.groupby(["fold", "subject_id"]).size().max() == 1

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"n_folds": 1}, r"n_folds must be an integer ≥ 2, got 1"),
            ({"val_fraction": 1.5}, r"val_fraction must lie in \(0, 1\), got 1.5"),
            ({"stratify_by": ["scanner"]}, r"stratify_by must name columns among .*\['scanner'\]"),
            ({"n_folds": 50}, r"40 subjects cannot fill 50 folds"),
        ],
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            make_splits(_cohort(), **kwargs)


class TestLeakage:
    def test_subject_in_two_roles_is_caught(self):
        table = pd.DataFrame(
            {"subject_id": ["a", "a", "b"], "fold": [0, 0, 0], "role": ["train", "test", "val"]}
        )
        with pytest.raises(
            LeakageError,
            match=r"fold 0: subjects in more than one role: \{'a': \['test', 'train'\]\}",
        ):
            check_leakage(table, _cohort(2))

    def test_same_content_in_two_roles_is_caught(self):
        cohort = _cohort(4, images_per_subject=1)
        table = make_splits(cohort, n_folds=2, val_fraction=0.5, seed=0)
        hashes = {r.image: f"hash-{i}" for i, r in enumerate(cohort.records)}
        fold0 = table[table["fold"] == 0].set_index("subject_id")["role"]
        test_subject = fold0[fold0 == "test"].index[0]
        train_subject = fold0[fold0 == "train"].index[0]
        image_of = {r.subject_id: r.image for r in cohort.records}
        hashes[image_of[test_subject]] = hashes[image_of[train_subject]]
        pair = f"({re.escape(test_subject)}|{re.escape(train_subject)})"
        with pytest.raises(
            LeakageError,
            match=rf"fold 0: the same image content is (test|train) \({pair}\) and "
            rf"(test|train) \({pair}, ",
        ) as caught:
            check_leakage(table, cohort, hashes)
        assert test_subject in str(caught.value) and train_subject in str(caught.value)


class TestSplitTableFiles:
    def test_round_trip(self, tmp_path):
        cohort = _cohort()
        table = make_splits(cohort, seed=0)
        path = write_split_table(table, tmp_path / "splits.tsv")
        pd.testing.assert_frame_equal(read_split_table(path, cohort), table)

    def test_user_table_is_checked_for_shared_content(self, tmp_path):
        cohort = _cohort(n_subjects=10, images_per_subject=1)
        table = make_splits(cohort, n_folds=2, seed=0)
        path = write_split_table(table, tmp_path / "splits.tsv")
        hashes = {r.image: f"hash-{r.subject_id}" for r in cohort.records}
        read_split_table(path, cohort, content_hashes=hashes)
        with pytest.raises(LeakageError, match=r"fold 0: the same image content is"):
            read_split_table(path, cohort, content_hashes=dict.fromkeys(hashes, "one-scan"))

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", r"split table .*splits.tsv is empty; expected columns \['subject_id'"),
            ("subject_id\tfold\trole\n", r"split table .*splits.tsv has a header but no rows"),
        ],
        ids=["empty", "header_only"],
    )
    def test_table_without_rows_is_an_error_naming_the_file(self, tmp_path, text, message):
        path = tmp_path / "splits.tsv"
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_split_table(path, _cohort())

    @pytest.mark.parametrize(
        ("rows", "message"),
        [
            (
                "subject_id,fold,role\nsub-000,0,holdout\n",
                r"'role' must be one of \['test', 'train', 'val'\], got \['holdout'\]",
            ),
            ("subject_id,fold,role\nsub-000,x,test\n", r"'fold' must be integers ≥ 0, got \['x'\]"),
            ("subject_id,fold,role\nghost,0,test\n", r"subjects not in the cohort: \['ghost'\]"),
            ("subject_id,fold\nsub-000,0\n", r"missing column\(s\) \['role'\]"),
            (
                "subject_id,fold,role\nsub-000,0,test\nsub-001,0,train\n",
                r"fold 0 has no \['val'\] subjects",
            ),
        ],
    )
    def test_bad_user_table_is_named(self, tmp_path, rows, message):
        path = tmp_path / "splits.csv"
        path.write_text(rows)
        with pytest.raises(ValueError, match=message):
            read_split_table(path, _cohort())


def test_validation_split_falls_back_to_the_label_when_joint_strata_are_too_small():
    # 12 subjects in 4 label × site strata of 3: too many strata for a validation part of 2
    records = [
        ImageRecord(f"s{i:02d}", f"/d/s{i:02d}.nii.gz", ["a", "b"][i % 2], site=f"site{i % 4}")
        for i in range(12)
    ]
    cohort = Cohort(records, Task.CLASSIFICATION, "dx", "/d/c.csv", classes=["a", "b"])
    labels = {r.subject_id: r.target for r in records}
    # unstratified, 2 of 3 + 3 subjects share a label 40% of the time: 20 folds would show it
    for seed in range(10):
        table = make_splits(cohort, n_folds=2, val_fraction=0.34, stratify_by=["site"], seed=seed)
        for _, part in table.groupby("fold"):
            val = part[part["role"] == "val"]["subject_id"]
            assert {labels[s] for s in val} == {"a", "b"}, seed
