"""Images in and out of the public API: torch tensors in [-1, 1], uint8 NumPy arrays, or PIL images.

In: a float tensor ``[B, C, H, W]`` (or one image ``[C, H, W]``) in [-1, 1]; a uint8 tensor of the same shape
(0..255); a NumPy array in any layout :func:`ul_fast.data.array_to_dataset` reads (NHW, NHWC, NCHW; uint8
0..255 or float in [-1, 1]); a PIL image or a list of them (converted to "L" or "RGB" to match the model).
Nothing is resized: a size or channel count other than the model's is an error naming what was expected.

Out (``output=``): ``"tensor"``, float32 ``[B, C, H, W]`` in [-1, 1] on the model's device; ``"numpy"``, uint8
``[B, H, W, C]``; ``"pil"``, a list of B PIL images (mode "L" or "RGB").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ul_fast.data import array_to_dataset, uint8_to_float
from ul_fast.eval.images import to_uint8

OUTPUTS = ("tensor", "numpy", "pil")
ImagesIn = torch.Tensor | np.ndarray | Image.Image | Sequence[Image.Image]
ImagesOut = torch.Tensor | np.ndarray | list[Image.Image]


def check_output(output: str) -> None:
    """Raise a ValueError naming ``output`` unless it is one of :data:`OUTPUTS`."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")


def to_model_images(images: ImagesIn, shape: tuple[int, int, int], argument: str = "images") -> torch.Tensor:
    """``images`` (any accepted form) as a float32 CPU or device tensor ``[B, C, H, W]`` in [-1, 1], checked
    against the model's image ``shape`` ``(C, H, W)``; errors name ``argument``."""
    channels, size, _ = shape
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        sizes = sorted({image.size for image in images})
        if len(sizes) > 1:
            raise ValueError(f"{argument}: the PIL images differ in size ({sizes}); each must be {size}x{size}")
        mode = "L" if channels == 1 else "RGB"
        images = np.stack([np.asarray(image.convert(mode)) for image in images])  # NHW or NHWC, uint8
        if images.ndim == 3:
            images = images[..., None]
        layout = "NHWC"
    elif isinstance(images, np.ndarray):
        layout = None
    elif isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4:
            raise ValueError(f"{argument} must be a [B, C, H, W] tensor (or one [C, H, W] image), got shape "
                             f"{tuple(images.shape)}")
        if x.dtype == torch.uint8:
            x = uint8_to_float(x)
        elif not x.is_floating_point():
            raise TypeError(f"{argument} must be float in [-1, 1] or uint8, got dtype {x.dtype}")
        x = x.detach().float()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{argument} contain non-finite pixels (NaN or inf)")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 or hi > 1.0:
            raise ValueError(f"{argument} must lie in [-1, 1], got range [{lo:.4g}, {hi:.4g}] (uint8 0..255: pass a "
                             f"uint8 tensor or array)")
        _check_shape(x, shape, argument)
        return x
    else:
        raise TypeError(f"{argument} must be a torch tensor, a NumPy array, a PIL image or a list of PIL images, "
                        f"got {type(images).__name__}")
    x = array_to_dataset(images, name=argument, layout=layout).images
    _check_shape(x, shape, argument)
    return x


def _check_shape(x: torch.Tensor, shape: tuple[int, int, int], argument: str) -> None:
    if tuple(x.shape[1:]) != shape:
        c, h, w = shape
        raise ValueError(f"{argument} must have {c} channel(s) and size {h}x{w} (this model's images), got "
                         f"{x.shape[1]} channel(s) of {x.shape[2]}x{x.shape[3]}; images are not resized")
    if x.shape[0] == 0:
        raise ValueError(f"{argument} is empty (no images)")


def from_model_images(x: torch.Tensor, output: str) -> ImagesOut:
    """Model images ``[B, C, H, W]`` in [-1, 1] as ``output`` (see the module docstring)."""
    if output == "tensor":
        return x.float()
    pixels = to_uint8(x)  # [B, H, W, C] uint8
    if output == "numpy":
        return pixels
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
