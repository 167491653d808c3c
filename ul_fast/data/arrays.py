"""Images stored as NumPy arrays: ``.npy`` (images only) or ``.npz`` (``images`` + optional ``labels``).

Accepted pixel formats: uint8 in [0, 255] (mapped by ``x / 127.5 - 1``) or floating point already in
[-1, 1] (finite). A float array whose minimum is >= 0 is accepted but warns, since [0, 1] data passes the
range check and would train on a shifted scale.

Layout detection (override with ``layout=``):
  * 3 dims -> ``NHW`` (grayscale).
  * 4 dims -> ``NCHW`` if dim 1 is 1 or 3 and the last dim is not; ``NHWC`` if the last dim is 1 or 3 and
    dim 1 is not; if both are 1 or 3 (e.g. ``[N, 3, 3, 3]``) the layout is ambiguous and must be given.

Images must be square. No resizing is done: a size or channel count other than the requested one is an
error naming the file.

``.npz`` may hold ``{split}_images`` / ``{split}_labels`` (e.g. ``train_images``) to keep several splits
in one file; otherwise ``images`` / ``labels`` serve every split. An optional ``class_names`` string array
names the labels.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .dataset import ImageArrayDataset, uint8_to_float

__all__ = ["LAYOUTS", "DtypeError", "detect_layout", "array_to_dataset", "load_array"]

LAYOUTS = ("NHW", "NHWC", "NCHW")


class DtypeError(TypeError):
    """Pixels or labels of a dtype ul_fast does not read (the command line reports it as a user error)."""


def detect_layout(shape: tuple[int, ...], name: str = "array") -> str:
    """The layout of an image array of this shape, by the rule in the module docstring."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) != 4:
        raise ValueError(f"{name}: images must have 3 dims (NHW) or 4 dims (NHWC / NCHW), got shape {shape}")
    c_first, c_last = shape[1] in (1, 3), shape[3] in (1, 3)
    if c_first and not c_last:
        return "NCHW"
    if c_last and not c_first:
        return "NHWC"
    if c_first and c_last:
        raise ValueError(f"{name}: layout of shape {shape} is ambiguous (dim 1 and dim 3 could both be "
                         f"channels); pass layout='NCHW' or 'NHWC'")
    raise ValueError(f"{name}: shape {shape} has no channel dim of size 1 or 3 (expected NCHW or NHWC)")


def array_to_dataset(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    name: str = "array",
    image_size: int | None = None,
    channels: int | None = None,
    layout: str | None = None,
    class_names: list[str] | None = None,
) -> ImageArrayDataset:
    """Validate an in-memory image array (and labels) and convert it to an :class:`ImageArrayDataset`.

    ``name`` (usually the file path) appears in every error message.
    """
    if layout is None:
        layout = detect_layout(images.shape, name)
    elif layout not in LAYOUTS:
        raise ValueError(f"{name}: layout must be one of {LAYOUTS}, got {layout!r}")
    expected_ndim = 3 if layout == "NHW" else 4
    if images.ndim != expected_ndim:
        raise ValueError(f"{name}: layout {layout} needs {expected_ndim} dims, got shape {images.shape}")

    if images.dtype == np.uint8:
        x = uint8_to_float(images)
    elif np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            bad = int((~np.isfinite(images)).sum())
            raise ValueError(f"{name}: {bad} non-finite pixel values (NaN or inf)")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.0 or hi > 1.0:
            raise ValueError(f"{name}: float pixels must lie in [-1, 1], got range [{lo:.4g}, {hi:.4g}] "
                             f"(store uint8 [0, 255] or rescale)")
        if lo >= 0.0:
            warnings.warn(f"{name}: float pixels lie in [{lo:.3g}, {hi:.3g}]; ul_fast expects [-1, 1] — "
                          f"data in [0, 1] should be rescaled by 2x - 1", stacklevel=2)
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    else:
        hint = " (values 0..255: store them as uint8, e.g. images.astype(np.uint8))" if np.issubdtype(
            images.dtype, np.integer) else ""
        raise DtypeError(f"{name}: pixels must be uint8 [0, 255] or floating point in [-1, 1], "
                         f"got dtype {images.dtype}{hint}")

    if layout == "NHW":
        x = x.unsqueeze(1)
    elif layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"{name}: images must have 1 or 3 channels, got {c} (layout {layout}, "
                         f"shape {images.shape})")
    if h != w:
        raise ValueError(f"{name}: images must be square, got H={h}, W={w} (layout {layout})")
    if image_size is not None and h != image_size:
        raise ValueError(f"{name}: images are {h}x{w}, expected image_size={image_size} (arrays are not "
                         f"resized; resize the data or change image_size)")
    if channels is not None and c != channels:
        raise ValueError(f"{name}: images have {c} channel(s), expected channels={channels}")

    y = None
    if labels is not None:
        if labels.shape != (n,):
            raise ValueError(f"{name}: labels must have shape [N]=({n},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DtypeError(f"{name}: labels must be integers, got dtype {labels.dtype}")
        if n and int(labels.min()) < 0:
            raise ValueError(f"{name}: labels must be >= 0, got {int(labels.min())}")
        y = torch.from_numpy(labels.astype(np.int64))
    return ImageArrayDataset(x.contiguous(), y, class_names=class_names, source=name)


def load_array(
    path: str | Path,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    layout: str | None = None,
) -> ImageArrayDataset:
    """Load images (and labels) from a ``.npy`` or ``.npz`` file; see the module docstring for formats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_array: {path} does not exist")
    suffix = path.suffix.lower()
    labels = class_names = None
    try:
        if suffix == ".npy":
            images = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                prefix = f"{split}_" if f"{split}_images" in z.files else ""
                if f"{prefix}images" not in z.files:
                    raise ValueError(f"{path}: no 'images' (or '{split}_images') array; keys are {z.files}")
                images = z[f"{prefix}images"]
                if f"{prefix}labels" in z.files:
                    labels = z[f"{prefix}labels"]
                if "class_names" in z.files:
                    class_names = [str(s) for s in z["class_names"]]
        else:
            raise ValueError(f"load_array: {path} must be a .npy or .npz file")
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        if str(path) in str(e):  # one of our own messages, already naming the file
            raise
        raise ValueError(f"{path}: cannot be read as a NumPy array file ({e})") from e
    return array_to_dataset(images, labels, name=str(path), image_size=image_size, channels=channels,
                            layout=layout, class_names=class_names)
