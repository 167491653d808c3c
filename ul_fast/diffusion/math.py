"""Variance-preserving diffusion identities (VDM notation, Kingma et al. 2021).

``x_t = α·x + σ·ε``, ``α² = sigmoid(λ)``, ``σ² = sigmoid(−λ)``, ``v = α·ε − σ·x``. Per-example
coefficients ``α, σ`` have shape ``[B]`` and broadcast over the example's dimensions.
The weighted ELBO integrand itself is the op :func:`ul_fast.ops.diffusion_loss`.
"""

from __future__ import annotations

import math

import torch

PREDICTIONS = ("v", "eps")
"""What a denoising network outputs: ``v = α·ε − σ·x`` (the default) or the noise ``ε``."""


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``α = sqrt(sigmoid(λ))``, ``σ = sqrt(sigmoid(−λ))`` in fp32 (variance preserving)."""
    logsnr = logsnr.float()
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` → ``[B, 1, …, 1]`` broadcasting over ``like``'s example dims (dtype unchanged)."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def coefficients(logsnr: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``α, σ`` for per-example ``logsnr [B]``, shaped to broadcast over ``like`` and in its dtype."""
    alpha, sigma = alpha_sigma(logsnr)
    return per_example(alpha, like).to(like.dtype), per_example(sigma, like).to(like.dtype)


def x_from_v(x_t: torch.Tensor, v: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """``x̂ = α·x_t − σ·v̂``."""
    alpha, sigma = coefficients(logsnr, x_t)
    return alpha * x_t - sigma * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """``ε̂ = σ·x_t + α·v̂``."""
    alpha, sigma = coefficients(logsnr, x_t)
    return sigma * x_t + alpha * v


def v_target(x: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """``v = α·ε − σ·x``."""
    alpha, sigma = coefficients(logsnr, x)
    return alpha * eps - sigma * x


def x_from_eps(x_t: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """``x̂ = (x_t − σ·ε̂) / α``."""
    alpha, sigma = coefficients(logsnr, x_t)
    return (x_t - sigma * eps) / alpha


def prior_kl(x: torch.Tensor, logsnr: float) -> torch.Tensor:
    """``KL[q(x_λ|x) ‖ N(0, I)]`` in nats per example, of the noisy ``x_λ = α·x + σ·ε`` at log-SNR ``λ``.

    ``½·Σ(α²·x² + σ² − log σ² − 1)`` summed over all but the batch dimension; fp32 ``[B]``. At a diffusion
    model's ``λ(1)`` it is its ELBO's t = 1 term; at ``λ_z(0)`` it is the rate of a normal (VAE) prior.
    The constants are computed in float64 on the host from the Python ``logsnr`` (no tensor is read back, so
    the function traces into one graph under ``torch.compile``).
    """
    lam = float(logsnr)
    alpha_sq, sigma_sq = _sigmoid(lam), _sigmoid(-lam)
    constant = sigma_sq - math.log(sigma_sq) - 1.0
    x = x.float().reshape(x.shape[0], -1)
    return 0.5 * (alpha_sq * x.square() + constant).sum(dim=1)


def _sigmoid(value: float) -> float:
    """``1 / (1 + e^−v)`` in float64 without overflow for large ``|v|``."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    e = math.exp(value)
    return e / (1.0 + e)


def antithetic_times(batch: int, device: torch.device | str, generator: torch.Generator | None = None,
                     ) -> torch.Tensor:
    """Low-discrepancy times ``t_i = (u + i/B) mod 1`` with one ``u ~ U(0, 1)``; fp32 ``[B]``."""
    return antithetic_times_from(torch.rand((), device=device, generator=generator), batch)


def antithetic_times_from(u: torch.Tensor, batch: int) -> torch.Tensor:
    """:func:`antithetic_times` of a given offset ``u`` (fp32 ``[]`` in [0, 1)): ``t_i = (u + i/B) mod 1``."""
    return torch.remainder(u + torch.arange(batch, device=u.device, dtype=torch.float32) / batch, 1.0)


def sigmoid_crossover(loss_factor: float, bias: float) -> float:
    """The log-SNR ``λ* = b + log(c_lf − 1)`` where ``c_lf·sigmoid(b − λ) = 1`` (needs ``c_lf > 1``)."""
    if loss_factor <= 1:
        raise ValueError(f"the crossover exists only for loss_factor > 1, got {loss_factor}")
    return bias + math.log(loss_factor - 1.0)


def clamped_logistic(batch: int, loc: float, upper: float, device: torch.device | str,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``λ = min(L, upper)`` with ``L ~ Logistic(loc, 1)`` drawn by inverse CDF; fp32 ``[B]``.

    The mass of ``L`` above ``upper`` sits at ``upper`` (it is not renormalised away), so the survival
    function is exactly ``P(λ ≥ l) = sigmoid(loc − l)`` for every ``l ≤ upper``: the unweighted ELBO up to
    a random ``λ_max`` drawn this way is, in expectation, the ``sigmoid(loc − λ)``-weighted loss on
    ``λ ≤ upper`` (Kingma & Gao 2023).
    """
    u = torch.rand(batch, device=device, generator=generator, dtype=torch.float64)
    return clamped_logistic_from(u, loc, upper)


def clamped_logistic_from(u: torch.Tensor, loc: float, upper: float) -> torch.Tensor:
    """:func:`clamped_logistic` of given uniforms ``u`` (float64 ``[B]`` in [0, 1)); fp32 ``[B]``."""
    u = u.clamp_min(1e-12)
    return (loc + torch.log(u) - torch.log1p(-u)).clamp_max(upper).float()
