"""Inception-v3 pool features for RGB data, as pytorch-fid and torch-fidelity compute them.

FID is only comparable across papers when it uses one network: the TensorFlow Inception-v3 of 2015-12-05
("FID Inception"), whose PyTorch port is ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; the
same weights torch-fidelity uses). ul_fast downloads nothing: the user passes that file by path
(``ul-fast eval --features inception:PATH``). Its name ends in the first 8 hex digits of its SHA-256, the
convention of ``torch.hub``; :func:`load_fid_inception` checks them, so a truncated or different file is an
error, not a wrong number.

The network is written out here (no torchvision: it does not import beside the torch this package pins) with
torchvision's module names, so the state dict loads strictly. It differs from torchvision's Inception-v3 where
the TensorFlow graph does, as pytorch-fid patches it: the average pools inside the A, C and first E blocks do
not count the zero padding, and the last E block max-pools its pool branch.

Conventions (pytorch-fid's ``InceptionV3([3])`` with ``resize_input`` and ``normalize_input``):

1. images ``[B, C, H, W]`` in [-1, 1] (ul_fast's range) are mapped to [0, 1] and **quantized to 8 bits**, as an
   image written to a PNG and read back by pytorch-fid would be; grayscale (C = 1) is repeated to RGB, as
   ``PIL.Image.convert("RGB")`` does;
2. bilinear resize to 299×299 (``align_corners=False``, no antialiasing), then ``2x − 1``;
3. the network up to ``Mixed_7c`` and a global average pool: 2048 features per image (float32; the
   statistics are taken in float64 by :mod:`ul_fast.eval.frechet`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ul_fast.files import sha256_of_file

__all__ = ["FEATURE_DIM", "INPUT_SIZE", "WEIGHTS_FILE_NAME", "FIDInceptionV3", "load_fid_inception"]

FEATURE_DIM = 2048
INPUT_SIZE = 299
WEIGHTS_FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its hash's first 8 digits
_NUM_CLASSES = 1008  # the TensorFlow graph's classifier; loaded so the state dict is checked whole, never used


class BasicConv2d(nn.Sequential):
    """Conv (no bias) → BatchNorm (eps 1e-3, TensorFlow's) → ReLU; submodules named ``conv`` and ``bn``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)
        self.relu = nn.ReLU(inplace=True)


def _avg_pool_3x3_no_pad(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) pixels under the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pool branches; 224 + ``pool_features`` channels out."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3_no_pad(x)),
        ], dim=1)


class InceptionB(nn.Module):
    """35 → 17 reduction: strided 3×3, strided double 3×3 and max-pool branches."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], dim=1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (``c7`` inner channels); 768 channels out."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg_pool_3x3_no_pad(x)),
        ], dim=1)


class InceptionD(nn.Module):
    """17 → 8 reduction: strided 3×3, strided 7×7-then-3×3 and max-pool branches."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)],
                         dim=1)


class InceptionE(nn.Module):
    """8×8 block with split 1×3 / 3×1 branches; 2048 channels out. ``max_pool`` selects the pool branch the
    TensorFlow graph uses in its last block (a max pool where the paper has an average pool)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _avg_pool_3x3_no_pad(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], dim=1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to its 2048-d pool features (see the module docstring for the conventions).

    Build it with random weights for tests, or load the real ones with :func:`load_fid_inception`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, _NUM_CLASSES)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """``[B, 1 or 3, H, W]`` float in [-1, 1] → float32 ``[B, 3, 299, 299]`` in [-1, 1], via 8-bit pixels."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features take images [B, 1 or 3, H, W] in [-1, 1], got shape "
                             f"{tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"Inception features take float images in [-1, 1], got {images.dtype}")
        unit = (((images.float() + 1) * 0.5).clamp(0, 1) * 255).round() / 255  # an 8-bit image, read back
        if unit.shape[1] == 1:
            unit = unit.expand(-1, 3, -1, -1)
        unit = F.interpolate(unit, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * unit - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features: images ``[B, 1 or 3, H, W]`` in [-1, 1] → float32 ``[B, 2048]``."""
        x = self.prepare(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def check_fid_inception_file(path: str | Path) -> Path:
    """``path`` as a Path if it exists and its SHA-256 starts with :data:`WEIGHTS_SHA256_PREFIX`; else a
    FileNotFoundError / ValueError that names the file and what was expected."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--features inception:{path}: no such file; pass the FID Inception weights "
                                f"{WEIGHTS_FILE_NAME} (pytorch-fid's release) by path: nothing is downloaded")
    digest = sha256_of_file(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise ValueError(f"--features inception:{path}: SHA-256 {digest} does not start with "
                         f"{WEIGHTS_SHA256_PREFIX}, so this is not {WEIGHTS_FILE_NAME} (or it is truncated); FID "
                         f"is only comparable with the standard weights")
    return path


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception-v3 with the weights at ``path`` (hash-checked, loaded strictly), in eval mode with
    frozen parameters, on ``device``."""
    path = check_fid_inception_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False).eval().to(device)
