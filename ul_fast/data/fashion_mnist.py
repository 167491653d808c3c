"""Fashion-MNIST: the subset embedded in the package, and the full set from the Debian package's files.

Fashion-MNIST (Zalando Research, MIT licence; notice in ``embedded/LICENSE-fashion-mnist``) has 28x28
grayscale images of 10 garment classes. ul_fast's default size is 32x32: the 28x28 images are padded
by 2 pixels on each side with the background value -1 (black), which adds no interpolation blur.
Other sizes: ``image_size=28`` keeps the original pixels; any other size first pads to 32x32 and then
resizes with antialiased bilinear interpolation (:func:`~ul_fast.data.dataset.resize_images`), so the
garment keeps the same framing at every resolution.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import ImageArrayDataset, resize_images, uint8_to_float

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DEBIAN_FASHION_MNIST_ROOT",
    "EMBEDDED_FASHION_MNIST",
    "read_idx",
    "read_fashion_mnist_idx_uint8",
    "fashion_mnist_from_uint8",
    "load_embedded_fashion_mnist",
    "load_fashion_mnist_idx",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DEBIAN_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
EMBEDDED_FASHION_MNIST = "fashion_mnist_subset.npz"  # file name inside ul_fast/data/embedded/

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UINT8 = 0x08  # idx type code for unsigned bytes, the only one Fashion-MNIST uses


def _check_split(split: str) -> str:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def read_idx(path: str | Path, expected_ndim: int) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) of unsigned bytes into a uint8 array.

    Format: 2 zero bytes, type code 0x08, ndim, then ndim big-endian uint32 sizes, then the data.
    Raises ValueError naming the file on a bad magic number, wrong ndim or wrong data length.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decompress whatever the suffix says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UINT8 or raw[3] != expected_ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else raw.hex()
        want = f"0000{_IDX_UINT8:02x}{expected_ndim:02x}"
        raise ValueError(f"{path}: not an idx uint8 file with {expected_ndim} dims "
                         f"(magic bytes {magic}, expected {want})")
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: idx header says dims {dims} = {expected} bytes of data, "
                         f"file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _idx_path(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: expected {root / name}.gz (or {root / name} uncompressed). "
        f"Install the Debian package `dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST_ROOT}) "
        f"or pass the folder holding the idx files."
    )


def read_fashion_mnist_idx_uint8(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST from idx files in ``root``: uint8 images ``[N, 28, 28]``, uint8 labels ``[N]``."""
    root = Path(root)
    prefix = _SPLIT_PREFIX[_check_split(split)]
    img_path = _idx_path(root, f"{prefix}-images-idx3-ubyte")
    lab_path = _idx_path(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path, expected_ndim=3)
    labels = read_idx(lab_path, expected_ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected 28x28 images, got {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} has {images.shape[0]} images but {lab_path} has "
                         f"{labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
    return images, labels


def fashion_mnist_from_uint8(images: np.ndarray, labels: np.ndarray, image_size: int,
                             source: str) -> ImageArrayDataset:
    """uint8 ``[N, 28, 28]`` + labels -> dataset at ``image_size`` (pad to 32 with -1, then resize)."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    x = uint8_to_float(images).unsqueeze(1)  # [N, 1, 28, 28] in [-1, 1]
    if image_size != 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # background is black = -1
        x = resize_images(x, image_size)
    y = torch.as_tensor(labels.astype(np.int64))
    return ImageArrayDataset(x, y, class_names=FASHION_MNIST_CLASSES, source=source)


def load_embedded_fashion_mnist(split: str = "train", image_size: int = 32) -> ImageArrayDataset:
    """The Fashion-MNIST subset shipped in the package: 5000 train / 1000 test, 10 balanced classes.

    Returns images ``[N, 1, image_size, image_size]`` in [-1, 1] and labels ``[N]`` (int64, 0..9).
    Made by ``scripts/make_embedded_fmnist.py`` from the Debian files.
    """
    _check_split(split)
    ref = resources.files("ul_fast.data") / "embedded" / EMBEDDED_FASHION_MNIST
    if not ref.is_file():
        raise FileNotFoundError(f"embedded data set missing: {ref} (a broken install; regenerate with "
                                f"scripts/make_embedded_fmnist.py)")
    with resources.as_file(ref) as path, np.load(path, allow_pickle=False) as z:
        images, labels = z[f"{split}_images"], z[f"{split}_labels"]
    return fashion_mnist_from_uint8(images, labels, image_size, source=f"fmnist-embedded/{split}")


def load_fashion_mnist_idx(root: str | Path = DEBIAN_FASHION_MNIST_ROOT, split: str = "train",
                           image_size: int = 32) -> ImageArrayDataset:
    """The full Fashion-MNIST (60000 train / 10000 test) from idx(.gz) files in ``root``.

    Default ``root`` is where Debian's ``dataset-fashion-mnist`` installs them. Returns images
    ``[N, 1, image_size, image_size]`` in [-1, 1] and labels ``[N]`` (int64, 0..9).
    """
    images, labels = read_fashion_mnist_idx_uint8(root, split)
    return fashion_mnist_from_uint8(images, labels, image_size, source=f"fmnist:{root}/{split}")
