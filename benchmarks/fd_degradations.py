"""What the classifier's feature space rewards: Fréchet distance and KID of degraded copies of the held-out set
against the clean held-out set, for blur (a Gaussian kernel of known width, what a deterministic MSE decoder's
posterior mean looks like) and for added Gaussian noise (texture that is not in the data, what a sampler can
invent), each at several strengths, with the PSNR of each copy, so that a reader can compare the two kinds of
error at equal PSNR. Also the floor: the clean held-out set against the training set at 1,000 and at all held-out
images (the FD two samples of the same distribution have, which every gFD includes).

Used by ``benchmarks/paper_claims.py`` (its ``metric_check`` job); runs alone too:
    python benchmarks/fd_degradations.py fmnist:/path/to/fashion-mnist [--out metric_check.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from ul_fast.data import load_images
from ul_fast.eval.evaluate import in_batches, load_feature_network
from ul_fast.eval.frechet import feature_statistics, frechet_distance, kernel_inception_distance
from ul_fast.eval.images import psnr, save_grid

BLUR_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0)  # Gaussian kernel standard deviation, pixels
NOISE_STDS = (0.02, 0.05, 0.1, 0.2, 0.4)  # added Gaussian noise, in the [−1, 1] pixel scale
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[B, C, H, W]`` blurred by a separable Gaussian of standard deviation ``sigma`` pixels (kernel radius
    ⌈3σ⌉, edges replicated, so a flat background stays flat)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    out = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def add_noise(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Images plus N(0, std²) noise per pixel, clipped to the pixel range [−1, 1]."""
    return (images + std * torch.randn(images.shape, generator=generator, dtype=images.dtype)).clamp(-1, 1)


def degradation_scores(data: str, seed: int = 0, batch_size: int = 500) -> dict:
    """FD, KID and PSNR of every degraded copy of the held-out set against the clean one; see the docstring."""
    start = time.perf_counter()
    train, test = (load_images(data, split, 32, 1).images for split in ("train", "test"))
    network = load_feature_network("fmnist", torch.device("cpu"))

    def embed(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return in_batches(lambda a, b: network.features(images[a:b]).double(), len(images), batch_size,
                              "features", False)

    def distance(reference: torch.Tensor, features: torch.Tensor, offset: int) -> dict:
        kid, _ = kernel_inception_distance(reference, features, KID_SUBSETS, KID_SUBSET_SIZE,
                                           torch.Generator().manual_seed(seed + offset))
        return {"fd": frechet_distance(*feature_statistics(reference), *feature_statistics(features)), "kid": kid}

    clean = embed(test)
    train_features = embed(train)
    rows = []
    for kind, strengths in (("blur", BLUR_SIGMAS), ("noise", NOISE_STDS)):
        for k, strength in enumerate(strengths):
            noisy_generator = torch.Generator().manual_seed(seed + 100 + k)
            degraded = gaussian_blur(test, strength) if kind == "blur" else add_noise(test, strength, noisy_generator)
            rows.append({"kind": kind, "strength": strength, "psnr": float(psnr(degraded, test).mean()),
                         **distance(clean, embed(degraded), len(rows))})
    floor = {f"test_{n}_vs_train": distance(train_features, clean[:n], 50 + i)
             for i, n in enumerate((1000, len(test)))}
    return {"data": data, "seed": seed, "features": "fmnist", "reference": "the clean held-out set",
            "images": len(test), "rows": rows, "floor": floor, "kid_subsets": KID_SUBSETS,
            "kid_subset_size": KID_SUBSET_SIZE, "elapsed_s": time.perf_counter() - start}


def save_degradation_grid(data: str, path, count: int = 8, seed: int = 0) -> None:
    """A PNG of ``count`` held-out images, one row per version: clean, then blurred at every ``BLUR_SIGMAS``, then
    noisy at every ``NOISE_STDS`` (the noise drawn as in :func:`degradation_scores`)."""
    test = load_images(data, "test", 32, 1).images[:count]
    rows = [test, *(gaussian_blur(test, sigma) for sigma in BLUR_SIGMAS),
            *(add_noise(test, std, torch.Generator().manual_seed(seed + 100 + k)) for k, std in enumerate(NOISE_STDS))]
    save_grid(torch.cat(rows), path, columns=count, scale=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="data spec, e.g. fmnist:/path/to/fashion-mnist")
    parser.add_argument("--out", help="JSON file (default: print)")
    parser.add_argument("--grid", help="also write a PNG of degraded held-out images here")
    args = parser.parse_args()
    if args.grid:
        save_degradation_grid(args.data, args.grid)
    result = json.dumps(degradation_scores(args.data), indent=1)
    if args.out:
        from ul_fast.files import write_atomically

        write_atomically(args.out, result + "\n")
    else:
        print(result)


if __name__ == "__main__":
    main()
