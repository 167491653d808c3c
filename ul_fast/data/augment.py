"""Per-image augmentation of decoded images: a square crop, a resize to the training resolution, a flip.

The randomness comes from a ``numpy.random.Generator`` the caller derives from (seed, epoch, index)
(:func:`item_rng`), so an image's augmentation does not depend on which worker decodes it or on whether the
run was resumed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ul_fast.config import CROPS

__all__ = ["ImageTransform", "item_rng"]


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of example ``index``'s augmentation in ``epoch`` of a stream seeded ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


class ImageTransform:
    """Decoded image → uint8 tensor ``[channels, image_size, image_size]``.

    Square crop of the shorter side (``crop="center"``, or ``"random"``: a uniformly random position along
    the longer side), bicubic resize to ``image_size`` (Pillow's, antialiased when shrinking; skipped when the
    square already has that size), then a horizontal flip with probability 1/2 when ``flip``.

    Call as ``transform(image, rng)``; ``image`` is a Pillow image of mode "L" (channels 1) or "RGB" (3).
    ``rng`` may be None only when nothing is random (center crop, no flip). Draws: the crop offset (random
    crop only), then one uniform for the flip (flip only).
    """

    def __init__(self, image_size: int, channels: int, crop: str = "center", flip: bool = False):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"ImageTransform: image_size must be a positive int, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"ImageTransform: channels must be 1 or 3, got {channels!r}")
        if crop not in CROPS:
            raise ValueError(f"ImageTransform: crop must be one of {CROPS}, got {crop!r}")
        self.image_size, self.channels, self.crop, self.flip = image_size, channels, crop, bool(flip)
        self.mode = "L" if channels == 1 else "RGB"

    @property
    def random(self) -> bool:
        """Whether the output depends on ``rng``."""
        return self.crop == "random" or self.flip

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        if image.mode != self.mode:
            raise ValueError(f"ImageTransform: expected a mode {self.mode!r} image ({self.channels} channel(s)), "
                             f"got mode {image.mode!r}")
        if rng is None and self.random:
            raise ValueError("ImageTransform: a random crop or flip needs rng")
        w, h = image.size
        side = min(w, h)
        if self.crop == "random":
            left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        else:
            left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if side != self.image_size:
            image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [S, S] or [S, S, 3]
        return pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, channels={self.channels}, crop={self.crop!r}, "
                f"flip={self.flip})")
