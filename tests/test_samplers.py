"""Samplers with the analytic optimal denoiser on Gaussian data reproduce the data distribution."""

import math

import pytest
import torch

from ul_fast import ops
from ul_fast.config import load_config
from ul_fast.diffusion import CosineSchedule
from ul_fast.model import UnifiedLatents
from ul_fast.sampling import SAMPLERS, SPACINGS, logsnr_grid, sample, sample_ancestral, sample_ddim

MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0])
STD = torch.tensor([0.3, 1.0, 0.05, 0.8])


def optimal_denoiser(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    alpha, sigma = (c[:, None] for c in ops.alpha_sigma(logsnr))
    return MEAN + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x_t - alpha * MEAN)


# Ancestral steps plug x̂ = E[x | x_s] into q(x_t | x_s, x), ignoring the spread of x given x_s: an O(step)
# under-dispersion, largest for the narrowest dimension (3.4% for std 0.05 at 1024 steps, 0.3 at 64).
@pytest.mark.parametrize("sampler,std_rtol", [("ddim", 0.025), ("ancestral", 0.05)])
def test_sampler_reproduces_gaussian_mean_and_variance(sampler, std_rtol):
    g = torch.Generator().manual_seed(0)
    schedule = CosineSchedule(-15.0, 15.0)
    x = torch.randn(20000, 4, generator=g)
    # 1024 steps: the discretisation error (a few % at 64 steps, shrinking with steps) stays below the
    # sampling error of 20k draws (~0.5% on a standard deviation).
    out = sample(sampler, optimal_denoiser, x, logsnr_grid(schedule, 1024), g, disable=True)
    torch.testing.assert_close(out.mean(0), MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(out.std(0), STD, rtol=std_rtol, atol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_discretisation_error_shrinks_with_steps(sampler):
    errors = []
    for steps in (16, 64, 256):
        g = torch.Generator().manual_seed(0)
        out = sample(sampler, optimal_denoiser, torch.randn(20000, 4, generator=g),
                     logsnr_grid(CosineSchedule(-15.0, 15.0), steps), g, disable=True)
        errors.append(((out.std(0) - STD).abs() / STD).max().item())
    assert errors[0] > errors[1] > errors[2]


def test_stopping_at_an_intermediate_logsnr_gives_the_noisy_marginal():
    """The base model stops at λ_z(0): its output must be distributed like α·x + σ·ε there."""
    g = torch.Generator().manual_seed(1)
    schedule = CosineSchedule(-15.0, 5.0)
    out = sample_ddim(optimal_denoiser, torch.randn(20000, 4, generator=g), logsnr_grid(schedule, 512), disable=True)
    alpha, sigma = ops.alpha_sigma(torch.tensor([5.0]))
    expected_std = (alpha**2 * STD**2 + sigma**2).sqrt()
    torch.testing.assert_close(out.mean(0), alpha * MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(out.std(0), expected_std, rtol=0.04, atol=0)


def test_callback_and_grid_checks():
    seen = []
    grid = logsnr_grid(CosineSchedule(-15.0, 5.0), 5)
    assert grid.shape == (6,) and grid[0].item() == pytest.approx(-15.0) and grid[-1].item() == pytest.approx(5.0)
    sample_ancestral(optimal_denoiser, torch.randn(8, 4), grid, callback=lambda info: seen.append(info["i"]),
                     disable=True)
    assert seen == list(range(5))
    with pytest.raises(ValueError, match="increasing"):
        sample_ddim(optimal_denoiser, torch.randn(8, 4), grid.flip(0), disable=True)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("euler", optimal_denoiser, torch.randn(8, 4), grid)
    with pytest.raises(ValueError, match="steps"):
        logsnr_grid(CosineSchedule(-15.0, 5.0), 0)


def exact_flow(x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's exact solution for Gaussian data: the affine map between the marginals at the
    grid's two ends (per dimension, quantile to quantile)."""
    (a0, s0), (a1, s1) = (tuple(c.double() for c in ops.alpha_sigma(grid[[i]].double())) for i in (0, -1))
    mean, std = MEAN.double(), STD.double()
    return a1 * mean + ((a1**2 * std**2 + s1**2) / (a0**2 * std**2 + s0**2)).sqrt() * (x0 - a0 * mean)


def optimal_denoiser_fp64(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    alpha, sigma = (c[:, None].double() for c in ops.alpha_sigma(logsnr.double()))
    mean, std = MEAN.double(), STD.double()
    return mean + alpha * std**2 / (alpha**2 * std**2 + sigma**2) * (x_t - alpha * mean)


def flow_error(sampler: str, grid: torch.Tensor) -> float:
    """Max error against :func:`exact_flow` on ``grid`` (float64 throughout, so rounding is far below the errors)."""
    eps = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a0, s0 = (c.double() for c in ops.alpha_sigma(grid[:1].double()))
    x0 = a0 * MEAN.double() + (a0**2 * STD.double()**2 + s0**2).sqrt() * eps  # the exact marginal at λ_0
    out = sample(sampler, optimal_denoiser_fp64, x0, grid, disable=True)
    return (out - exact_flow(x0, grid)).abs().max().item()


def flow_errors(sampler: str, steps: tuple[int, ...], spacing: str = "logsnr") -> list[float]:
    """:func:`flow_error` on grids of ``steps`` steps of a cosine schedule on [−10, 10]."""
    return [flow_error(sampler, logsnr_grid(CosineSchedule(-10.0, 10.0), n, spacing)) for n in steps]


# Measured orders on this problem (log2 of the error ratio from 32 to 64 to 128 log-SNR-uniform steps):
# ddim 0.97, 0.99; dpmpp_2m 1.96, 1.99; heun 1.94, 1.97. The bands are wide enough for any platform's rounding
# (the errors are > 1e-3, rounding ~1e-15) and narrow enough to tell first from second order.
@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpmpp_2m", 2), ("heun", 2)])
def test_deterministic_solvers_converge_to_the_exact_flow_with_their_order(sampler, order):
    errors = flow_errors(sampler, (32, 64, 128))
    for coarse, fine in zip(errors, errors[1:]):
        assert order - 0.25 < math.log2(coarse / fine) < order + 0.25, (sampler, errors)


def test_second_order_solvers_beat_ddim_at_equal_network_evaluations():
    ddim = flow_errors("ddim", (16, 32))
    assert flow_errors("dpmpp_2m", (16, 32)) < ddim  # one evaluation per step, like DDIM
    assert flow_errors("heun", (8, 16)) < ddim  # two per step: half the steps


def test_last_step_of_dpmpp_2m_is_ddim():
    """dpmpp_2m's last step is one DDIM step from the state it reached at the grid's last point but one."""
    grid = logsnr_grid(CosineSchedule(-15.0, 15.0), 6)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    states = []
    out = sample("dpmpp_2m", optimal_denoiser_fp64, x, grid, callback=lambda info: states.append(info["x"]),
                 disable=True)
    # The two write the step differently (exp(−h) from the grid, or α and σ); the samplers take α and σ in float32
    # (relative error ~1e-7), so they agree to ~1e-7 of the O(1) states. A second-order last step is 0.08 away.
    torch.testing.assert_close(out, sample("ddim", optimal_denoiser_fp64, states[-2], grid[-2:], disable=True),
                               rtol=0, atol=1e-6)


def shipped_schedules(preset: str, *overrides: str) -> dict[str, object]:
    """The latent and pixel schedules a preset's model samples on (built on the meta device: no weights)."""
    with torch.device("meta"):
        model = UnifiedLatents(load_config(preset, list(overrides)).model)
    return {"latent": model.sample_schedule, "pixel": model.pixel_schedule}


# DPM-Solver++(2M) against DDIM on the grids the presets sample on, with the exact Gaussian flow as the reference:
# tiny (32 px), imagenet512-paper (512 px: the longest last step, h ≈ 8) and tiny at 64 px (the pixel_base_resolution,
# where the shifted cosine is the plain one). With a second-order last step, dpmpp_2m was worse than DDIM on the
# 512-px pixel grid uniform in time (8 steps: 2.48 against 1.51) and on the plain cosine (0.79 against 0.44); with a
# first-order last step it is 1.47 and 0.17. The errors are > 1e-2 and float64 rounding ~1e-15, so the comparisons are
# exact on any platform.
@pytest.mark.parametrize("preset, overrides", [("tiny", ()), ("imagenet512-paper", ()),
                                               ("tiny", ("model.image_size=64",))], ids=["32px", "512px", "64px"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpmpp_2m_beats_ddim_on_the_shipped_grids(preset, overrides, spacing):
    for chain, schedule in shipped_schedules(preset, *overrides).items():
        for steps in (8, 16, 32):
            grid = logsnr_grid(schedule, steps, spacing)
            dpmpp, ddim = flow_error("dpmpp_2m", grid), flow_error("ddim", grid)
            assert dpmpp < ddim, (chain, steps, dpmpp, ddim)
            if chain == "pixel" and overrides and spacing == "time":  # the plain cosine: the case
                assert dpmpp < 0.5 * ddim, (steps, dpmpp, ddim)


def test_first_step_of_dpmpp_2m_is_ddim():
    grid = logsnr_grid(CosineSchedule(-10.0, 10.0), 1)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sample("dpmpp_2m", optimal_denoiser, x, grid, disable=True),
                               sample("ddim", optimal_denoiser, x, grid, disable=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_grids_span_the_schedule_in_either_spacing(spacing):
    schedule = CosineSchedule(-12.0, 6.0)
    grid = logsnr_grid(schedule, 8, spacing)
    assert grid.shape == (9,) and bool((grid.diff() > 0).all())
    assert grid[0].item() == pytest.approx(-12.0, abs=1e-4) and grid[-1].item() == pytest.approx(6.0, abs=1e-4)
    if spacing == "logsnr":
        torch.testing.assert_close(grid.diff(), torch.full((8,), 18.0 / 8))
    with pytest.raises(ValueError, match="spacing must be one of"):
        logsnr_grid(schedule, 8, "karras")
