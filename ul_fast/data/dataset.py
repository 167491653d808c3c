"""The in-memory image dataset every loader returns, and the pixel conversions they share.

Pixel convention used throughout ul_fast: float32 images ``[N, C, H, W]`` in [-1, 1], where a uint8 value
``x`` maps to ``x / 127.5 - 1`` (0 -> -1, 255 -> +1). Images are square (``H == W == image_size``) with
``C`` in {1, 3}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from .caption_data import CaptionTable

__all__ = ["ImageArrayDataset", "float_to_uint8", "uint8_to_float", "resize_images"]


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 tensor in [-1, 1] via ``x / 127.5 - 1``."""
    t = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8:
        raise TypeError(f"uint8_to_float: expected uint8 pixels, got dtype {t.dtype}")
    return t.to(torch.float32).div_(127.5).sub_(1.0)  # in place: the same two fp32 roundings, one allocation


def float_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float pixels in [-1, 1] (any shape) -> uint8 [0, 255], the inverse of :func:`uint8_to_float` (values
    outside [-1, 1] are clamped, the rest rounded to the nearest level)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize_images(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize float images ``[N, C, H, W]`` (square) to ``[N, C, image_size, image_size]``.

    Bilinear with antialiasing (a non-negative, normalised filter, so values stay in [-1, 1]; the clamp
    only removes float rounding). Returns the input unchanged when the size already matches.
    """
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    out = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                        align_corners=False)
    return out.clamp_(-1.0, 1.0)


class ImageArrayDataset(Dataset):
    """Images held in memory as one float tensor, with optional integer labels.

    Attributes:
        images: float32 ``[N, C, H, W]`` in [-1, 1], ``H == W``.
        labels: int64 ``[N]`` (class indices >= 0) or ``None`` for unlabeled data.
        class_names: optional names, ``class_names[k]`` names label ``k``.
        source: a short human-readable description of where the data came from (for logs).
        captions: optional :class:`~ul_fast.data.caption_data.CaptionTable` of the ``N`` images.

    ``dataset[i]`` returns ``(image [C, H, W], label)`` with ``label`` an int, ``-1`` when unlabeled.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        source: str = "",
        captions: CaptionTable | None = None,
    ) -> None:
        where = f" ({source})" if source else ""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ImageArrayDataset{where}: images must be a tensor [N, C, H, W], got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"ImageArrayDataset{where}: images must be floating point in [-1, 1], "
                            f"got dtype {images.dtype} (convert uint8 with uint8_to_float)")
        n, c, h, w = images.shape
        if c not in (1, 3):
            raise ValueError(f"ImageArrayDataset{where}: images must have 1 or 3 channels, got C={c}")
        if h != w:
            raise ValueError(f"ImageArrayDataset{where}: images must be square, got H={h}, W={w}")
        if n == 0:
            raise ValueError(f"ImageArrayDataset{where}: no images")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != (n,):
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
                raise ValueError(f"ImageArrayDataset{where}: labels must be a tensor [N]=[{n}], got {got}")
            if labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise TypeError(f"ImageArrayDataset{where}: labels must be integers, got {labels.dtype}")
            labels = labels.to(torch.int64)
            if int(labels.min()) < 0:
                raise ValueError(f"ImageArrayDataset{where}: labels must be >= 0, "
                                 f"got min {int(labels.min())}")
            if class_names is not None and int(labels.max()) >= len(class_names):
                raise ValueError(f"ImageArrayDataset{where}: label {int(labels.max())} has no class name "
                                 f"({len(class_names)} class_names given)")
        if captions is not None and len(captions) != n:
            raise ValueError(f"ImageArrayDataset{where}: {len(captions)} images' captions for {n} images")
        self.images = images.to(torch.float32).contiguous()
        self.captions = captions
        self.labels = labels
        self.class_names = list(class_names) if class_names is not None else None
        self.source = source

    @property
    def image_size(self) -> int:
        """Height (= width) of every image, in pixels."""
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        """Channel count C (1 = grayscale, 3 = RGB)."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes: ``len(class_names)`` if known, else ``max(label) + 1``; 0 when unlabeled."""
        if self.class_names is not None:
            return len(self.class_names)
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return self.images[index], label

    def __repr__(self) -> str:
        lab = "unlabeled" if self.labels is None else f"{self.num_classes} classes"
        return (f"ImageArrayDataset(n={len(self)}, channels={self.channels}, image_size={self.image_size}, "
                f"{lab}, source={self.source!r})")
