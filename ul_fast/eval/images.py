"""Image metrics and grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ul_fast.data.dataset import float_to_uint8


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [−1, 1] (peak-to-peak 2, so ``MAX² = 4``): ``[B]``."""
    if images.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(images.shape)} vs {tuple(reference.shape)}")
    mse = (images.float() - reference.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` in [−1, 1] → uint8 ``[B, H, W, C]``."""
    return float_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile ``[B, C, H, W]`` images into one uint8 array ``[rows·(H+p)+p, cols·(W+p)+p, C]``."""
    pixels = to_uint8(images)
    count, h, w, c = pixels.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i in range(count):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 2) -> None:
    """Write a PNG grid, upscaled ``scale``× (nearest) so small images stay visible."""
    grid = image_grid(images, columns)
    picture = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Interleave rows: pairs (original, reconstruction) column by column, for a comparison grid."""
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
