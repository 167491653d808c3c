"""Distances between two sets of image features: Fréchet distance (FID's formula) and kernel distance (KID).

Features are ``[N, D]`` float tensors, one row per image, from a fixed feature network (for grayscale data
:func:`ul_fast.eval.feature_net.load_fmnist_classifier`'s penultimate layer). Statistics are float64, as in
pytorch-fid; KID is torch-fidelity's estimator (Bińkowski et al. 2018, "Demystifying MMD GANs") over disjoint
subsets, so that its standard error is that of independent draws.
"""

from __future__ import annotations

import math

import torch

__all__ = ["feature_statistics", "frechet_distance", "kernel_inception_distance", "kid_subset_sizes"]


def _check_features(features: torch.Tensor, name: str = "features", min_rows: int = 2) -> None:
    """Raise ValueError unless ``features`` is a finite ``[N, D]`` tensor with ``N >= min_rows``."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"{name} must be a [N, D] tensor, got {getattr(features, 'shape', type(features))}")
    if features.shape[0] < min_rows or features.shape[1] < 1:
        raise ValueError(f"{name} needs at least {min_rows} rows (images) and 1 column, got {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name} contain non-finite values (NaN or inf)")


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (divided by ``N − 1``, as ``numpy.cov``) of
    ``features [N, D]``, both float64 on the features' device."""
    _check_features(features)
    x = features.to(torch.float64)
    return x.mean(dim=0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by its eigendecomposition (float64); the
    rounding's tiny negative eigenvalues are clamped to 0."""
    eigenvalues, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * eigenvalues.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (means ``[D]``,
    covariances ``[D, D]``, e.g. from :func:`feature_statistics`), in squared feature units:

        ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½.

    ``tr (Σ1 Σ2)^½`` equals the last trace, which is computed as the sum of the square roots of the
    eigenvalues of the symmetric PSD matrix ``Σ1^½ Σ2 Σ1^½`` (``torch.linalg.eigh``, float64, tiny negative
    eigenvalues clamped to 0). pytorch-fid instead takes ``scipy.linalg.sqrtm(Σ1 Σ2)`` of a non-symmetric
    product, which can return complex values or fail on singular covariances (fewer images than feature
    dimensions) and then needs an ad-hoc offset; the symmetric form needs neither. Symmetric in its two
    arguments up to rounding; 0 for identical statistics.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64).to(mu1.device)
    sigma1, sigma2 = sigma1.to(torch.float64).to(mu1.device), sigma2.to(torch.float64).to(mu1.device)
    if mu1.dim() != 1 or mu1.shape[0] < 1:
        raise ValueError(f"frechet_distance: mu1 must be a non-empty mean vector [D], got {tuple(mu1.shape)}")
    d = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d)),
                               ("mu1", mu1, (d,))):
        if tuple(value.shape) != shape:
            raise ValueError(f"frechet_distance: {name} must have shape {shape} (means [D], covariances [D, D] "
                             f"of the same D), got {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"frechet_distance: {name} contains non-finite values (NaN or inf)")
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)  # ≥ 0 exactly; rounding can leave −1e-12 for identical statistics


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² of samples ``x [S, m, D]`` and ``y [S, n, D]`` (S pairs at once) under the kernel
    ``k(a, b) = (aᵀb / D + 1)³``: ``[S]``. The within-set kernel means leave out the diagonal ``k(a, a)`` (over
    ``m(m − 1)`` and ``n(n − 1)`` pairs); the cross-set mean keeps all ``m·n`` pairs."""
    m, d = x.shape[-2:]
    n = y.shape[-2]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.mT / d + 1) ** 3

    def off_diagonal_sum(k: torch.Tensor) -> torch.Tensor:
        return k.sum(dim=(-2, -1)) - k.diagonal(dim1=-2, dim2=-1).sum(dim=-1)

    within = off_diagonal_sum(kernel(x, x)) / (m * (m - 1)) + off_diagonal_sum(kernel(y, y)) / (n * (n - 1))
    return within - 2 * kernel(x, y).mean(dim=(-2, -1))


def kid_subset_sizes(rows1: int, rows2: int, subsets: int = 10, max_subset_size: int = 1000) -> tuple[int, int, int]:
    """``(k, size1, size2)``: the number of disjoint subsets :func:`kernel_inception_distance` cuts two sets of
    ``rows1`` and ``rows2`` rows into, and the rows of each subset of either set.

    ``k = max(subsets, ⌈min(rows1, rows2) / max_subset_size⌉)``, so that up to ``max_subset_size`` rows per
    subset use the whole smaller set, but at most ``min(rows1, rows2) // 2`` (subsets of 2 rows at least);
    ``size_i = min(rows_i // k, max_subset_size)``. ValueError when a set has fewer than 4 rows (2 subsets of
    2: the fewest with a standard error)."""
    if subsets < 2:
        raise ValueError(f"kernel_inception_distance: subsets must be >= 2 (for a standard error), got {subsets}")
    if max_subset_size < 2:
        raise ValueError(f"kernel_inception_distance: max_subset_size must be >= 2, got {max_subset_size}")
    smaller = min(rows1, rows2)
    if smaller < 4:
        raise ValueError(f"kernel_inception_distance: each set needs at least 4 rows (2 disjoint subsets of 2, for a "
                         f"standard error), got {rows1} and {rows2}")
    k = min(max(subsets, math.ceil(smaller / max_subset_size)), smaller // 2)
    return k, min(rows1 // k, max_subset_size), min(rows2 // k, max_subset_size)


def kernel_inception_distance(features1: torch.Tensor, features2: torch.Tensor, subsets: int = 10,
                              max_subset_size: int = 1000, generator: torch.Generator | None = None,
                              ) -> tuple[float, float]:
    """Kernel distance (KID) of two feature sets ``[N1, D]`` and ``[N2, D]``: ``(mean, standard_error)``.

    The rows of each set are shuffled (with ``generator``, a CPU generator, or torch's global one when None)
    and cut into ``k`` **disjoint** subsets of ``size1`` and ``size2`` rows (:func:`kid_subset_sizes`:
    ``subsets`` of them, more when that leaves over ``max_subset_size`` rows in one, fewer when it leaves under
    2). Subset ``g`` of one set is compared with subset ``g`` of the other by the unbiased MMD² with the
    polynomial kernel ``(xᵀy / D + 1)³`` (Bińkowski et al. 2018, as in torch-fidelity), and KID is the mean of
    the ``k`` values. Unbiased: its expectation is 0 when both sets come from one distribution, so small
    negative values occur. Two sets of equal length share one shuffle, so that row ``i`` of both lands in the
    same subset: the subsets of paired sets (images and their reconstructions) stay independent.

    ``standard_error`` = standard deviation of the ``k`` values / √k. The subsets share no row, so their
    values are independent draws and this estimates the spread of KID over independent pairs of sets of these
    sizes (tested by simulation). torch-fidelity's overlapping subsets are not used: their spread divided by
    √(subsets) understates that spread several times over. With ``k = 10`` the error is itself known to about
    ±25 %. Computed in float64.
    """
    _check_features(features1, "features1")
    _check_features(features2, "features2")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"kernel_inception_distance: feature dimensions differ: {features1.shape[1]} vs "
                         f"{features2.shape[1]}")
    n1, n2 = features1.shape[0], features2.shape[0]
    k, size1, size2 = kid_subset_sizes(n1, n2, subsets, max_subset_size)
    x, y = features1.to(torch.float64), features2.to(torch.float64).to(features1.device)
    order1 = torch.randperm(n1, generator=generator)
    order2 = order1 if n2 == n1 else torch.randperm(n2, generator=generator)
    rows1 = order1[:k * size1].reshape(k, size1).to(x.device)  # [k, size1], disjoint
    rows2 = order2[:k * size2].reshape(k, size2).to(x.device)
    # Subsets in chunks of at most 2^24 kernel entries and gathered features each (128 MiB in float64).
    largest = max(size1, size2)
    chunk = max(1, min(2**24 // largest**2, 2**24 // (largest * x.shape[1])))
    values = torch.cat([_polynomial_mmd2(x[rows1[i:i + chunk]], y[rows2[i:i + chunk]]) for i in range(0, k, chunk)])
    return float(values.mean()), float(values.std(correction=1)) / math.sqrt(k)
