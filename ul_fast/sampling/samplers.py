"""Samplers as plain functions (k-diffusion style) over a decreasing-noise log-SNR grid.

``denoise(x_t, logsnr) -> x̂`` takes the current state ``[B, ...]`` and a per-example log-SNR ``[B]``
and predicts the clean data. ``logsnrs`` is the increasing grid ``[λ_0 < λ_1 < … < λ_N]`` from the
noisiest level to the level to stop at; the sampler returns the state at ``λ_N`` (for the base model
that is the noisy latent ``z_0`` at ``λ_z(0)``, which is what the decoder was trained on).

Every sampler is called as ``sampler(denoise, x, logsnrs, generator=…, callback=…, disable=…)``; to add
one, write it and list it in ``_SAMPLER_FUNCTIONS`` (which names it for :func:`sample`, the config and
the CLI).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ul_fast.diffusion import LogSNRSchedule, coefficients

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def logsnr_grid(schedule: LogSNRSchedule, steps: int) -> torch.Tensor:
    """``steps + 1`` log-SNRs from ``λ(1)`` to ``λ(0)``, uniform in ``t`` (fp32, increasing)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return schedule.logsnr(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)).float()


def _check_grid(logsnrs: torch.Tensor) -> None:
    if logsnrs.dim() != 1 or logsnrs.numel() < 2 or not bool((logsnrs[1:] > logsnrs[:-1]).all()):
        raise ValueError("logsnrs must be a strictly increasing 1-D grid of at least 2 log-SNRs")


def _steps(logsnrs: torch.Tensor, x: torch.Tensor, desc: str, disable: bool):
    """Yield ``(i, λ_s [B], λ_t [B])`` for each step of the grid, with a progress bar."""
    _check_grid(logsnrs)
    for i in tqdm(range(len(logsnrs) - 1), disable=disable, desc=desc, leave=False):
        yield i, logsnrs[i].expand(x.shape[0]).to(x.device), logsnrs[i + 1].expand(x.shape[0]).to(x.device)


@torch.no_grad()
def sample_ddim(denoise: Denoiser, x: torch.Tensor, logsnrs: torch.Tensor, callback: Callback | None = None,
                disable: bool = False, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Deterministic DDIM: ``x_t = α_t·x̂ + σ_t·ε̂`` with ``ε̂ = (x_s − α_s·x̂)/σ_s``.

    x: the start state at ``logsnrs[0]`` (usually ``N(0, I)``). ``generator`` is unused (nothing is
    drawn); it is accepted so that every sampler has one signature.
    """
    for i, lam_s, lam_t in _steps(logsnrs, x, "ddim", disable):
        denoised = denoise(x, lam_s)
        alpha_s, sigma_s = coefficients(lam_s, x)
        alpha_t, sigma_t = coefficients(lam_t, x)
        eps = (x - alpha_s * denoised) / sigma_s
        x = alpha_t * denoised + sigma_t * eps
        if callback is not None:
            callback({"i": i, "logsnr": float(logsnrs[i]), "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_ancestral(denoise: Denoiser, x: torch.Tensor, logsnrs: torch.Tensor,
                     generator: torch.Generator | None = None, callback: Callback | None = None,
                     disable: bool = False) -> torch.Tensor:
    """Ancestral sampling from the VDM posterior ``q(x_t | x_s, x = x̂)`` (``λ_t > λ_s``).

    With ``r = e^{λ_s − λ_t}``: mean ``r·(α_t/α_s)·x_s + α_t·(1 − r)·x̂``, variance ``(1 − r)·σ_t²``.
    """
    for i, lam_s, lam_t in _steps(logsnrs, x, "ancestral", disable):
        denoised = denoise(x, lam_s)
        alpha_s, _ = coefficients(lam_s, x)
        alpha_t, sigma_t = coefficients(lam_t, x)
        ratio = torch.exp(logsnrs[i] - logsnrs[i + 1]).item()
        mean = ratio * (alpha_t / alpha_s) * x + alpha_t * (1.0 - ratio) * denoised
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + (1.0 - ratio) ** 0.5 * sigma_t * noise
        if callback is not None:
            callback({"i": i, "logsnr": float(logsnrs[i]), "x": x, "denoised": denoised})
    return x


_SAMPLER_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"ddim": sample_ddim, "ancestral": sample_ancestral}

SAMPLERS = tuple(_SAMPLER_FUNCTIONS)
"""The sampler names: ``sample``'s ``name``, the config's ``sample.sampler``, the CLI's ``--sampler``."""


def sample(name: str, denoise: Denoiser, x: torch.Tensor, logsnrs: torch.Tensor,
           generator: torch.Generator | None = None, callback: Callback | None = None,
           disable: bool = False) -> torch.Tensor:
    """Run the sampler called ``name`` (one of :data:`SAMPLERS`)."""
    if name not in _SAMPLER_FUNCTIONS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    return _SAMPLER_FUNCTIONS[name](denoise, x, logsnrs, generator=generator, callback=callback, disable=disable)
