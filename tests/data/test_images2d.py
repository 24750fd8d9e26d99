"""2D image folders: scanning, checks, the dataset contract, transforms, real-image writers."""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from enn_neuro.data import fashion_mnist, images2d
from enn_neuro.data.fashion_mnist import (
    CLASS_NAMES,
    fashion_mnist_available,
    read_idx,
    write_fashion_mnist_folder,
)
from enn_neuro.data.images2d import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    ImageLoadError,
    check_images,
    eval_transform,
    find_images,
    random_resized_crop_box,
    scan_image_folder,
    train_transform,
    write_digits_folder,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (12, 10), seed: int = 0):
    """A random image of PIL ``mode`` and ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "RGB":
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    elif mode == "RGBA":
        image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        if mode == "P":
            image = image.convert("P")
            image.info["transparency"] = bytes([0, 128, 255])  # PIL warns on convert("RGB")
    image.save(path)
    return path


def pil(array: np.ndarray) -> Image.Image:
    """RGB image of an ``(H, W, 3)`` array of 0-255 values."""
    return Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB")


def unnormalize(tensor: torch.Tensor) -> torch.Tensor:
    """Back to 0-255 pixel values."""
    return (tensor * STD + MEAN) * 255.0


# scanning


def test_scan_image_folder_sorts_classes_and_files_and_ignores_others(tmp_path):
    write_image(tmp_path / "b" / "2.png")
    write_image(tmp_path / "b" / "1.JPG")
    write_image(tmp_path / "b" / ".hidden.png")
    write_image(tmp_path / "b" / "nested" / "3.png")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "a" / "x.jpeg")
    write_image(tmp_path / ".ipynb_checkpoints" / "y.png")
    (tmp_path / "readme.png").write_text("a file at the top is not a class")

    samples, classes = scan_image_folder(tmp_path)

    assert classes == ["a", "b"]
    assert samples == [
        (tmp_path / "a" / "x.jpeg", 0),
        (tmp_path / "b" / "1.JPG", 1),
        (tmp_path / "b" / "2.png", 1),
    ]


def test_scan_image_folder_keeps_index_of_empty_class_and_warns(tmp_path, caplog):
    write_image(tmp_path / "cat" / "1.png")
    (tmp_path / "bird").mkdir()
    with caplog.at_level(logging.WARNING):
        samples, classes = scan_image_folder(tmp_path)
    assert classes == ["bird", "cat"]
    assert samples == [(tmp_path / "cat" / "1.png", 1)]
    assert "bird" in caplog.text


def test_scan_image_folder_errors_name_the_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file.png"):
        scan_image_folder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no class subfolders"):
        scan_image_folder(tmp_path / "empty")
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no_images has 1 class folders but no image files"):
        scan_image_folder(tmp_path / "no_images")


# checks


def test_check_images_reports_each_bad_file_by_name(tmp_path):
    good = write_image(tmp_path / "good.png", size=(64, 64))
    jpeg = write_image(tmp_path / "photo.jpg", size=(64, 64))
    content = good.read_bytes()
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(content[: len(content) // 2])
    content = jpeg.read_bytes()
    truncated_jpeg = tmp_path / "truncated.jpg"  # passes verify(), fails load()
    truncated_jpeg.write_bytes(content[: len(content) // 2])
    text = tmp_path / "text.jpg"
    text.write_text("hello, not a JPEG")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"

    paths = [good, truncated_png, jpeg, truncated_jpeg, text, empty, missing]
    problems = check_images(paths, workers=2)

    assert [p.path for p in problems] == [truncated_png, truncated_jpeg, text, empty, missing]
    assert all(p.field == "image" and p.subject_id is None for p in problems)
    assert all(p.path.name in str(p) for p in problems)
    messages = {p.path.name: p.message for p in problems}
    assert "truncated" in messages["truncated.jpg"]
    assert "Truncated" in messages["truncated.png"] or "truncated" in messages["truncated.png"]
    assert "not an image" in messages["text.jpg"]
    assert "0 bytes" in messages["empty.png"]
    assert "not found" in messages["missing.png"]


def test_check_images_rejects_bad_workers(tmp_path):
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        check_images([], workers=0)


# dataset


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """One image per PIL mode, in two classes."""
    write_image(tmp_path / "cat" / "rgb.png", "RGB", (12, 10), seed=1)
    write_image(tmp_path / "cat" / "gray.png", "L", (9, 14), seed=2)
    write_image(tmp_path / "dog" / "palette.png", "P", (10, 10), seed=3)
    write_image(tmp_path / "dog" / "rgba.png", "RGBA", (16, 8), seed=4)
    write_image(tmp_path / "dog" / "photo.jpg", "RGB", (20, 11), seed=5)
    return tmp_path


def test_dataset_items_follow_the_engine_contract(mixed_folder, recwarn):
    samples, classes = scan_image_folder(mixed_folder)
    dataset = ImageFolderDataset(samples, classes, eval_transform(8))

    for index, (path, label) in enumerate(samples):
        item = dataset[index]
        assert set(item) == {"image", "label", "subject_id", "session_id", "image_path", "skipped"}
        assert item["skipped"] == 0
        assert type(item["image"]) is torch.Tensor
        assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
        assert item["label"].dtype == torch.long and item["label"].ndim == 0
        assert int(item["label"]) == label
        assert item["subject_id"] == f"{classes[label]}/{path.stem}"
        assert item["session_id"] == ""
        assert item["image_path"] == str(path)
    assert not [w for w in recwarn if "Palette" in str(w.message)]

    batch = next(iter(DataLoader(dataset, batch_size=5)))
    assert batch["image"].shape == (5, 3, 8, 8)
    assert batch["label"].tolist() == [0, 0, 1, 1, 1]
    assert len(set(batch["subject_id"])) == 5


def test_dataset_grayscale_is_repeated_into_three_channels(tmp_path):
    path = write_image(tmp_path / "a" / "gray.png", "L", (8, 8))
    dataset = ImageFolderDataset([(path, 0)], ["a"], eval_transform(8, 8))
    image = unnormalize(dataset[0]["image"])
    expected = torch.from_numpy(np.array(Image.open(path), dtype=np.float32))
    for channel in range(3):
        torch.testing.assert_close(image[channel], expected, atol=1e-3, rtol=0)


def test_dataset_subject_ids_stay_unique_when_stems_repeat(tmp_path):
    paths = [write_image(tmp_path / "a" / name) for name in ("x.png", "x.jpg", "y.png")]
    dataset = ImageFolderDataset([(p, 0) for p in paths], ["a"], eval_transform(4))
    assert dataset.subject_ids == ["a/x.png", "a/x.jpg", "a/y"]


def test_dataset_pickles(mixed_folder):
    samples, classes = scan_image_folder(mixed_folder)
    dataset = ImageFolderDataset(samples, classes, train_transform(8), on_error="skip")
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy[0]["image"].shape == (3, 8, 8)
    assert copy.on_error == "skip"


@pytest.fixture
def folder_with_bad_file(tmp_path) -> tuple[list, list[str], Path]:
    paths = [write_image(tmp_path / "a" / f"{i}.png", seed=i) for i in range(3)]
    bad = tmp_path / "a" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    return [(p, 0) for p in paths], ["a"], bad


def test_dataset_skip_returns_next_sample_and_counts(folder_with_bad_file, caplog):
    samples, classes, bad = folder_with_bad_file
    dataset = ImageFolderDataset(samples, classes, eval_transform(4), on_error="skip")
    with caplog.at_level(logging.WARNING):
        item = dataset[1]
    assert item["subject_id"] == "a/2"
    assert item["skipped"] == 1
    assert dataset.skipped == 1
    assert f"skipping unreadable image {bad}: " in caplog.text

    assert dataset[0]["subject_id"] == "a/0"
    assert dataset[0]["skipped"] == 0
    assert dataset.skipped == 1


def test_dataset_skip_counts_reach_the_batches_from_every_worker(folder_with_bad_file):
    samples, classes, bad = folder_with_bad_file
    dataset = ImageFolderDataset(samples, classes, eval_transform(4), on_error="skip")
    loader = DataLoader(dataset, batch_size=1, num_workers=2)

    batches = list(loader)
    assert sum(int(batch["skipped"].sum()) for batch in batches) == 1
    assert [batch["subject_id"] for batch in batches] == [["a/0"], ["a/2"], ["a/2"]]
    # the workers counted in their own copies: the batches are the only report
    assert dataset.skipped == 0


def test_dataset_skip_wraps_around_and_fails_if_nothing_reads(tmp_path):
    good = write_image(tmp_path / "a" / "0.png")
    bad = tmp_path / "a" / "1.png"
    bad.write_text("broken")
    dataset = ImageFolderDataset([(good, 0), (bad, 0)], ["a"], eval_transform(4), on_error="skip")
    assert dataset[1]["subject_id"] == "a/0"

    only_bad = ImageFolderDataset([(bad, 0)], ["a"], eval_transform(4), on_error="skip")
    with pytest.raises(ImageLoadError, match="no image of the dataset could be read"):
        only_bad[0]


def test_dataset_raise_names_the_file(folder_with_bad_file):
    samples, classes, bad = folder_with_bad_file
    dataset = ImageFolderDataset(samples, classes, eval_transform(4))
    with pytest.raises(ImageLoadError, match=f"cannot read image {bad}") as info:
        dataset[1]
    assert info.value.path == bad
    assert dataset[2]["subject_id"] == "a/2"


def test_dataset_rejects_bad_arguments(tmp_path):
    path = write_image(tmp_path / "a" / "0.png")
    transform = eval_transform(4)
    with pytest.raises(ValueError, match="on_error must be one of .* got 'ignore'"):
        ImageFolderDataset([(path, 0)], ["a"], transform, on_error="ignore")
    with pytest.raises(ValueError, match="samples must not be empty"):
        ImageFolderDataset([], ["a"], transform)
    with pytest.raises(ValueError, match=r"sample 0: class index must be in \[0, 1\), got 3"):
        ImageFolderDataset([(path, 3)], ["a"], transform)
    with pytest.raises(TypeError, match="sample 0: class index must be an integer, got 'a'"):
        ImageFolderDataset([(path, "a")], ["a"], transform)
    with pytest.raises(ValueError, match="more than once"):
        ImageFolderDataset([(path, 0), (path, 0)], ["a"], transform)


def test_same_file_names_under_one_label_get_their_paths_as_ids(tmp_path):
    # predict gives every image label 0: 0.png in two folders is then told apart by its path
    first = write_image(tmp_path / "x" / "0.png")
    second = write_image(tmp_path / "y" / "0.png")
    third = write_image(tmp_path / "y" / "1.png")
    samples = [(first, 0), (second, 0), (third, 0)]
    dataset = ImageFolderDataset(samples, ["a"], eval_transform(4))
    assert dataset.subject_ids == [str(first), str(second), "a/1"]


# transforms


def random_image(height: int = 30, width: int = 40, seed: int = 0) -> Image.Image:
    return pil(np.random.default_rng(seed).integers(0, 256, (height, width, 3)))


@pytest.mark.parametrize("size", [28, 32, 64])
def test_train_transform_shape_and_dtype(size):
    output = train_transform(size)(random_image())
    assert type(output) is torch.Tensor
    assert output.shape == (3, size, size) and output.dtype == torch.float32
    assert output.is_contiguous()


def test_train_transform_is_reproducible_under_manual_seed_and_varies_across_seeds():
    transform, image = train_transform(16), random_image()
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    again = transform(image)
    torch.manual_seed(1)
    other = transform(image)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_train_transform_hflip_at_p_one_flips_the_same_crop():
    image = random_image()
    torch.manual_seed(3)
    kept = train_transform(16, hflip_p=0.0)(image)
    torch.manual_seed(3)
    flipped = train_transform(16, hflip_p=1.0)(image)
    torch.testing.assert_close(flipped, kept.flip(2), rtol=0, atol=0)


def test_train_transform_full_scale_square_crop_keeps_the_whole_image():
    image = random_image(40, 40)
    whole = train_transform(20, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0)(image)
    torch.testing.assert_close(whole, eval_transform(20, resize_size=20)(image), rtol=0, atol=0)


def test_train_transform_normalises_with_mean_and_std():
    mean_pixels = np.broadcast_to(np.rint(np.array(IMAGENET_MEAN) * 255), (10, 10, 3))
    output = train_transform(8)(pil(mean_pixels))
    assert output.abs().max() < 0.01  # 1/255 rounding of the mean, over std

    white = train_transform(8)(pil(np.full((10, 10, 3), 255)))
    expected = (1.0 - MEAN) / STD
    torch.testing.assert_close(white, expected.expand(3, 8, 8), rtol=0, atol=1e-5)


def test_random_resized_crop_box_respects_scale_and_ratio():
    torch.manual_seed(0)
    height, width = 60, 80
    for _ in range(200):
        top, left, box_h, box_w = random_resized_crop_box(height, width, (0.25, 0.5), (0.5, 2.0))
        assert 0 <= top <= height - box_h and 0 <= left <= width - box_w
        share = box_h * box_w / (height * width)
        assert 0.25 * 0.9 <= share <= 0.5 * 1.1  # sides are rounded to whole pixels
        assert 0.5 * 0.9 <= box_w / box_h <= 2.0 * 1.1


def test_random_resized_crop_box_falls_back_to_a_centred_box():
    # a square of 90% of a 10x100 image never fits: centre crop at the largest allowed ratio
    assert random_resized_crop_box(10, 100, (0.9, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)
    assert random_resized_crop_box(100, 10, (0.9, 1.0), (1.0, 2.0)) == (45, 0, 10, 10)


def test_eval_transform_default_resize_and_determinism():
    assert eval_transform(224).resize_size == 256
    assert eval_transform(32).resize_size == 37
    transform, image = eval_transform(32), random_image(50, 70)
    output = transform(image)
    assert output.shape == (3, 32, 32) and output.dtype == torch.float32
    torch.testing.assert_close(transform(image), output, rtol=0, atol=0)


@pytest.mark.parametrize(("height", "width"), [(20, 40), (40, 20)])
def test_eval_transform_crops_the_centre_after_resizing_the_shorter_side(height, width):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3))
    output = eval_transform(16, resize_size=20)(pil(pixels))
    # shorter side already 20: no resampling; crop starts at side // 2 - 8
    top, left = height // 2 - 8, width // 2 - 8
    expected = torch.from_numpy(pixels[top : top + 16, left : left + 16]).permute(2, 0, 1)
    torch.testing.assert_close(unnormalize(output), expected.float(), rtol=0, atol=1e-3)


def test_eval_transform_resizes_the_shorter_side():
    # a ramp 3 * x over a 40x80 image, halved to 20x40, centre 16 columns from 12
    ramp = np.broadcast_to((3 * np.arange(80))[None, :, None], (40, 80, 3))
    output = unnormalize(eval_transform(16, resize_size=20)(pil(ramp)))
    expected = 3 * (2 * (12 + torch.arange(16.0)) + 0.5)  # centre of each pair of columns
    torch.testing.assert_close(output, expected.expand(3, 16, 16), rtol=0, atol=0.05)


def test_transforms_accept_grayscale_images():
    gray = Image.fromarray(np.full((12, 12), 7, dtype=np.uint8), "L")
    assert train_transform(8)(gray).shape == (3, 8, 8)
    assert eval_transform(8)(gray).shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 0}, "image_size must be a positive integer, got 0"),
        ({"image_size": 32.0}, "image_size must be a positive integer, got 32.0"),
        ({"scale": (0.0, 1.0)}, r"scale must satisfy 0 < low <= high <= 1.0, got \(0.0, 1.0\)"),
        ({"scale": (0.5, 0.2)}, "scale must satisfy"),
        ({"scale": (0.5, 1.5)}, "scale must satisfy"),
        ({"scale": 0.5}, "scale must be two numbers"),
        ({"ratio": (-1.0, 2.0)}, "ratio must satisfy"),
        ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"hflip_p": 1.5}, r"hflip_p must be a probability in \[0, 1\], got 1.5"),
    ],
)
def test_train_transform_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_transform(**{"image_size": 32, **kwargs})


def test_eval_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"resize_size must be at least image_size \(32\), got 30"):
        eval_transform(32, resize_size=30)
    with pytest.raises(ValueError, match="image_size must be a positive integer, got -1"):
        eval_transform(-1)


# scikit-learn digits


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("digits") / "digits")


def test_write_digits_folder_layout_and_stratified_split(digits_root):
    train, classes = scan_image_folder(digits_root / "train")
    val, val_classes = scan_image_folder(digits_root / "val")
    assert classes == val_classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797
    assert len(val) == pytest.approx(0.2 * 1797, abs=1)
    for label in range(10):
        n_train = sum(lab == label for _, lab in train)
        n_val = sum(lab == label for _, lab in val)
        assert n_val / (n_train + n_val) == pytest.approx(0.2, abs=0.02)
    assert not list(digits_root.parent.glob(".digits.*"))  # no staging folder left


def test_write_digits_folder_writes_readable_scaled_pngs(digits_root):
    from sklearn.datasets import load_digits

    assert check_images(sorted(digits_root.rglob("*.png"))[:50]) == []
    path = next((digits_root / "train" / "3").glob("*.png"))
    image = Image.open(path)
    assert image.size == (32, 32) and image.mode == "L"
    original = load_digits().images[int(path.stem)]
    expected = np.rint(original * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.array(image)[::4, ::4], expected)  # nearest upscale


def test_write_digits_folder_is_deterministic_and_seeded(digits_root, tmp_path):
    (tmp_path / "same").mkdir()  # an existing empty folder is accepted
    assert digests(write_digits_folder(tmp_path / "same")) == digests(digits_root)

    other = write_digits_folder(tmp_path / "other", seed=1, upscale=2, resample="bilinear")
    assert set(digests(other)) != set(digests(digits_root))
    assert Image.open(next(other.rglob("*.png"))).size == (16, 16)


def test_write_digits_folder_refuses_bad_arguments_and_non_empty_root(digits_root, tmp_path):
    with pytest.raises(FileExistsError, match="digits exists and is not empty"):
        write_digits_folder(digits_root)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        write_digits_folder(tmp_path / "a", val_fraction=1.0)
    with pytest.raises(ValueError, match="upscale must be a positive integer, got 0"):
        write_digits_folder(tmp_path / "a", upscale=0)
    with pytest.raises(ValueError, match="resample must be one of .* got 'cubic'"):
        write_digits_folder(tmp_path / "a", resample="cubic")
    assert not (tmp_path / "a").exists()


def test_write_digits_folder_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(images2d, "_write_pngs", fail)
    with pytest.raises(OSError, match="disk full"):
        write_digits_folder(tmp_path / "digits")
    assert list(tmp_path.iterdir()) == []


# Fashion-MNIST


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    content = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)
    return path


@pytest.fixture
def fake_fashion(tmp_path) -> Path:
    """IDX files like the official ones: 4 train and 2 test images per class, 28x28."""
    folder = tmp_path / "source"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, per_class, compress in (("train", 4, True), ("t10k", 2, False)):
        labels = np.tile(np.arange(10), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28))
        images[:, 0, 0] = labels  # so a test can tell the class from the pixels
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
    return folder


def test_read_idx_reads_gzip_and_raw_and_rejects_malformed(tmp_path):
    array = np.arange(24).reshape(2, 3, 4)
    for compress in (True, False):
        path = write_idx(tmp_path / f"x{compress}", array, compress)
        np.testing.assert_array_equal(read_idx(path), array)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad: not an IDX file"):
        read_idx(bad)
    short = write_idx(tmp_path / "short", array, compress=False)
    short.write_bytes(short.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"short: header says shape \(2, 3, 4\)"):
        read_idx(short)


def test_write_fashion_mnist_folder_subsamples_each_class(fake_fashion, tmp_path):
    root = write_fashion_mnist_folder(tmp_path / "fm", 3, None, seed=0, source_dir=fake_fashion)
    train, classes = scan_image_folder(root / "train")
    val, _ = scan_image_folder(root / "val")
    assert sorted(classes) == sorted(CLASS_NAMES)
    assert len(train) == 30 and len(val) == 20
    for path, label in train:
        official = CLASS_NAMES.index(classes[label])
        assert np.array(Image.open(path))[0, 0] == official

    again = write_fashion_mnist_folder(tmp_path / "again", 3, None, source_dir=fake_fashion)
    assert digests(again) == digests(root)


def test_write_fashion_mnist_folder_errors(fake_fashion, tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        write_fashion_mnist_folder(tmp_path / "fm", source_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="n_val_per_class must be at most 2"):
        write_fashion_mnist_folder(tmp_path / "fm", n_val_per_class=3, source_dir=fake_fashion)
    with pytest.raises(ValueError, match="n_train_per_class must be a positive integer"):
        write_fashion_mnist_folder(tmp_path / "fm", n_train_per_class=0, source_dir=fake_fashion)
    assert not (tmp_path / "fm").exists()


@pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST not installed (apt-get install {fashion_mnist.DEBIAN_PACKAGE})",
)
def test_write_fashion_mnist_folder_from_the_debian_package(tmp_path):
    root = write_fashion_mnist_folder(tmp_path / "fm", n_train_per_class=3, n_val_per_class=2)
    for split, per_class in (("train", 3), ("val", 2)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == sorted(CLASS_NAMES)
        for name in folders:
            assert len(list((root / split / name).glob("*.png"))) == per_class
    image = Image.open(next((root / "val" / "Bag").glob("*.png")))
    assert image.size == (28, 28) and image.mode == "L"


def test_sixteen_bit_images_are_reported_and_refused(tmp_path):
    path = tmp_path / "a" / "deep.png"
    path.parent.mkdir()
    Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)).save(path)
    (problem,) = check_images([path])
    assert "16-bit or float" in problem.message
    dataset = ImageFolderDataset([(path, 0)], ["a"], eval_transform(4))
    with pytest.raises(ImageLoadError, match=f"{path}: .*16-bit or float"):
        dataset[0]


def test_dataset_index_out_of_range_raises_index_error(tmp_path):
    path = write_image(tmp_path / "a" / "0.png")
    dataset = ImageFolderDataset([(path, 0)], ["a"], eval_transform(4))
    assert dataset[-1]["subject_id"] == "a/0"
    with pytest.raises(IndexError, match="index 1 out of range for 1 images"):
        dataset[1]


def test_find_images_lists_every_image_below_a_folder_but_hidden_ones(tmp_path):
    for name in ["b.png", "a/c.JPEG", "a/deep/d.bmp", ".cache/e.png", "a/.f.png"]:
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    found = [str(p.relative_to(tmp_path)) for p in find_images(tmp_path)]
    assert found == ["a/c.JPEG", "a/deep/d.bmp", "b.png"]
    with pytest.raises(FileNotFoundError, match="no image files .* in .*empty"):
        (tmp_path / "empty").mkdir()
        find_images(tmp_path / "empty")
