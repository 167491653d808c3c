"""The Monte-Carlo ELBO on Gaussian data with the analytic optimal denoiser equals the exact value.

For ``x ~ N(μ, s²)`` per dimension and an optimal denoiser, the I-MMSE relation gives, per dimension,
``E[L_diffusion + KL_1] = ½·log(1 + e^{λ_max}·s²) + KL(N(α_1 μ, α_1² s² + σ_1²) ‖ N(0, 1))``: the first
term is ``I(x; z_0) = E_x KL[q(z_0|x) ‖ q(z_0)]``, the information the noisy latent carries. The value
depends on the schedule only through its endpoints.
"""

import math

import pytest
import torch

from ul_fast import ops
from ul_fast.diffusion import CosineSchedule, LinearSchedule, antithetic_times, prior_kl

DIMS, MEAN, STD = 8, 0.4, 0.7
LOGSNR_MIN, LOGSNR_MAX = -15.0, 5.0


def exact_value() -> float:
    snr_max = math.exp(LOGSNR_MAX)
    alpha_sq, sigma_sq = 1 / (1 + math.exp(-LOGSNR_MIN)), 1 / (1 + math.exp(LOGSNR_MIN))
    variance = alpha_sq * STD**2 + sigma_sq
    kl_marginal = 0.5 * (variance + alpha_sq * MEAN**2 - 1 - math.log(variance))
    return DIMS * (0.5 * math.log(1 + snr_max * STD**2) + kl_marginal)


def optimal_v(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    alpha, sigma = (c[:, None] for c in ops.alpha_sigma(logsnr))
    x_hat = MEAN + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x_t - alpha * MEAN)
    return (alpha * x_t - x_hat) / sigma  # x̂ = α·x_t − σ·v̂


def elbo_samples(schedule, batch: int, generator: torch.Generator) -> torch.Tensor:
    x = MEAN + STD * torch.randn(batch, DIMS, generator=generator, dtype=torch.float32)
    t = antithetic_times(batch, "cpu", generator)
    logsnr = schedule.logsnr(t)
    seed = ops.draw_seed("cpu", generator)
    x_t, _ = ops.noise_inject(x, logsnr, seed)
    loss = ops.diffusion_loss(optimal_v(x_t, logsnr), x, logsnr, schedule.neg_dlogsnr_dt(t), seed, "v")
    return (loss + prior_kl(x, schedule.logsnr_min)).double()


@pytest.mark.parametrize("schedule", [CosineSchedule(LOGSNR_MIN, LOGSNR_MAX), LinearSchedule(LOGSNR_MIN, LOGSNR_MAX)],
                         ids=["cosine", "linear"])
def test_monte_carlo_elbo_matches_exact_value(schedule):
    samples = elbo_samples(schedule, 40000, torch.Generator().manual_seed(1))
    mean, stderr = samples.mean().item(), (samples.std() / math.sqrt(samples.numel())).item()
    assert abs(mean - exact_value()) < 4 * stderr + 1e-3, (mean, stderr, exact_value())


def test_two_shapes_same_endpoints_same_expectation():
    g = torch.Generator().manual_seed(2)
    a = elbo_samples(CosineSchedule(LOGSNR_MIN, LOGSNR_MAX), 40000, g)
    b = elbo_samples(LinearSchedule(LOGSNR_MIN, LOGSNR_MAX), 40000, g)
    stderr = math.sqrt(a.var() / a.numel() + b.var() / b.numel())
    assert abs(a.mean() - b.mean()) < 4 * stderr


def test_a_worse_denoiser_gives_a_larger_bound():
    """The bound is tight only at the optimum: a biased denoiser costs nats."""
    schedule = CosineSchedule(LOGSNR_MIN, LOGSNR_MAX)
    g = torch.Generator().manual_seed(3)
    x = MEAN + STD * torch.randn(20000, DIMS, generator=g)
    t = antithetic_times(x.shape[0], "cpu", g)
    logsnr, rate, seed = schedule.logsnr(t), schedule.neg_dlogsnr_dt(t), ops.draw_seed("cpu", g)
    x_t, _ = ops.noise_inject(x, logsnr, seed)
    good = ops.diffusion_loss(optimal_v(x_t, logsnr), x, logsnr, rate, seed).mean()
    bad = ops.diffusion_loss(optimal_v(x_t, logsnr) + 0.2, x, logsnr, rate, seed).mean()
    assert bad > good + 0.1
