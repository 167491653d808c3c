"""The single entry points model code calls. Each op checks its arguments (the one place they are checked:
the kernels assume valid input), then runs the fast kernel for the tensors' device type where there is one
that supports the arguments (see :mod:`ul_fast.ops.dispatch`), else the reference in
:mod:`ul_fast.ops.reference`, which is the specification.
"""

from __future__ import annotations

import torch

from ul_fast.diffusion import PREDICTIONS
from ul_fast.ops import dispatch, reference
from ul_fast.ops.dispatch import fast_kernel

__all__ = [
    "adaln_layernorm",
    "alpha_sigma",
    "attention",
    "diffusion_loss",
    "dispatch",
    "draw_seed",
    "fourier_features",
    "gaussian_noise",
    "logsnr_embed",
    "noise_inject",
    "reference",
]

alpha_sigma = reference.alpha_sigma
fourier_features = reference.fourier_features
gaussian_noise = reference.gaussian_noise
SEED_HIGH = 2**62


def draw_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh noise seed as an int64 tensor ``[1]`` on ``device``, drawn from torch's generator.

    Drawing on the device (not from the host clock) keeps ``torch.manual_seed`` reproducible and makes
    the noise ops CUDA-graph safe. Any int64 is a valid seed (its 64-bit pattern is the Philox key, on every
    backend); draws stay below ``SEED_HIGH``.
    """
    return torch.randint(0, SEED_HIGH, (1,), device=device, generator=generator, dtype=torch.int64)


def _check_per_example(name: str, values: torch.Tensor, x: torch.Tensor) -> None:
    if values.dim() != 1 or values.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape [B] = [{x.shape[0]}] (one value per example), "
                         f"got {tuple(values.shape)}")
    if values.device != x.device:
        raise ValueError(f"{name} is on {values.device} but x is on {x.device}")


def _check_seed(seed: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("seed must be an int64 tensor with one element (use ul_fast.ops.draw_seed)")
    if seed.device != x.device:
        raise ValueError(f"seed is on {seed.device} but x is on {x.device}")


def _check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def noise_inject(
    x: torch.Tensor, logsnr: torch.Tensor, seed: torch.Tensor, return_noise: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``z = α(λ_b)·x + σ(λ_b)·ε``, ε regenerable from ``seed``; see :func:`reference.noise_inject`."""
    _check_float("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    _check_per_example("logsnr", logsnr, x)
    _check_seed(seed, x)
    args = (x, logsnr, seed, bool(return_noise))
    kernel = fast_kernel("noise_inject", x.device.type)
    if kernel is not None and kernel.supports(*args):
        return kernel.fn(*args)
    return reference.noise_inject(*args)


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
    """Per-example ``½·(−dλ/dt)·w(λ)·‖ε − ε̂‖²`` in nats; see :func:`reference.diffusion_loss`."""
    _check_float("pred", pred)
    _check_float("x", x)
    if pred.shape != x.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and x {tuple(x.shape)} must have the same shape")
    if x.dim() < 1 or x.shape[0] == 0:  # as noise_inject: an empty batch is a caller's bug on every backend
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    _check_per_example("logsnr", logsnr, x)
    _check_per_example("neg_dlogsnr_dt", neg_dlogsnr_dt, x)
    _check_seed(seed, x)
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if not loss_factor > 0:
        raise ValueError(f"loss_factor must be > 0, got {loss_factor}")
    args = (pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, float(loss_factor),
            None if bias is None else float(bias))
    kernel = fast_kernel("diffusion_loss", x.device.type)
    if kernel is not None and kernel.supports(*args):
        return kernel.fn(*args)
    return reference.diffusion_loss(*args)


def logsnr_embed(
    logsnr: torch.Tensor, frequencies: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``SiLU(W·[sin λf, cos λf] + b)``: ``[B]`` → ``[B, N]``; see :func:`reference.logsnr_embed`.

    The compiled kernel gives gradients to ``weight`` and ``bias`` only, none to λ or the frequencies (the
    model's λ comes from the schedule and its frequencies are a fixed buffer), so where either requires a
    gradient the reference runs, which differentiates every input."""
    if logsnr.dim() != 1:
        raise ValueError(f"logsnr must have shape [B], got {tuple(logsnr.shape)}")
    if weight.dim() != 2 or weight.shape[1] != 2 * frequencies.numel():
        raise ValueError(f"weight must have shape [N, 2F] = [N, {2 * frequencies.numel()}], "
                         f"got {tuple(weight.shape)}")
    args = (logsnr, frequencies, weight, bias)
    kernel = fast_kernel("logsnr_embed", logsnr.device.type)
    if kernel is not None and kernel.supports(*args):
        return kernel.fn(*args)
    return reference.logsnr_embed(*args)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention: q ``[B, S_q, H, D]``, k and v ``[B, S_k, H, D]`` (``S_k ≠ S_q`` for
    cross-attention); see :func:`reference.attention`."""
    if (q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0]
            or k.shape[2:] != q.shape[2:]):
        raise ValueError(f"attention expects q [B, S_q, H, D] and k, v [B, S_k, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    kernel = fast_kernel("attention", q.device.type)
    if kernel is not None and kernel.supports(q, k, v):  # e.g. Triton: self-attention, head dims 16..128
        return kernel.fn(q, k, v)
    return reference.attention(q, k, v)


def adaln_layernorm(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``LayerNorm(x)·(1 + scale) + shift``; x ``[B, S, C]``, scale/shift ``[B, C]``, eps > 0."""
    if x.dim() != 3 or scale.shape != (x.shape[0], x.shape[2]) or shift.shape != scale.shape:
        raise ValueError(f"adaln_layernorm expects x [B, S, C] and scale, shift [B, C]; got x "
                         f"{tuple(x.shape)}, scale {tuple(scale.shape)}, shift {tuple(shift.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    args = (x, scale, shift, float(eps))
    kernel = fast_kernel("adaln_layernorm", x.device.type)
    if kernel is not None and kernel.supports(*args):  # e.g. Triton: at most MAX_CHANNELS channels
        return kernel.fn(*args)
    return reference.adaln_layernorm(*args)
