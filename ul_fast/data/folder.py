"""Image folders (PNG / JPEG via Pillow).

Layout: either ``root/<class>/<image>`` (every entry of ``root`` a folder: classes are the sorted
folder names, labels their index) or ``root/<image>`` (unlabeled). Each image is converted to mode "L"
(channels=1) or "RGB" (channels=3; an alpha channel is dropped), center-cropped to a square of its
shorter side and resized to ``image_size`` with Pillow's bicubic filter (antialiased when shrinking).
Hidden files (names starting with ".") are skipped; any other file that is not a readable PNG/JPEG
fails with an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .dataset import ImageArrayDataset, uint8_to_float

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _visible(entries: list[Path]) -> list[Path]:
    return sorted(p for p in entries if not p.name.startswith("."))


def _read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One file -> uint8 ``[image_size, image_size, channels]``."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: not an image file (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(path) as im:
            if im.format not in ("PNG", "JPEG"):
                raise ValueError(f"{path}: is a {im.format} image, expected PNG or JPEG")
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({e})") from e
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != image_size:
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_image_folder(root: str | Path, image_size: int, channels: int = 3) -> ImageArrayDataset:
    """Load every image under ``root`` into memory.

    Returns images ``[N, channels, image_size, image_size]`` in [-1, 1]; labels ``[N]`` and
    ``class_names`` when ``root`` holds class sub-folders, else unlabeled.
    """
    root = Path(root)
    if channels not in (1, 3):
        raise ValueError(f"load_image_folder: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"load_image_folder: image_size must be a positive int, got {image_size!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"load_image_folder: {root} is not a folder")
    entries = _visible(list(root.iterdir()))
    if not entries:
        raise ValueError(f"load_image_folder: {root} is empty (expected PNG/JPEG files or class sub-folders)")

    dirs = [p for p in entries if p.is_dir()]
    if dirs and len(dirs) != len(entries):
        loose = next(p for p in entries if not p.is_dir())
        raise ValueError(f"load_image_folder: {root} mixes class sub-folders with files such as {loose}; "
                         f"put every image in a class folder, or use no sub-folders for unlabeled data")
    class_names: list[str] | None = [d.name for d in dirs] if dirs else None
    groups = [(k, _visible(list(d.iterdir()))) for k, d in enumerate(dirs)] if dirs else [(-1, entries)]

    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, files in groups:
        if not files:
            raise ValueError(f"load_image_folder: class folder {dirs[label]} has no images")
        for f in files:
            if f.is_dir():
                raise ValueError(f"load_image_folder: unexpected nested folder {f} (one level of class "
                                 f"folders is supported)")
            images.append(_read_image(f, image_size, channels))
            labels.append(label)

    x = uint8_to_float(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    y = torch.tensor(labels, dtype=torch.int64) if class_names is not None else None
    return ImageArrayDataset(x, y, class_names=class_names, source=f"folder:{root}")
