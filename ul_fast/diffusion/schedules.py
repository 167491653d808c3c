"""Log-SNR schedules ``λ(t)`` on ``t ∈ [0, 1]``, decreasing, with exact endpoints.

Every schedule maps ``t = 0`` to ``logsnr_max`` and ``t = 1`` to ``logsnr_min`` exactly, gives the
positive rate ``−dλ/dt`` that weights the continuous-time ELBO, and inverts ``t(λ)``. Arithmetic is done
in float64 (the tensors are ``[B]``, so this is free) and returned in the dtype of ``t``.

The ELBO's expected value depends on a schedule only through its endpoints; the shape only changes the
variance of the Monte-Carlo estimate (Kingma et al. 2021).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class LogSNRSchedule(ABC):
    """Base class: subclasses implement ``_logsnr`` and ``_neg_dlogsnr_dt`` on float64 tensors."""

    logsnr_min: float
    logsnr_max: float

    def _validate(self) -> None:
        if not (math.isfinite(self.logsnr_min) and math.isfinite(self.logsnr_max)):
            raise ValueError(f"log-SNR endpoints must be finite, got [{self.logsnr_min}, {self.logsnr_max}]")
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max})")

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """``λ(t)``; t in [0, 1], any shape."""
        return self._logsnr(t.double()).to(t.dtype)

    def neg_dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        """``−dλ/dt > 0``: the ELBO's density of noise levels per unit time."""
        return self._neg_dlogsnr_dt(t.double()).to(t.dtype)

    def t_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Inverse ``t(λ)``, by bisection unless a subclass has a closed form (λ is decreasing)."""
        target = logsnr.double()
        lo = torch.zeros_like(target)
        hi = torch.ones_like(target)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self._logsnr(mid) > target  # still too little noise: t must grow
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(logsnr.dtype)

    @abstractmethod
    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t) on float64 t."""

    @abstractmethod
    def _neg_dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        """−dλ/dt on float64 t."""


def _cosine_angles(logsnr_min: float, logsnr_max: float, shift: float) -> tuple[float, float]:
    """Angles ``a`` with ``−2·log tan(a) + shift`` equal to logsnr_max and logsnr_min."""
    return (math.atan(math.exp(-0.5 * (logsnr_max - shift))),
            math.atan(math.exp(-0.5 * (logsnr_min - shift))))


@dataclass(frozen=True)
class CosineSchedule(LogSNRSchedule):
    """Truncated (optionally shifted) cosine: ``λ(t) = −2·log tan(a_0 + t·(a_1 − a_0)) + shift``.

    ``shift = 2·log(base_resolution / resolution)`` gives the resolution-shifted cosine of simple
    diffusion; the angles are chosen so the endpoints stay exact whatever the shift.
    """

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        self._validate()

    @property
    def _angles(self) -> tuple[float, float]:
        return _cosine_angles(self.logsnr_min, self.logsnr_max, self.shift)

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        a0, a1 = self._angles
        return -2.0 * torch.log(torch.tan(a0 + t * (a1 - a0))) + self.shift

    def _neg_dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        a0, a1 = self._angles
        # d/da [−2 log tan a] = −2 / (sin a · cos a) = −4 / sin 2a
        return 4.0 * (a1 - a0) / torch.sin(2.0 * (a0 + t * (a1 - a0)))

    def t_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        a0, a1 = self._angles
        angle = torch.atan(torch.exp(-0.5 * (logsnr.double() - self.shift)))
        return ((angle - a0) / (a1 - a0)).to(logsnr.dtype)


def resolution_shift(resolution: int, base_resolution: int) -> float:
    """The log-SNR shift ``2·log(base / resolution)`` (simple diffusion, Hoogeboom et al. 2023)."""
    if resolution <= 0 or base_resolution <= 0:
        raise ValueError(f"resolutions must be positive, got {resolution} and {base_resolution}")
    return 2.0 * math.log(base_resolution / resolution)


@dataclass(frozen=True)
class InterpolatedCosineSchedule(LogSNRSchedule):
    """Interpolated shifted cosine (SiD2): ``λ(t) = (1 − t)·λ_hi(t) + t·λ_lo(t)``.

    ``λ_hi`` and ``λ_lo`` are shifted cosines with shifts ``shift_high_snr`` (used near t = 0) and
    ``shift_low_snr`` (near t = 1) and the same exact endpoints, so the blend keeps them too.
    """

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift_high_snr: float = 0.0
    shift_low_snr: float = 0.0

    def __post_init__(self) -> None:
        self._validate()

    def _parts(self) -> tuple[CosineSchedule, CosineSchedule]:
        return (CosineSchedule(self.logsnr_min, self.logsnr_max, self.shift_high_snr),
                CosineSchedule(self.logsnr_min, self.logsnr_max, self.shift_low_snr))

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        high, low = self._parts()
        return (1.0 - t) * high._logsnr(t) + t * low._logsnr(t)

    def _neg_dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        high, low = self._parts()
        # −d/dt[(1−t)·λ_h + t·λ_l] = λ_h − λ_l + (1−t)·(−λ_h') + t·(−λ_l')
        return (high._logsnr(t) - low._logsnr(t) + (1.0 - t) * high._neg_dlogsnr_dt(t)
                + t * low._neg_dlogsnr_dt(t))


@dataclass(frozen=True)
class LinearSchedule(LogSNRSchedule):
    """``λ(t) = λ_max + t·(λ_min − λ_max)``: uniform density over log-SNR."""

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    def __post_init__(self) -> None:
        self._validate()

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        return self.logsnr_max + t * (self.logsnr_min - self.logsnr_max)

    def _neg_dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, self.logsnr_max - self.logsnr_min)

    def t_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        return ((self.logsnr_max - logsnr.double()) / (self.logsnr_max - self.logsnr_min)).to(logsnr.dtype)


SCHEDULE_KINDS = ("cosine", "shifted_cosine", "interpolated_cosine", "linear")


def make_schedule(
    kind: str,
    logsnr_min: float,
    logsnr_max: float,
    resolution: int | None = None,
    base_resolution: int | None = None,
    low_snr_base_resolution: int | None = None,
) -> LogSNRSchedule:
    """Build a schedule by name (the config's ``schedule`` field).

    ``shifted_cosine`` shifts by ``2·log(base_resolution / resolution)``; ``interpolated_cosine`` blends
    that shift (high SNR) with ``2·log(low_snr_base_resolution / resolution)`` (low SNR).
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULE_KINDS}")
    if kind == "cosine":
        return CosineSchedule(logsnr_min, logsnr_max)
    if kind == "linear":
        return LinearSchedule(logsnr_min, logsnr_max)
    if resolution is None or base_resolution is None:
        raise ValueError(f"schedule {kind!r} needs resolution and base_resolution")
    if kind == "shifted_cosine":
        return CosineSchedule(logsnr_min, logsnr_max, resolution_shift(resolution, base_resolution))
    if low_snr_base_resolution is None:
        raise ValueError("schedule 'interpolated_cosine' needs low_snr_base_resolution")
    return InterpolatedCosineSchedule(
        logsnr_min, logsnr_max, resolution_shift(resolution, base_resolution),
        resolution_shift(resolution, low_snr_base_resolution))
