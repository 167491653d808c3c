"""``load_dataset``: one entry point that turns a data spec string into the data of a split.

In memory (an :class:`ImageArrayDataset` at ``image_size``):
  * ``fmnist-embedded`` (default) -- the 5k/1k Fashion-MNIST subset shipped in the package;
  * ``fmnist`` or ``fmnist:<dir>`` -- full Fashion-MNIST from idx(.gz) files (default dir: Debian's
    ``/usr/share/datasets/fashion-mnist``);
  * ``folder:<dir>`` -- PNG/JPEG images;
  * ``array:<file>`` -- ``.npy`` / ``.npz`` (an ``.npz`` may hold ``train_images`` / ``test_images``).

Streamed from disk (:data:`STREAMING_KINDS`; a map-style source read example by example, e.g. by
:class:`~ul_fast.data.loader.StreamingBatches`; ``image_size`` does not apply, images keep their stored size):
  * ``folder-stream:<dir>`` -- PNG/JPEG images as ``folder:`` reads them, decoded lazily
    (:class:`~ul_fast.data.lazy_folder.LazyImageFolder`);
  * ``shards:<dir>`` -- WebDataset tar shards ``<dir>/*.tar`` (:class:`~ul_fast.data.shards.ShardSource`);
  * ``latents:<dir>`` -- a latent cache written by ``ul-fast encode``
    (:class:`~ul_fast.data.latent_cache.LatentCache`: ``(z_clean, label)`` examples, for stage 2).

For ``folder:``, ``folder-stream:`` and ``shards:``, when ``<dir>/train`` and ``<dir>/test`` both exist,
``<dir>/<split>`` is used; otherwise ``<dir>`` serves both splits, and the test split is no held-out set
(:func:`splits_apart` says which specs hold their splits apart).

Captions (text-to-image) come with ``folder:``/``folder-stream:`` (``metadata.jsonl`` or ``.txt`` side files),
``shards:`` (``txt`` members) and ``latents:`` (the captions encoded with the cache): the data's ``captions``
attribute, None when it has none (:mod:`ul_fast.data.caption_data`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import load_array
from .augment import ImageTransform
from .dataset import ImageArrayDataset
from .fashion_mnist import DEBIAN_FASHION_MNIST_ROOT, load_embedded_fashion_mnist, load_fashion_mnist_idx
from .folder import load_image_folder
from .latent_cache import MANIFEST, LatentCache
from .lazy_folder import LazyImageFolder
from .loader import load_examples
from .shards import ShardSource

__all__ = ["DATASET_SPECS", "STREAMED_IMAGES_IN_MEMORY", "STREAMING_KINDS", "is_streaming", "load_dataset",
           "load_images", "spec_kind", "splits_apart"]

DATASET_SPECS = ("fmnist-embedded", "fmnist[:<dir>]", "folder:<dir>", "array:<file.npy|file.npz>",
                 "folder-stream:<dir>", "shards:<dir>", "latents:<dir>")
STREAMING_KINDS = ("folder-stream", "shards", "latents")
"""Spec kinds read from disk while training, never whole into memory."""
STREAMED_IMAGES_IN_MEMORY = 50_000
"""Images of a streamed split that evaluation and distillation decode into memory (the first ones): FID's
customary 50k reference set. In-memory specs are used whole."""


def spec_kind(spec: str) -> str:
    """The kind of a spec: the part before the first ":" (``"folder-stream:/data"`` → ``"folder-stream"``)."""
    return spec.partition(":")[0]


def is_streaming(spec: str) -> bool:
    """Whether ``spec`` names data read from disk while training (see :data:`STREAMING_KINDS`)."""
    return spec_kind(spec) in STREAMING_KINDS


def has_split_folders(root: Path) -> bool:
    """Whether ``root`` holds its splits apart, as the folders ``root/train`` and ``root/test``."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def splits_apart(spec: str) -> bool:
    """Whether the data named by ``spec`` holds its train and test splits apart, so that its test split is held out:
    Fashion-MNIST; an ``.npz`` with ``train_images`` and ``test_images``; a folder or shard set with ``train/`` and
    ``test/``; a latent cache of such data. Otherwise one set of images serves both splits (a ``.npy``, an ``.npz``
    of ``images`` only, a folder without ``train/`` and ``test/``), and "held-out" numbers would be measured on
    training images. Unknown or broken specs answer False (:func:`load_dataset` names what is wrong)."""
    kind, _, arg = spec.partition(":")
    if kind in ("fmnist-embedded", "fmnist"):
        return True
    if kind in ("folder", "folder-stream", "shards") and arg:
        return has_split_folders(Path(arg))
    if kind == "array" and arg.endswith(".npz") and Path(arg).is_file():
        try:
            with np.load(arg, allow_pickle=False) as z:
                return {"train_images", "test_images"} <= set(z.files)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f"{arg} cannot be read as a NumPy .npz file ({e})") from e
    if kind == "latents" and arg and (Path(arg) / MANIFEST).is_file():
        return splits_apart(LatentCache(arg).image_spec)
    return False


def _split_folder(root: Path, split: str) -> Path:
    """``root/split`` when ``root`` holds both ``train`` and ``test`` folders, else ``root``."""
    return root / split if has_split_folders(root) else root


def load_dataset(spec: str = "fmnist-embedded", split: str = "train", image_size: int = 32,
                 channels: int | None = None, cache_dir: str | Path | None = None,
                 caption_policy: str | None = None) -> ImageArrayDataset | Any:
    """The ``split`` of the data named by ``spec`` (see module docstring): an :class:`ImageArrayDataset` at
    ``image_size``, or for a streaming spec its map-style source.

    ``channels``: None keeps the data's own channel count. Fashion-MNIST is grayscale (only 1 allowed);
    folders convert every image to it (default 3); arrays must already have it. ``cache_dir``: where a
    ``folder-stream:`` index is cached when the folder is read-only (e.g. the run folder). ``caption_policy``: a
    text model's ``data.caption_policy`` for images without a caption (None: captions are not required).
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
        return load_image_folder(_split_folder(Path(arg), split), image_size, 3 if channels is None else channels,
                                 caption_policy)
    if kind == "array" and arg:
        return load_array(arg, split=split, image_size=image_size, channels=channels)
    if kind == "folder-stream" and arg:
        return LazyImageFolder(_split_folder(Path(arg), split), 3 if channels is None else channels, cache_dir,
                               caption_policy)
    if kind == "shards" and arg:
        return ShardSource(_split_folder(Path(arg), split), channels, caption_policy)
    if kind == "latents" and arg:  # the run checks its encoder hash and latent shape
        return LatentCache(arg, split=split, caption_policy=caption_policy)
    raise ValueError(f"load_dataset: unknown data spec {spec!r}; accepted forms: {', '.join(DATASET_SPECS)}")


def load_images(spec: str, split: str, image_size: int, channels: int | None = None, *,
                stream_limit: int | None = None, cache_dir: str | Path | None = None,
                on_bad_image: str = "skip", caption_policy: str | None = None) -> ImageArrayDataset:
    """The images of a split in memory, whatever the spec: what evaluation, distillation and the trainer's
    held-out set need.

    In-memory specs load as :func:`load_dataset` does. A streamed image source (``folder-stream:``, ``shards:``)
    decodes its first ``stream_limit`` examples (all when None), center-cropped and resized to ``image_size``,
    with their captions. A latent cache (``latents:``) holds no pixels: its manifest names the image spec it was
    encoded from, which is loaded instead.
    """
    if spec_kind(spec) == "latents":
        spec = LatentCache(spec.partition(":")[2], split=split).image_spec
    data = load_dataset(spec, split, image_size, channels, cache_dir=cache_dir, caption_policy=caption_policy)
    if isinstance(data, ImageArrayDataset):
        return data
    count = len(data) if stream_limit is None else min(stream_limit, len(data))
    return load_examples(data, ImageTransform(image_size, data.channels), count, on_bad_image)
