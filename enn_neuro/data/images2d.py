"""2D image folders in the ImageNet layout, read as ``(3, H, W)`` tensors for the ENN engine.

A folder ``root/<class>/<image files>`` becomes a list of ``(path, class index)`` samples
(:func:`scan_image_folder`), checked up front for unreadable files (:func:`check_images`), and
read by :class:`ImageFolderDataset` through the standard ImageNet transforms
(:func:`train_transform`, :func:`eval_transform`). Items follow the sample-dict convention of
:class:`enn_neuro.data.dataset.CachedVolumeDataset`, with ``(C, H, W) = (3, H, W)`` images.

:func:`write_digits_folder` writes a small folder of real images (scikit-learn's handwritten
digits) for tests and benchmarks; :mod:`enn_neuro.data.fashion_mnist` writes Fashion-MNIST.

Note [resize]:
    The standard recipe (torchvision's ``RandomResizedCrop``/``Resize``) resizes with a
    bilinear filter widened by the scale factor when shrinking (PIL's and
    ``torch.nn.functional.interpolate(..., antialias=True)``'s anti-aliasing). MONAI's
    ``Resize(anti_aliasing=True)`` instead blurs with a Gaussian before plain bilinear
    interpolation: a different filter, and about 8x slower (9.8 ms against 1.2 ms for a
    300x300 crop to 224x224 on one CPU thread), which a data loader feeding ImageNet cannot
    afford. The resize is therefore done with ``interpolate`` directly. MONAI has no random
    resized crop at all (``RandSpatialCrop`` draws sizes, not an area fraction and an aspect
    ratio), so the crop box is drawn by hand as well (:func:`random_resized_crop_box`).

Note [randomness]:
    Every random draw comes from torch's global generator, so that ``torch.manual_seed``
    reproduces a run and the DataLoader, which seeds torch differently in each worker, gives
    each worker its own stream. MONAI's ``RandFlip`` draws from its own NumPy state, which is
    copied unchanged into every worker (identical flips in all workers) and ignores
    ``torch.manual_seed``; the decision is therefore drawn here and MONAI's ``Flip`` applies it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, Flip, NormalizeIntensity
from PIL import Image
from torch.utils.data import Dataset

from enn_neuro.data.cohort import Problem

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ON_ERROR_MODES",
    "EvalTransform",
    "ImageFolderDataset",
    "ImageLoadError",
    "TrainTransform",
    "check_images",
    "eval_transform",
    "find_images",
    "random_resized_crop_box",
    "scan_image_folder",
    "train_transform",
    "write_digits_folder",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)

ON_ERROR_MODES = ("raise", "skip")

# the central-crop share of the standard evaluation recipe: resize to 256, crop 224
_EVAL_CROP_FRACTION = 0.875
_CROP_TRIES = 10
_HIGH_DEPTH_MODES = ("F", "I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageLoadError(OSError):
    """An image file could not be read or decoded; ``path`` is the file, ``reason`` why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


# folders


def scan_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Lists the images of an ImageNet-style folder ``root/<class>/<files>``.

    Classes are the sorted names of the subfolders of ``root``; a class's images are the files
    directly inside its folder whose extension is one of :data:`IMAGE_EXTENSIONS` (in any
    case), sorted by name. Deeper subfolders are not searched. Hidden entries (names starting
    with ``.``, such as ``.ipynb_checkpoints`` or macOS ``._photo.jpg`` resource files) are
    ignored. A class folder without images keeps its index, so that the train and validation
    folders of one dataset agree on the indices; it is logged as a warning.

    Args:
        root: The folder.

    Returns:
        ``(samples, classes)``: ``(path, class index)`` pairs, ordered by class then name, and
        the class names in index order.

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a folder.
        ValueError: If ``root`` has no class folder, or no image in any of them.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a folder")

    # os.scandir tells files from folders without a stat per entry (1.3M files in ImageNet)
    with os.scandir(root) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not _hidden(e.name))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders (expected root/<class>/)")

    samples: list[tuple[Path, int]] = []
    empty = []
    for index, name in enumerate(classes):
        with os.scandir(root / name) as entries:
            files = sorted(
                Path(entry.path)
                for entry in entries
                if _is_image_name(entry.name) and entry.is_file()
            )
        if not files:
            empty.append(name)
        samples.extend((path, index) for path in files)
    if not samples:
        raise ValueError(
            f"image folder {root} has {len(classes)} class folders but no image files "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    if empty:
        logger.warning("%s: class folders without images: %s", root, ", ".join(empty))
    logger.info("%s: %d images in %d classes", root, len(samples), len(classes))
    return samples, classes


def find_images(root: str | Path) -> list[Path]:
    """Every image file below ``root``, at any depth, sorted; hidden files and folders skipped.

    Images are recognised as in :func:`scan_image_folder`, by their extension.

    Raises:
        FileNotFoundError: If ``root`` is not a folder or holds no image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    images = sorted(
        path
        for path in root.rglob("*")
        if _is_image_name(path.name)
        and not any(_hidden(part) for part in path.relative_to(root).parts)
        and path.is_file()
    )
    if not images:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    return images


def check_images(paths: Sequence[Path], workers: int | None = None) -> list[Problem]:
    """Finds every image that cannot be read, before any training. Read-only.

    Each file is opened and checked by PIL's ``verify()`` (structure, checksums), then opened
    again and fully decoded with ``load()``, which catches truncated data that ``verify()``
    lets through. Relies on PIL's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``.

    Args:
        paths: The image files.
        workers: Threads reading files; ``min(8, CPU count)`` when ``None``.

    Returns:
        One :class:`~enn_neuro.data.cohort.Problem` per unusable file (missing, empty, not
        an image, truncated or corrupt, or 16-bit or float pixels, which
        :class:`ImageFolderDataset` refuses), in the order of ``paths``, with ``path`` the file,
        ``field="image"`` and the reason in ``message``. Empty when every file reads.

    Raises:
        ValueError: If ``workers`` is not a positive integer.
    """
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")

    paths = [Path(path) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(_image_problem, paths))
    problems = [
        Problem(reason, subject_id=None, path=path, field="image")
        for path, reason in zip(paths, reasons, strict=True)
        if reason is not None
    ]
    logger.info("checked %d images: %d unreadable", len(paths), len(problems))
    return problems


# dataset


class ImageFolderDataset(Dataset):
    """Images with class labels, read with PIL as RGB and transformed to ``(3, H, W)`` tensors.

    Item ``i`` is ``{"image": float32 (3, H, W), "label": torch.long 0-d, "subject_id": str,
    "session_id": "", "image_path": str, "skipped": int}``, which the default DataLoader
    collate batches (``"skipped"`` to a ``(B,)`` tensor whose sum is the batch's count of
    unreadable files).
    ``subject_id`` is ``"<class>/<file stem>"``, or ``"<class>/<file name>"`` where two files
    of a class share a stem, or the path where even that repeats, so it is unique per image.

    Every image is converted to RGB (grayscale is repeated, a palette expanded, alpha dropped)
    before ``transform``; 16-bit and float images are refused, as PIL would clip them to 255.
    A file that fails to decode is handled by ``on_error``:

    - ``"raise"``: raise :class:`ImageLoadError` naming the file;
    - ``"skip"``: log a warning naming the file and return the next readable sample
      (``index + 1``, wrapping), so that one bad file never ends an epoch. The item's
      ``"skipped"`` is the number of files passed over to produce it (0 for an item read
      at its own index), so that the training loop, which sees the batches of every
      DataLoader worker, can count them; :attr:`skipped` counts them too, but per process
      (each worker keeps its own). Run :func:`check_images` first to find such files up
      front.

    The dataset pickles, for DataLoader workers, when ``transform`` does (those of
    :func:`train_transform` and :func:`eval_transform` do).

    Args:
        samples: ``(path, class index)`` pairs, as from :func:`scan_image_folder`.
        classes: Class names in index order.
        transform: PIL RGB image to a float32 ``(3, H, W)`` tensor.
        on_error: ``"raise"`` or ``"skip"``.

    Raises:
        ValueError: If ``on_error`` is not one of :data:`ON_ERROR_MODES`, ``samples`` is
            empty, a class index is out of range, or a path is listed twice.
        TypeError: If a class index is not an integer.

    Example:
        >>> samples, classes = scan_image_folder("imagenet/train")
        >>> train = ImageFolderDataset(samples, classes, train_transform(224), on_error="skip")
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        on_error: str = "raise",
    ) -> None:
        if on_error not in ON_ERROR_MODES:
            raise ValueError(f"on_error must be one of {ON_ERROR_MODES}, got {on_error!r}")
        if not samples:
            raise ValueError("samples must not be empty")
        self.classes = list(classes)
        self.paths = [Path(path) for path, _ in samples]
        self.labels = [
            _check_label(label, index, self.classes) for index, (_, label) in enumerate(samples)
        ]
        self.subject_ids = _unique_ids(self.paths, [self.classes[i] for i in self.labels])
        self.transform = transform
        self.on_error = on_error
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self.paths) <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images")
        for attempt in range(len(self.paths)):
            current = (index + attempt) % len(self.paths)
            try:
                image = _load_rgb(self.paths[current])
            except ImageLoadError as err:
                if self.on_error == "raise":
                    raise
                self.skipped += 1
                logger.warning("skipping unreadable image %s: %s", err.path, err.reason)
                continue
            return self._item(current, image, skipped=attempt)
        raise ImageLoadError(self.paths[index], "no image of the dataset could be read")

    def _item(self, index: int, image: Image.Image, skipped: int) -> dict[str, Any]:
        tensor = self.transform(image)  # (3, H, W)
        return {
            "image": tensor,
            "label": torch.tensor(self.labels[index], dtype=torch.long),
            "subject_id": self.subject_ids[index],
            "session_id": "",
            "image_path": str(self.paths[index]),
            "skipped": skipped,
        }


# transforms


class TrainTransform:
    """Random resized crop, resize, random flip, normalise: see :func:`train_transform`."""

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        mean: Sequence[float],
        std: Sequence[float],
        hflip_p: float,
    ) -> None:
        self.image_size = _check_size("image_size", image_size)
        self.scale = _check_interval("scale", scale, upper=1.0)
        self.ratio = _check_interval("ratio", ratio)
        self.mean, self.std = _check_mean_std(mean, std)
        if not isinstance(hflip_p, (int, float)) or not 0.0 <= hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be a probability in [0, 1], got {hflip_p!r}")
        self.hflip_p = float(hflip_p)
        self._flip = Flip(spatial_axis=1)  # (3, H, W): spatial axis 1 is W
        self._normalize = NormalizeIntensity(self.mean, self.std, channel_wise=True)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = _pixels(image)  # (3, H, W) uint8

        # crop: a random area fraction and aspect ratio, see Note [resize]
        top, left, height, width = random_resized_crop_box(
            pixels.shape[1], pixels.shape[2], self.scale, self.ratio
        )
        crop = pixels[:, top : top + height, left : left + width]  # (3, h, w)
        resized = _resize(crop, (self.image_size, self.image_size))  # (3, S, S)

        # flip: drawn from torch even at p = 0 or 1, see Note [randomness]
        if torch.rand(()).item() < self.hflip_p:
            resized = self._flip(resized)
        return _plain(self._normalize(resized))  # (3, S, S)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale={self.scale}, "
            f"ratio={self.ratio}, mean={self.mean}, std={self.std}, hflip_p={self.hflip_p})"
        )


class EvalTransform:
    """Resize the shorter side, centre crop, normalise: see :func:`eval_transform`."""

    def __init__(
        self,
        image_size: int,
        resize_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.image_size = _check_size("image_size", image_size)
        self.resize_size = _check_size("resize_size", resize_size)
        if self.resize_size < self.image_size:
            raise ValueError(
                f"resize_size must be at least image_size ({image_size}), got {resize_size!r}"
            )
        self.mean, self.std = _check_mean_std(mean, std)
        self._crop = CenterSpatialCrop((self.image_size, self.image_size))
        self._normalize = NormalizeIntensity(self.mean, self.std, channel_wise=True)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = _pixels(image)  # (3, H, W) uint8
        size = _shorter_side_to(pixels.shape[1], pixels.shape[2], self.resize_size)
        resized = _resize(pixels, size)  # (3, H', W'), min(H', W') = resize_size
        cropped = self._crop(resized)  # (3, S, S)
        return _plain(self._normalize(cropped))

    def __repr__(self) -> str:
        return (
            f"EvalTransform(image_size={self.image_size}, resize_size={self.resize_size}, "
            f"mean={self.mean}, std={self.std})"
        )


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip_p: float = 0.5,
) -> TrainTransform:
    """The standard ImageNet training transform, PIL image to a float32 ``(3, S, S)`` tensor.

    1. Random resized crop (Inception style, :func:`random_resized_crop_box`): a box of a
       random share ``scale`` of the image's area and a log-uniform aspect ratio in ``ratio``.
    2. Resize the box to ``image_size`` x ``image_size``, bilinear with anti-aliasing.
    3. Flip left-right with probability ``hflip_p``.
    4. Scale to [0, 1] and normalise each channel: ``(x - mean) / std``.

    Random draws come from torch's global generator (see ``Note [randomness]``). For small
    images (28-64 px) a larger lower bound of ``scale``, e.g. ``(0.35, 1.0)``, is common.

    Args:
        image_size: Output side ``S`` in pixels.
        scale: Bounds of the crop's share of the image area, ``0 < low <= high <= 1``.
        ratio: Bounds of the crop's aspect ratio (width / height), ``0 < low <= high``.
        mean: Per-channel mean (RGB) of the [0, 1] pixel values.
        std: Per-channel standard deviation (RGB), positive.
        hflip_p: Probability of a horizontal flip.

    Returns:
        A picklable callable; images of another mode than RGB are converted to RGB first.

    Raises:
        ValueError: If an argument is out of range, naming it and its value.
    """
    return TrainTransform(image_size, scale, ratio, mean, std, hflip_p)


def eval_transform(
    image_size: int,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> EvalTransform:
    """The standard ImageNet evaluation transform, PIL image to a float32 ``(3, S, S)`` tensor.

    1. Resize so that the shorter side is ``resize_size`` (bilinear with anti-aliasing; the
       longer side is ``int(resize_size * long / short)``, as in torchvision).
    2. Crop the central ``image_size`` x ``image_size`` square (MONAI ``CenterSpatialCrop``:
       the box starts at ``side // 2 - image_size // 2``).
    3. Scale to [0, 1] and normalise each channel: ``(x - mean) / std``.

    Args:
        image_size: Output side ``S`` in pixels.
        resize_size: Shorter side after resizing; ``round(image_size / 0.875)`` when ``None``
            (256 for 224, 37 for 32). At least ``image_size``.
        mean: Per-channel mean (RGB) of the [0, 1] pixel values.
        std: Per-channel standard deviation (RGB), positive.

    Returns:
        A picklable, deterministic callable; images of another mode than RGB are converted.

    Raises:
        ValueError: If an argument is out of range, naming it and its value.
    """
    if resize_size is None:
        _check_size("image_size", image_size)
        resize_size = round(image_size / _EVAL_CROP_FRACTION)
    return EvalTransform(image_size, resize_size, mean, std)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Draws the crop box of an Inception-style random resized crop from torch's generator.

    Up to 10 times, draw an area share ``s ~ U(scale)`` and an aspect ratio ``r`` log-uniform
    in ``ratio``; the box is ``w = round(sqrt(s * A * r))``, ``h = round(sqrt(s * A / r))``,
    placed uniformly at random, and accepted if it fits the image. If none fits, fall back
    to the largest centred box whose aspect ratio is clamped into ``ratio``.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        scale: Bounds of the area share (validated by :func:`train_transform`).
        ratio: Bounds of the aspect ratio width / height.

    Returns:
        ``(top, left, box_height, box_width)``.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        share = torch.empty(()).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(()).uniform_(log_low, log_high).item())
        box_width = round(math.sqrt(share * area * aspect))
        box_height = round(math.sqrt(share * area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(torch.randint(0, height - box_height + 1, ()).item())
            left = int(torch.randint(0, width - box_width + 1, ()).item())
            return top, left, box_height, box_width

    # fallback: the whole image, trimmed to the nearest allowed aspect ratio
    aspect = width / height
    if aspect < ratio[0]:
        box_width, box_height = width, min(height, round(width / ratio[0]))
    elif aspect > ratio[1]:
        box_width, box_height = min(width, round(height * ratio[1])), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


# real images for tests and benchmarks


def write_digits_folder(
    root: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    upscale: int = 4,
    resample: str = "nearest",
) -> Path:
    """Writes scikit-learn's handwritten digits as an ImageNet-style folder of PNG files.

    The 1797 real 8x8 grayscale digits of ``sklearn.datasets.load_digits`` (shipped inside
    scikit-learn, no download) are split, stratified by digit, into ``root/train/<digit>/``
    and ``root/val/<digit>/``. Pixel values 0-16 become 0-255; images are enlarged by
    ``upscale`` (32x32 by default). Files are named by their index in ``load_digits``
    (``0042.png``). The same arguments always give the same files. The folder is written
    beside ``root`` and moved into place when complete, so an interrupted call leaves no
    half-written ``root``.

    Args:
        root: Output folder; must not exist or be empty.
        val_fraction: Share of each digit's images in ``val``, in (0, 1).
        seed: Seed of the split.
        upscale: Integer enlargement factor, 1 for the original 8x8.
        resample: ``"nearest"`` (blocks, the original values exactly) or ``"bilinear"``.

    Returns:
        ``root``.

    Raises:
        FileExistsError: If ``root`` exists and is not an empty folder.
        ValueError: If ``val_fraction``, ``upscale`` or ``resample`` is invalid, naming it.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    _check_writable_root(root)
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    upscale = _check_size("upscale", upscale)
    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
    if resample not in filters:
        raise ValueError(f"resample must be one of {tuple(filters)}, got {resample!r}")

    # data: (1797, 8, 8) in 0..16 -> uint8 0..255
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    labels = digits.target
    try:
        train_index, val_index = train_test_split(
            np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as err:
        raise ValueError(f"val_fraction {val_fraction!r} cannot split 10 digits: {err}") from err

    # write
    side = 8 * upscale
    names = [str(digit) for digit in range(10)]

    def image_of(index: int) -> Image.Image:
        image = Image.fromarray(pixels[index], mode="L")
        return image if upscale == 1 else image.resize((side, side), filters[resample])

    with _atomic_folder(root) as staging:
        for split, indices in (("train", train_index), ("val", val_index)):
            _write_pngs(staging / split, names, labels, sorted(indices), image_of, width=4)
    logger.info(
        "wrote %d train and %d val digit images (%dx%d) to %s",
        len(train_index),
        len(val_index),
        side,
        side,
        root,
    )
    return root


# private helpers


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable image, or ``None`` if it is."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"cannot access file: {err}"
    if size == 0:
        return "empty file (0 bytes)"

    # verify() checks the structure without decoding; load() decodes and finds truncation
    try:
        with Image.open(path) as image:
            image.verify()
    except Image.UnidentifiedImageError:
        return "not an image PIL can identify"
    except Exception as err:  # noqa: BLE001 -- decoders raise many types, see _load_rgb
        return f"corrupt image ({type(err).__name__}: {err})"
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
    except Exception as err:  # noqa: BLE001
        return f"truncated or corrupt image data ({type(err).__name__}: {err})"
    if mode in _HIGH_DEPTH_MODES:
        return f"{mode} pixels (16-bit or float) are not supported; convert to 8-bit"
    return None


def _load_rgb(path: Path) -> Image.Image:
    """The image at ``path`` decoded as RGB; :class:`ImageLoadError` if it cannot be."""
    try:
        with Image.open(path) as image:
            return _as_rgb(image)
    # PIL's decoders raise OSError, SyntaxError, EOFError, ValueError, struct.error,
    # DecompressionBombError..., each meaning that this file cannot be decoded
    except Exception as err:  # noqa: BLE001
        raise ImageLoadError(path, f"{type(err).__name__}: {err}") from err


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        # PIL's convert("RGB") clips these to 255 instead of rescaling: refuse, do not guess
        raise ValueError(
            f"{image.mode} pixels (16-bit or float) are not supported; convert to 8-bit"
        )
    if image.mode == "RGB":
        image.load()
        return image
    # a palette with a transparent entry goes through RGBA, else PIL warns on every image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _pixels(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` uint8 tensor of an image (converted to RGB if needed)."""
    array = np.array(_as_rgb(image), dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(3, h, w)`` to float32 ``(3, *size)`` in [0, 1]; see Note [resize]."""
    image = pixels.to(torch.float32).div_(255.0)  # (3, h, w)
    if tuple(image.shape[1:]) == tuple(size):
        return image.contiguous()
    resized = F.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    )  # (1, 3, *size)
    return resized.squeeze(0).clamp_(0.0, 1.0)  # (3, *size)


def _shorter_side_to(height: int, width: int, side: int) -> tuple[int, int]:
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain contiguous float32 tensor (MONAI returns MetaTensors, which collate apart)."""
    if isinstance(tensor, MetaTensor):
        tensor = tensor.as_tensor()
    return tensor.to(torch.float32).contiguous()


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_interval(name: str, value: Any, upper: float | None = None) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (0.0 < low <= high) or not math.isfinite(high) or (upper is not None and high > upper):
        bound = f" <= {upper}" if upper is not None else ""
        raise ValueError(f"{name} must satisfy 0 < low <= high{bound}, got {value!r}")
    return low, high


def _check_mean_std(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    checked = []
    for name, values in (("mean", mean), ("std", std)):
        try:
            numbers = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be 3 numbers (RGB), got {values!r}") from None
        if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
            raise ValueError(f"{name} must be 3 finite numbers (RGB), got {values!r}")
        checked.append(numbers)
    if not all(v > 0 for v in checked[1]):
        raise ValueError(f"std must be positive, got {std!r}")
    return checked[0], checked[1]


def _check_label(label: Any, index: int, classes: Sequence[str]) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"sample {index}: class index must be an integer, got {label!r}")
    if not 0 <= label < len(classes):
        raise ValueError(
            f"sample {index}: class index must be in [0, {len(classes)}), got {label!r}"
        )
    return int(label)


def _unique_ids(paths: Sequence[Path], class_names: Sequence[str]) -> list[str]:
    """``<class>/<stem>``; ``<class>/<name>`` where stems repeat; the path where names do."""
    ids = [f"{name}/{path.stem}" for path, name in zip(paths, class_names, strict=True)]
    for make in (lambda p, c: f"{c}/{p.name}", lambda p, c: str(p)):
        counts = Counter(ids)
        if len(counts) == len(ids):
            return ids
        ids = [
            make(path, name) if counts[current] > 1 else current
            for path, name, current in zip(paths, class_names, ids, strict=True)
        ]
    if len(set(ids)) == len(ids):  # same names in several folders under one label (predict)
        return ids
    repeated = sorted(str(p) for p, n in Counter(paths).items() if n > 1)
    raise ValueError(f"samples list these paths more than once: {', '.join(repeated[:10])}")


def _check_writable_root(root: Path) -> None:
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"output folder {root} exists and is not empty")


@contextlib.contextmanager
def _atomic_folder(root: Path) -> Iterator[Path]:
    """Yields a staging folder beside ``root``, moved to ``root`` only if the block succeeds."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _check_writable_root(root)
    if root.exists():
        root.rmdir()
    staging.rename(root)


def _write_pngs(
    folder: Path,
    class_names: Sequence[str],
    labels: np.ndarray,
    indices: Iterable[int],
    image_of: Callable[[int], Image.Image],
    width: int,
) -> None:
    """Writes ``folder/<class name>/<index>.png`` for each index, in a few threads."""
    for name in class_names:
        (folder / name).mkdir(parents=True)

    def write(index: int) -> None:
        image_of(index).save(folder / class_names[labels[index]] / f"{index:0{width}d}.png")

    # PNG encoding is zlib, which releases the GIL
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(write, indices))
