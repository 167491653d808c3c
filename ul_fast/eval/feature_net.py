"""Feature network for grayscale data: a small CNN classifier trained on the full Fashion-MNIST.

Fréchet distance and KID compare two image sets through the features of a fixed network. For grayscale
data that network is :class:`FashionMNISTClassifier`, trained on all 60000 Fashion-MNIST training images by
``scripts/train_fmnist_classifier.py``; its features are the penultimate layer (``FEATURE_DIM`` values
after a ReLU). The weights ship in the package (``weights/fmnist_classifier.safetensors``) and are checked
against :data:`WEIGHTS_SHA256` when loaded.

Measured (``python scripts/train_fmnist_classifier.py --epochs 10 --seed 0 --threads 1``, torch 2.13.0+cpu,
x86_64 Xeon, one thread on 2 CPU cores shared with other jobs, 2026-11-28): 329306 parameters, 15.2 minutes
of training; test accuracy 93.24 % on the full 10000-image test set and 94.0 % on the embedded 1000-image
test subset (28x28 input: the same 94.0 %; 64x64: 90.3 %, as the 32 -> 64 -> 32 round trip blurs). Per
epoch, test accuracy 83.5, 87.7, 89.9, 89.5, 89.2, 90.3, 91.4, 92.3, 93.0, 93.2 %.

Input convention: images ``[B, 1, S, S]`` in [-1, 1] at any square size S, as ``ul_fast.data`` makes them.
The network sees 32x32: 28x28 inputs (the original Fashion-MNIST pixels, ``image_size=28``) are padded by 2
with the background -1, exactly as the data package pads to 32; other sizes are resized with antialiased
bilinear interpolation (:func:`~ul_fast.data.dataset.resize_images`), undoing the data package's resize
from 32x32 up to a blur.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ul_fast.data.dataset import resize_images
from ul_fast.files import sha256_of_file

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "WEIGHTS_PATH",
    "WEIGHTS_SHA256",
    "FashionMNISTClassifier",
    "classifier_accuracy",
    "load_fmnist_classifier",
]

FEATURE_DIM = 256
INPUT_SIZE = 32  # the size the network was trained at
WIDTHS = (16, 32, 64, 128)  # channels of the four conv blocks (32x32, 16x16, 8x8, 4x4)
NUM_CLASSES = 10
WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "fmnist_classifier.safetensors"
# sha256sum of the weights file written by scripts/train_fmnist_classifier.py (the run in the docstring).
WEIGHTS_SHA256 = "c6e81b70c41e20793dca0ccbecd4b49d46cd2126da17617af6f21c36a5480563"
_PAD_28_TO_32 = 2  # pixels per side, as ul_fast.data.fashion_mnist pads 28x28 to 32x32


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm shift that follows makes it redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class FashionMNISTClassifier(nn.Module):
    """Four blocks of two 3x3 conv + BatchNorm + ReLU (max-pool between blocks), global average pool,
    a ``FEATURE_DIM`` linear + ReLU (the features), and a linear classifier over the 10 classes.

    Images ``[B, 1, S, S]`` in [-1, 1] (any square S, see the module docstring). In eval mode (the state
    :func:`load_fmnist_classifier` returns) BatchNorm uses its stored statistics, so every image's output
    is independent of the rest of the batch and deterministic.
    """

    def __init__(self, widths: tuple[int, ...] = WIDTHS, feature_dim: int = FEATURE_DIM,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for block, width in enumerate(widths):
            if block:
                layers.append(nn.MaxPool2d(2))
            layers += _conv_bn_relu(c_in, width) + _conv_bn_relu(width, width)
            c_in = width
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(c_in, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Check ``[B, 1, S, S]`` and bring it to float32 ``[B, 1, 32, 32]`` (pad 28x28, resize others)."""
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ValueError(f"the Fashion-MNIST feature network takes grayscale images [B, 1, S, S] in [-1, 1], "
                             f"got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"the Fashion-MNIST feature network takes float images in [-1, 1], got {images.dtype}")
        images = images.to(torch.float32)
        if images.shape[-1] == 28:
            return F.pad(images, (_PAD_28_TO_32,) * 4, value=-1.0)
        return resize_images(images, INPUT_SIZE)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features: images ``[B, 1, S, S]`` -> float32 ``[B, FEATURE_DIM]`` (>= 0)."""
        h = self.trunk(self.prepare(images)).mean(dim=(2, 3))  # global average pool -> [B, widths[-1]]
        return F.relu(self.embed(h))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, 10]`` (order of ``ul_fast.data.FASHION_MNIST_CLASSES``)."""
        return self.head(self.features(images))


def load_fmnist_classifier(device: str | torch.device = "cpu") -> FashionMNISTClassifier:
    """The shipped classifier, in eval mode with frozen parameters, on ``device``.

    Raises FileNotFoundError if the weights file is missing and ValueError if its SHA-256 is not
    :data:`WEIGHTS_SHA256` (both name the file; the latter both hashes).
    """
    path = Path(WEIGHTS_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"the Fashion-MNIST feature network's weights are missing: {path} (expected "
                                f"SHA-256 {WEIGHTS_SHA256}); reinstall ul-fast, or rebuild the file with "
                                f"scripts/train_fmnist_classifier.py and update WEIGHTS_SHA256")
    actual = sha256_of_file(path)
    if actual != WEIGHTS_SHA256:
        raise ValueError(f"{path} has SHA-256 {actual}, expected {WEIGHTS_SHA256}: the file is corrupt or not "
                         f"the weights this version of ul-fast was built with; reinstall ul-fast")
    model = FashionMNISTClassifier()
    model.load_state_dict(load_file(path))
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def classifier_accuracy(model: FashionMNISTClassifier, images: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 500) -> float:
    """Fraction of ``images`` ``[N, 1, S, S]`` whose arg-max class is ``labels`` ``[N]`` (model's mode kept)."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start:start + batch_size]).sum())
    return correct / len(images)
