"""The cached dataset: cache hits, invalidation, labels, augmentation after the cache."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from enn_neuro.data.dataset import CachedVolumeDataset, FileKey, make_dataset
from enn_neuro.data.transforms import (
    AugmentationConfig,
    PreprocessingConfig,
    preprocessing_transforms,
)

CONFIG = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), shape=(12, 12, 12))
NOISE_ONLY = AugmentationConfig(
    affine_p=0.0,
    elastic_p=0.0,
    bias_field_p=0.0,
    motion_p=0.0,
    ghosting_p=0.0,
    gamma_p=0.0,
    noise_p=1.0,
)


def write_head(path: Path, seed: int = 0, side: int = 16) -> Path:
    """A noisy box "head" on a zero background, 2 mm voxels."""
    data = np.zeros((side, side, side), dtype=np.float32)
    data[3:13, 2:14, 4:12] = np.random.default_rng(seed).normal(100.0, 10.0, (10, 12, 8))
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


@pytest.fixture
def samples(tmp_path) -> list[dict]:
    """Three subjects, one .nii.gz and two .nii, class labels."""
    names = ["sub-001.nii.gz", "sub-002.nii", "sub-003.nii"]
    return [
        {
            "image": str(write_head(tmp_path / name, seed=index)),
            "label": index % 2,
            "subject_id": name.split(".")[0],
            "session_id": "",
        }
        for index, name in enumerate(names)
    ]


@pytest.fixture
def load_counter(monkeypatch) -> list[str]:
    """Paths passed to ``nibabel.load`` (what MONAI's NibabelReader calls) during the test."""
    calls: list[str] = []
    original = nib.load

    def counting_load(filename, *args, **kwargs):
        calls.append(str(filename))
        return original(filename, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    return calls


def cache_files(cache_dir: Path) -> set[str]:
    return {path.name for path in cache_dir.glob("*.pt")}


def bump_mtime(path: str | Path) -> None:
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 2_000_000_000))


# --- items


@pytest.mark.parametrize("cache", ["disk", "memory"])
def test_items_follow_the_contract(tmp_path, samples, cache):
    cache_dir = tmp_path / "cache" if cache == "disk" else None
    dataset = make_dataset(samples, CONFIG, cache_dir=cache_dir)
    assert len(dataset) == 3
    for epoch in range(2):  # computed, then read back from the cache
        for index, sample in enumerate(samples):
            item = dataset[index]
            assert type(item["image"]) is torch.Tensor, epoch
            assert item["image"].shape == (1, 12, 12, 12)
            assert item["image"].dtype == torch.float32
            assert item["label"].dtype == torch.long and int(item["label"]) == index % 2
            assert item["subject_id"] == sample["subject_id"] and item["session_id"] == ""
            assert set(item) == {"image", "label", "subject_id", "session_id"}
    assert samples[0]["image"].endswith(".nii.gz")  # the caller's samples are not modified


def test_cached_item_equals_fresh_preprocessing(tmp_path, samples):
    dataset = make_dataset(samples, CONFIG, cache_dir=tmp_path / "cache")
    dataset[1]
    reread = make_dataset(samples, CONFIG, cache_dir=tmp_path / "cache")[1]["image"]
    fresh = preprocessing_transforms(CONFIG)({"image": samples[1]["image"]})["image"]
    torch.testing.assert_close(reread, fresh.as_tensor(), atol=0, rtol=0)


def test_float_labels_become_float32_for_the_whole_cohort(tmp_path, samples):
    ages = [61, 72.5, 80]  # one int among floats: still regression
    regression = [{**s, "label": age} for s, age in zip(samples, ages, strict=True)]
    dataset = make_dataset(regression, CONFIG)
    labels = [dataset[i]["label"] for i in range(3)]
    assert all(label.dtype == torch.float32 for label in labels)
    assert [float(label) for label in labels] == [61.0, 72.5, 80.0]


def test_samples_without_label_give_items_without_label(tmp_path, samples):
    unlabelled = [{k: v for k, v in s.items() if k != "label"} for s in samples]
    item = make_dataset(unlabelled, CONFIG)[0]
    assert "label" not in item


def test_dataloader_collates_a_batch(tmp_path, samples):
    dataset = make_dataset(samples, CONFIG, NOISE_ONLY, cache_dir=tmp_path / "cache")
    batch = next(iter(DataLoader(dataset, batch_size=2, num_workers=0)))
    assert batch["image"].shape == (2, 1, 12, 12, 12)  # (B, C, D, H, W)
    assert batch["label"].tolist() == [0, 1]
    assert batch["subject_id"] == ["sub-001", "sub-002"]


# --- the persistent cache


def test_second_pass_reads_from_disk_cache(tmp_path, samples, load_counter):
    cache_dir = tmp_path / "cache"
    first = make_dataset(samples, CONFIG, cache_dir=cache_dir)
    images = [first[i]["image"] for i in range(3)]
    assert len(load_counter) == 3
    assert len(cache_files(cache_dir)) == 3

    # the same epoch again, and a new dataset (a new run or fold) on the same directory
    second = make_dataset(samples, CONFIG, cache_dir=cache_dir)
    for dataset in (first, second):
        for index in range(3):
            torch.testing.assert_close(dataset[index]["image"], images[index], atol=0, rtol=0)
    assert len(load_counter) == 3  # no file was read again
    assert len(cache_files(cache_dir)) == 3


def test_in_memory_cache_reuses_items(tmp_path, samples, load_counter):
    dataset = make_dataset(samples, CONFIG)
    for _ in range(3):
        dataset[0]
    assert len(load_counter) == 1


def test_changed_config_writes_new_entries(tmp_path, samples, load_counter):
    cache_dir = tmp_path / "cache"
    make_dataset(samples, CONFIG, cache_dir=cache_dir)[0]
    before = cache_files(cache_dir)

    for changed in (
        dataclasses.replace(CONFIG, shape=(10, 10, 10)),
        dataclasses.replace(CONFIG, intensity="percentile"),
    ):
        item = make_dataset(samples, changed, cache_dir=cache_dir)[0]
        assert item["image"].shape == (1, *changed.shape)
    assert changed.intensity == "percentile" and float(item["image"].min()) == 0.0

    after = cache_files(cache_dir)
    assert before < after and len(after) == 3  # old entry kept, two new ones
    assert len(load_counter) == 3
    # same file part of the name, different config part
    assert len({name[:64] for name in after}) == 1
    assert {name[64:-3] for name in after} == {
        CONFIG.fingerprint(),
        dataclasses.replace(CONFIG, shape=(10, 10, 10)).fingerprint(),
        changed.fingerprint(),
    }


def test_rewritten_file_is_recomputed(tmp_path, samples, load_counter):
    cache_dir = tmp_path / "cache"
    dataset = make_dataset(samples, CONFIG, cache_dir=cache_dir)
    old = dataset[0]["image"]

    write_head(Path(samples[0]["image"]), seed=99)
    bump_mtime(samples[0]["image"])  # file systems with coarse timestamps
    new = dataset[0]["image"]

    assert len(load_counter) == 2
    assert not torch.equal(new, old)
    fresh = preprocessing_transforms(CONFIG)({"image": samples[0]["image"]})["image"]
    torch.testing.assert_close(new, fresh.as_tensor(), atol=0, rtol=0)
    assert len(cache_files(cache_dir)) == 2


def test_rewrite_keeping_size_and_mtime_is_detected(tmp_path, samples, load_counter):
    # as after `cp -p` or `rsync -a` of another version of the file
    path = samples[1]["image"]
    assert path.endswith(".nii")  # uncompressed: same size whatever the content
    cache_dir = tmp_path / "cache"
    old = make_dataset(samples, CONFIG, cache_dir=cache_dir)[1]["image"]

    status = os.stat(path)
    write_head(Path(path), seed=42)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert os.stat(path).st_size == status.st_size

    new = make_dataset(samples, CONFIG, cache_dir=cache_dir)[1]["image"]
    assert len(load_counter) == 2
    assert not torch.equal(new, old)


def test_file_key_depends_on_path_and_content_not_on_other_keys(tmp_path, samples):
    key = FileKey()
    first = key({"image": samples[0]["image"]})
    assert first == key({"image": samples[0]["image"], "label": 5, "subject_id": "x"})
    assert len(first) == 64 and first != key({"image": samples[1]["image"]})
    bump_mtime(samples[0]["image"])
    assert key({"image": samples[0]["image"]}) != first


def test_relabelled_cohort_never_gets_stale_labels(tmp_path, samples):
    cache_dir = tmp_path / "cache"
    make_dataset(samples, CONFIG, cache_dir=cache_dir)[0]
    relabelled = [{**s, "label": 7, "subject_id": "renamed"} for s in samples]
    item = make_dataset(relabelled, CONFIG, cache_dir=cache_dir)[0]
    assert int(item["label"]) == 7 and item["subject_id"] == "renamed"


# --- augmentation after the cache


def test_augmentation_is_applied_after_the_cache(tmp_path, samples, load_counter):
    cache_dir = tmp_path / "cache"
    plain = make_dataset(samples, CONFIG, cache_dir=cache_dir)[0]["image"]
    (cache_file,) = cache_dir.glob("*.pt")
    cached_bytes = cache_file.read_bytes()

    augmented = make_dataset(samples, CONFIG, NOISE_ONLY, cache_dir=cache_dir)
    first, second = augmented[0]["image"], augmented[0]["image"]

    assert not torch.equal(first, second)  # a new draw at every read
    assert not torch.equal(first, plain)
    assert first.shape == plain.shape and first.dtype == torch.float32
    assert len(load_counter) == 1  # both reads came from the cache
    assert cache_file.read_bytes() == cached_bytes  # which holds the unaugmented volume
    assert cache_files(cache_dir) == {cache_file.name}


def test_augmentation_after_in_memory_cache_leaves_cache_intact(tmp_path, samples):
    dataset = make_dataset(samples, CONFIG, NOISE_ONLY)
    first = dataset[0]["image"]
    dataset._augment = None  # read the cached volume itself
    cached = dataset[0]["image"]
    assert not torch.equal(first, cached)
    assert torch.equal(cached, make_dataset(samples, CONFIG)[0]["image"])


def test_disabled_augmentation_returns_cached_volume(tmp_path, samples):
    cache_dir = tmp_path / "cache"
    plain = make_dataset(samples, CONFIG, cache_dir=cache_dir)[2]["image"]
    off = make_dataset(samples, CONFIG, AugmentationConfig(enabled=False), cache_dir=cache_dir)
    assert torch.equal(off[2]["image"], plain)


# --- bad cohorts


def test_missing_files_are_all_reported(tmp_path, samples):
    broken = [{**s, "image": str(tmp_path / f"gone-{i}.nii.gz")} for i, s in enumerate(samples)]
    with pytest.raises(FileNotFoundError, match=r"image files not found \(2\)") as excinfo:
        CachedVolumeDataset(broken[:2] + samples[2:], CONFIG)
    assert "gone-0.nii.gz" in str(excinfo.value) and "gone-1.nii.gz" in str(excinfo.value)


def test_bad_labels_and_images_are_reported_together(tmp_path, samples):
    bad = [
        {**samples[0], "label": "patient"},
        {**samples[1], "image": 42},
        samples[2],
    ]
    with pytest.raises(TypeError) as excinfo:
        make_dataset(bad, CONFIG)
    message = str(excinfo.value)
    assert "sample 0 (sub-001): label must be an int or a float, got 'patient'" in message
    assert "sample 1 (sub-002): image must be a path, got 42" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"label": float("nan")}, r"label must be finite, got nan"),
        (None, r"either every sample or none must have a label, got 2 of 3"),
    ],
)
def test_bad_label_values_raise_value_error(samples, change, expected):
    first = {**samples[0], **change} if change else {"image": samples[0]["image"]}
    with pytest.raises(ValueError, match=expected):
        make_dataset([first, *samples[1:]], CONFIG)


def test_dataset_pickles_for_spawned_workers(tmp_path, samples):
    dataset = make_dataset(
        samples,
        dataclasses.replace(CONFIG, foreground_fraction=0.1),
        NOISE_ONLY,
        cache_dir=tmp_path / "cache",
    )
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[0]["image"].shape == (1, 12, 12, 12)
