"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) written as an ImageNet-style PNG folder.

The data are read from the Debian package ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``), which installs the four official IDX files, gzip'd, in
:data:`DEBIAN_DIR`. Nothing is downloaded. The official training set (60,000 images) becomes
``root/train/<class name>/`` and the official test set (10,000) ``root/val/<class name>/``,
as 28x28 grayscale PNGs named by their index in the official file (``00042.png``).

Class folders carry the official names, so :func:`~enn_neuro.data.images2d.scan_image_folder`
sorts them alphabetically: its class indices are not the official label numbers (``Ankle_boot``
is 0 there, 9 officially), as with ImageNet's synset folders.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from enn_neuro.data.images2d import _atomic_folder, _check_writable_root, _write_pngs

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "DEBIAN_PACKAGE",
    "fashion_mnist_available",
    "read_idx",
    "write_fashion_mnist_folder",
]

logger = logging.getLogger(__name__)

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# official label order (label 0 is T-shirt/top); "/" cannot be in a folder name
CLASS_NAMES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (third byte of the magic number); values are big-endian
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_available(source_dir: str | Path | None = None) -> bool:
    """Whether the four Fashion-MNIST IDX files (gzip'd or not) are in ``source_dir``.

    Args:
        source_dir: Folder of the files; :data:`DEBIAN_DIR` when ``None``.
    """
    folder = DEBIAN_DIR if source_dir is None else Path(source_dir)
    return all(_find(folder, name) is not None for pair in _FILES.values() for name in pair)


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip'd (``.gz``) or not.

    Args:
        path: The file.

    Returns:
        The array, in native byte order, of the shape stored in the header.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the header is not IDX or the data are shorter or longer than it says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            content = file.read()
    except (OSError, EOFError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read ({err})") from err

    # header: 2 zero bytes, type code, number of dimensions; then one uint32 per dimension
    if len(content) < 4 or content[:2] != b"\0\0" or content[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {content[:4]!r})")
    ndim = content[3]
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise ValueError(f"{path}: IDX header truncated ({len(content)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(content, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[content[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(content) - header_size != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data), "
            f"file has {len(content) - header_size}"
        )
    array = np.frombuffer(content, dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_fashion_mnist_folder(
    root: str | Path,
    n_train_per_class: int | None = None,
    n_val_per_class: int | None = None,
    seed: int = 0,
    source_dir: str | Path | None = None,
) -> Path:
    """Writes Fashion-MNIST as PNG files in ``root/train/<class>/`` and ``root/val/<class>/``.

    Args:
        root: Output folder; must not exist or be empty.
        n_train_per_class: Images per class drawn (without replacement, by ``seed``) from the
            official training set (6,000 per class); all when ``None``.
        n_val_per_class: The same for the official test set (1,000 per class).
        seed: Seed of the subsampling; the same arguments always give the same files.
        source_dir: Folder of the IDX files; :data:`DEBIAN_DIR` when ``None``.

    Returns:
        ``root``.

    Raises:
        FileNotFoundError: If the IDX files are missing, naming the package that provides them.
        FileExistsError: If ``root`` exists and is not an empty folder.
        ValueError: If a per-class count is not a positive integer or exceeds what a class
            has, or an IDX file is malformed.
    """
    root = Path(root)
    folder = DEBIAN_DIR if source_dir is None else Path(source_dir)
    if not fashion_mnist_available(folder):
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder}; they are installed by the Debian "
            f"package {DEBIAN_PACKAGE} (apt-get install {DEBIAN_PACKAGE})"
        )
    _check_writable_root(root)
    counts = {"train": n_train_per_class, "val": n_val_per_class}
    for split, count in counts.items():
        name = f"n_{split}_per_class"
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError(f"{name} must be a positive integer or None, got {count!r}")
        if count is not None and count < 1:
            raise ValueError(f"{name} must be a positive integer or None, got {count!r}")

    # read and subsample every split before writing anything
    rng = np.random.default_rng(seed)
    splits = {}
    for split, (images_name, labels_name) in _FILES.items():
        images = read_idx(_find(folder, images_name))  # (N, 28, 28) uint8
        labels = read_idx(_find(folder, labels_name))  # (N,) uint8
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{folder}: {split} images of shape {images.shape} do not match labels of "
                f"shape {labels.shape}"
            )
        indices = _per_class(labels, counts[split], rng, f"n_{split}_per_class")
        splits[split] = images, labels, indices

    # write
    with _atomic_folder(root) as staging:
        for split, (images, labels, indices) in splits.items():
            _write_pngs(
                staging / split,
                CLASS_NAMES,
                labels,
                indices,
                lambda index, images=images: Image.fromarray(images[index], mode="L"),
                width=5,
            )
    logger.info(
        "wrote %d train and %d val Fashion-MNIST images to %s",
        len(splits["train"][2]),
        len(splits["val"][2]),
        root,
    )
    return root


# private helpers


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _per_class(
    labels: np.ndarray, count: int | None, rng: np.random.Generator, field: str
) -> list[int]:
    """Sorted indices: ``count`` drawn per class (all when ``None``)."""
    chosen = []
    for label in range(len(CLASS_NAMES)):
        members = np.flatnonzero(labels == label)
        if count is None:
            chosen.append(members)
            continue
        if count > len(members):
            raise ValueError(
                f"{field} must be at most {len(members)} (images of class "
                f"{CLASS_NAMES[label]}), got {count}"
            )
        chosen.append(rng.choice(members, size=count, replace=False))
    return sorted(int(index) for index in np.concatenate(chosen))
