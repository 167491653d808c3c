"""Diffusion math: log-SNR schedules and variance-preserving identities."""

from ul_fast.diffusion.math import (
    PREDICTIONS,
    alpha_sigma,
    antithetic_times,
    antithetic_times_from,
    clamped_logistic,
    clamped_logistic_from,
    coefficients,
    eps_from_v,
    per_example,
    prior_kl,
    sigmoid_crossover,
    v_target,
    x_from_eps,
    x_from_v,
)
from ul_fast.diffusion.schedules import (
    SCHEDULE_KINDS,
    CosineSchedule,
    InterpolatedCosineSchedule,
    LinearSchedule,
    LogSNRSchedule,
    make_schedule,
    resolution_shift,
)

__all__ = [
    "PREDICTIONS", "SCHEDULE_KINDS", "CosineSchedule", "InterpolatedCosineSchedule", "LinearSchedule", "LogSNRSchedule",
    "alpha_sigma", "antithetic_times", "antithetic_times_from", "clamped_logistic", "clamped_logistic_from",
    "coefficients", "eps_from_v", "make_schedule", "per_example", "prior_kl", "resolution_shift", "sigmoid_crossover",
    "v_target", "x_from_eps", "x_from_v",
]
