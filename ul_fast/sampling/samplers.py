"""Samplers as plain functions (k-diffusion style) over a decreasing-noise log-SNR grid.

Four samplers, all in the log-SNR variable λ = log(α²/σ²):

* ``ddim``: deterministic, first order (one network evaluation per step);
* ``ancestral``: stochastic, from the VDM posterior (one per step);
* ``dpmpp_2m``: DPM-Solver++(2M) (Lu et al. 2022), second-order multistep: it reuses the previous step's
  prediction, so still one evaluation per step; its first and last steps are DDIM;
* ``heun``: second-order predictor-corrector (a DDIM step, then the trapezoidal rule on the two predictions),
  two evaluations per step.

The deterministic ones integrate the probability-flow ODE written as an exponential integrator in
``h = (λ_t − λ_s)/2`` (DPM-Solver's λ is log(α/σ), half of ours): with a data prediction ``D``,
``x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·D``, exact for the linear part; ``D = x̂_s`` is DDIM.

``denoise(x_t, logsnr) -> x̂`` takes the current state ``[B, ...]`` and a per-example log-SNR ``[B]``
and predicts the clean data. ``logsnrs`` is the increasing grid ``[λ_0 < λ_1 < … < λ_N]`` from the
noisiest level to the level to stop at; the sampler returns the state at ``λ_N`` (for the base model
that is the noisy latent ``z_0`` at ``λ_z(0)``, which is what the decoder was trained on).

Every sampler is called as ``sampler(denoise, x, logsnrs, generator=…, callback=…, disable=…)``; to add
one, write it and list it in ``_SAMPLER_FUNCTIONS`` (which names it for :func:`sample`, the config and
the CLI).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ul_fast.diffusion import LogSNRSchedule, coefficients

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


SPACINGS = ("time", "logsnr")
"""Step grids: ``time``, uniform in the schedule's ``t`` (its own spacing); ``logsnr``, uniform in λ."""


def logsnr_grid(schedule: LogSNRSchedule, steps: int, spacing: str = "time") -> torch.Tensor:
    """``steps + 1`` log-SNRs from ``λ(1)`` to ``λ(0)`` (fp32, increasing), uniform in ``t`` or in ``λ``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if spacing == "time":
        return schedule.logsnr(t).float()
    ends = schedule.logsnr(t[[0, -1]])
    return torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64).float()


def _check_grid(logsnrs: torch.Tensor) -> None:
    if logsnrs.dim() != 1 or logsnrs.numel() < 2 or not bool((logsnrs[1:] > logsnrs[:-1]).all()):
        raise ValueError("logsnrs must be a strictly increasing 1-D grid of at least 2 log-SNRs")


def _steps(logsnrs: torch.Tensor, x: torch.Tensor, desc: str, disable: bool):
    """Yield ``(i, λ_s [B], λ_t [B])`` for each step of the grid, with a progress bar. The levels are filled on
    ``x``'s device from the host's grid, not copied from it: nothing in a chain then waits for the host, and a
    whole chain can be captured in a CUDA graph."""
    _check_grid(logsnrs)
    levels = logsnrs.tolist()
    for i in tqdm(range(len(levels) - 1), disable=disable, desc=desc, leave=False):
        yield i, _level(levels[i], x), _level(levels[i + 1], x)


def _level(logsnr: float, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32 copies of the log-SNR ``logsnr`` on ``x``'s device."""
    return torch.full((x.shape[0],), logsnr, device=x.device, dtype=torch.float32)


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


def _exponential_step(x: torch.Tensor, data: torch.Tensor, lam_s: torch.Tensor, lam_t: torch.Tensor,
                      h: float) -> torch.Tensor:
    """``x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·D``: the exponential-integrator step with data prediction ``D``."""
    _, sigma_s = coefficients(lam_s, x)
    alpha_t, sigma_t = coefficients(lam_t, x)
    return (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * data


def _half_steps(logsnrs: torch.Tensor) -> list[float]:
    """``h_i = (λ_{i+1} − λ_i)/2`` in float64: DPM-Solver's step in log(α/σ)."""
    return [float(d) / 2 for d in logsnrs.double().diff()]


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: torch.Tensor, logsnrs: torch.Tensor,
                    generator: torch.Generator | None = None, callback: Callback | None = None,
                    disable: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M): ``D = (1 + 1/(2r))·x̂_i − 1/(2r)·x̂_{i−1}`` with ``r = h_{i−1}/h_i``, then the
    exponential step. The first step (no previous prediction) and the last are DDIM (first order).

    The last step is first order as in k-diffusion's ``sample_dpmpp_2m`` (its step to σ = 0) and DPM-Solver's
    ``lower_order_final``. A grid uniform in time ends in one long step: on the shipped pixel schedules ``h``
    is 4–9 there against 0.7–0.9 before it, so the extrapolation weight ``1/(2r)`` would be 3–5 and overshoot.
    One first-order step adds an O(h²) error, so the solver stays second order. ``generator`` is unused."""
    h = _half_steps(logsnrs)
    previous = None
    for i, lam_s, lam_t in _steps(logsnrs, x, "dpmpp_2m", disable):
        denoised = denoised_extrapolated = denoise(x, lam_s)
        if previous is not None and i < len(h) - 1:
            r = h[i - 1] / h[i]
            denoised_extrapolated = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = _exponential_step(x, denoised_extrapolated, lam_s, lam_t, h[i])
        previous = denoised
        if callback is not None:
            callback({"i": i, "logsnr": float(logsnrs[i]), "x": x, "denoised": denoised})
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, x: torch.Tensor, logsnrs: torch.Tensor,
                generator: torch.Generator | None = None, callback: Callback | None = None,
                disable: bool = False) -> torch.Tensor:
    """Heun in λ: a DDIM step predicts ``x̃_t``; the step is redone with the mean of ``x̂(x_s, λ_s)`` and
    ``x̂(x̃_t, λ_t)`` (the trapezoidal rule; local error O(h³)). Two evaluations per step; ``generator`` unused."""
    h = _half_steps(logsnrs)
    for i, lam_s, lam_t in _steps(logsnrs, x, "heun", disable):
        denoised = denoise(x, lam_s)
        predicted = _exponential_step(x, denoised, lam_s, lam_t, h[i])
        corrected = 0.5 * (denoised + denoise(predicted, lam_t))
        x = _exponential_step(x, corrected, lam_s, lam_t, h[i])
        if callback is not None:
            callback({"i": i, "logsnr": float(logsnrs[i]), "x": x, "denoised": corrected})
    return x


_SAMPLER_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim, "ancestral": sample_ancestral, "dpmpp_2m": sample_dpmpp_2m, "heun": sample_heun}
EVALUATIONS_PER_STEP = {"ddim": 1, "ancestral": 1, "dpmpp_2m": 1, "heun": 2}
"""Network evaluations per step of each sampler (a sampler's cost is ``steps ×`` this)."""

SAMPLERS = tuple(_SAMPLER_FUNCTIONS)
"""The sampler names: ``sample``'s ``name``, the config's ``sample.sampler``, the CLI's ``--sampler``."""


def sample(name: str, denoise: Denoiser, x: torch.Tensor, logsnrs: torch.Tensor,
           generator: torch.Generator | None = None, callback: Callback | None = None,
           disable: bool = False) -> torch.Tensor:
    """Run the sampler called ``name`` (one of :data:`SAMPLERS`)."""
    if name not in _SAMPLER_FUNCTIONS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    return _SAMPLER_FUNCTIONS[name](denoise, x, logsnrs, generator=generator, callback=callback, disable=disable)
