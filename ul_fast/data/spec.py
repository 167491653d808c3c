"""``load_dataset``: one entry point that turns a data spec string into an :class:`ImageArrayDataset`.

Accepted specs:
  * ``fmnist-embedded`` (default) -- the 5k/1k Fashion-MNIST subset shipped in the package;
  * ``fmnist`` or ``fmnist:<dir>`` -- full Fashion-MNIST from idx(.gz) files (default dir: Debian's
    ``/usr/share/datasets/fashion-mnist``);
  * ``folder:<dir>`` -- PNG/JPEG images; if ``<dir>/train`` and ``<dir>/test`` both exist, ``<dir>/<split>``
    is used, otherwise ``<dir>`` serves both splits;
  * ``array:<file>`` -- ``.npy`` / ``.npz`` (an ``.npz`` may hold ``train_images`` / ``test_images``).
"""

from __future__ import annotations

from pathlib import Path

from .arrays import load_array
from .dataset import ImageArrayDataset
from .fashion_mnist import DEBIAN_FASHION_MNIST_ROOT, load_embedded_fashion_mnist, load_fashion_mnist_idx
from .folder import load_image_folder

__all__ = ["DATASET_SPECS", "load_dataset"]

DATASET_SPECS = ("fmnist-embedded", "fmnist[:<dir>]", "folder:<dir>", "array:<file.npy|file.npz>")


def load_dataset(spec: str = "fmnist-embedded", split: str = "train", image_size: int = 32,
                 channels: int | None = None) -> ImageArrayDataset:
    """Load the data set named by ``spec`` (see module docstring) at ``image_size``.

    ``channels``: None keeps the data's own channel count. Fashion-MNIST is grayscale (only 1 allowed);
    folders convert every image to it (default 3); arrays must already have it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_dataset: split must be 'train' or 'test', got {split!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"load_dataset: channels must be None, 1 or 3, got {channels!r}")
    if not isinstance(spec, str):
        raise TypeError(f"load_dataset: spec must be a string, got {type(spec).__name__}")
    kind, _, arg = spec.partition(":")

    if kind in ("fmnist-embedded", "fmnist"):
        if channels not in (None, 1):
            raise ValueError(f"load_dataset: Fashion-MNIST is grayscale (1 channel), got channels={channels}")
        if kind == "fmnist-embedded":
            if arg:
                raise ValueError(f"load_dataset: 'fmnist-embedded' takes no argument, got {spec!r}")
            return load_embedded_fashion_mnist(split, image_size)
        return load_fashion_mnist_idx(arg or DEBIAN_FASHION_MNIST_ROOT, split, image_size)
    if kind == "folder" and arg:
        root = Path(arg)
        if (root / "train").is_dir() and (root / "test").is_dir():
            root = root / split
        return load_image_folder(root, image_size, 3 if channels is None else channels)
    if kind == "array" and arg:
        return load_array(arg, split=split, image_size=image_size, channels=channels)
    raise ValueError(f"load_dataset: unknown data spec {spec!r}; accepted forms: {', '.join(DATASET_SPECS)}")
