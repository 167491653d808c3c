"""Pure-PyTorch reference ops: the specification every fast kernel is tested against.

All per-example quantities are indexed by the leading batch dimension ``B``; log-SNR ``λ`` is a
float tensor of shape ``[B]``. Arithmetic is fp32 whatever the input dtype; outputs take the input dtype
unless stated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ul_fast.diffusion.math import alpha_sigma, per_example
from ul_fast.ops.philox import philox_normal

__all__ = ["adaln_layernorm", "alpha_sigma", "attention", "diffusion_loss", "fourier_features", "gaussian_noise",
           "logsnr_embed", "loss_weight", "noise_inject"]


def gaussian_noise(shape: torch.Size | tuple[int, ...], seed: torch.Tensor) -> torch.Tensor:
    """Standard normals of ``shape`` (fp32) drawn from ``seed`` (int64 tensor of one element).

    The values are a pure function of the seed and the flat index: see :mod:`ul_fast.ops.philox`. Every int64
    is a valid seed: the 64-bit key is its two's-complement bit pattern (so ``-1`` means ``2^64 − 1``), as in
    the compiled kernels, which read the seed on the device and cannot raise on its value.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    return philox_normal(numel, seed, seed.device).reshape(shape)


def noise_inject(
    x: torch.Tensor, logsnr: torch.Tensor, seed: torch.Tensor, return_noise: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z = α(λ_b)·x + σ(λ_b)·ε`` with ``ε = gaussian_noise(x.shape, seed)``.

    x: ``[B, ...]``; logsnr: ``[B]`` (no gradient flows to it); returns ``(z, ε or None)`` in x.dtype.
    """
    eps = gaussian_noise(x.shape, seed)
    alpha, sigma = alpha_sigma(logsnr.detach())
    z = per_example(alpha, x) * x.float() + per_example(sigma, x) * eps
    return z.to(x.dtype), (eps.to(x.dtype) if return_noise else None)


def loss_weight(logsnr: torch.Tensor, loss_factor: float, bias: float | None) -> torch.Tensor:
    """Per-example weight ``w(λ)``: 1 for the ELBO (``bias is None``), else ``c_lf·sigmoid(b − λ)``."""
    if bias is None:
        return torch.ones_like(logsnr, dtype=torch.float32)
    return loss_factor * torch.sigmoid(bias - logsnr.float())


def diffusion_loss(
    pred: torch.Tensor,
    x: torch.Tensor,
    logsnr: torch.Tensor,
    neg_dlogsnr_dt: torch.Tensor,
    seed: torch.Tensor,
    prediction: str = "v",
    loss_factor: float = 1.0,
    bias: float | None = None,
) -> torch.Tensor:
    """Per-example weighted diffusion loss in nats: ``½·(−dλ/dt)·w(λ)·Σ(ε − ε̂)²``.

    pred: network output ``[B, ...]`` (``v̂`` for ``prediction="v"``, ``ε̂`` for ``"eps"``); x: clean
    data of the same shape; logsnr, neg_dlogsnr_dt: ``[B]``; seed: the seed ``noise_inject`` used, so
    ``ε`` is regenerated, never stored. With ``v̂``: ``ε̂ = σ·x_t + α·v̂`` where ``x_t = α·x + σ·ε``.
    Returns fp32 ``[B]``.
    """
    eps = gaussian_noise(x.shape, seed)
    logsnr = logsnr.detach().float()
    if prediction == "v":
        alpha, sigma = alpha_sigma(logsnr)
        alpha, sigma = per_example(alpha, x), per_example(sigma, x)
        x_t = alpha * x.float() + sigma * eps
        eps_hat = sigma * x_t + alpha * pred.float()
    elif prediction == "eps":
        eps_hat = pred.float()
    else:
        raise ValueError(f"prediction must be 'v' or 'eps', got {prediction!r}")
    squared = (eps - eps_hat).square().reshape(x.shape[0], -1).sum(dim=1)
    return 0.5 * neg_dlogsnr_dt.detach().float() * loss_weight(logsnr, loss_factor, bias) * squared


def fourier_features(logsnr: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    """``[sin(λ·f), cos(λ·f)]``: logsnr ``[B]``, frequencies ``[F]`` → ``[B, 2F]`` fp32."""
    angles = logsnr.float()[:, None] * frequencies.float()[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def logsnr_embed(
    logsnr: torch.Tensor, frequencies: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """First stage of the noise-level embedding: ``SiLU(W·fourier(λ) + b)``.

    logsnr ``[B]``; frequencies ``[F]``; weight ``[N, 2F]``; bias ``[N]`` → ``[B, N]`` in weight.dtype.
    Gradients flow to every input here; the compiled kernel (``ul_fast.kernels.extension_ops``) gives none to
    λ and the frequencies.
    """
    features = fourier_features(logsnr, frequencies).to(weight.dtype)
    return F.silu(F.linear(features, weight, bias))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, scale ``D^-½``.

    q: ``[B, S_q, H, D]``, k, v: ``[B, S_k, H, D]`` (the layout a fused qkv projection produces without
    copies; ``S_k ≠ S_q`` for cross-attention) → ``[B, S_q, H, D]``.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def adaln_layernorm(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """adaLN modulation: ``LayerNorm(x)·(1 + scale) + shift`` with fp32 statistics, no affine.

    x: ``[B, S, C]``; scale, shift: ``[B, C]`` (per example) → ``[B, S, C]`` in x.dtype.
    """
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = normed * (1 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return out.to(x.dtype)
