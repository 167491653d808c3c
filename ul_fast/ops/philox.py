"""Counter-based Gaussian noise: the specification every noise kernel must reproduce.

ε is a pure function of a 64-bit seed and the element's flat (row-major) index, so noise can be
regenerated instead of stored (the fused loss does this) and CPU, CUDA and this reference agree.

Layout (shared with csrc/philox.h):
- element ``n`` belongs to group ``g = n // 4`` and lane ``n % 4``;
- Philox4x32-10 with counter ``(g mod 2^32, g >> 32, 0, 0)`` and key ``(seed mod 2^32, seed >> 32)``
  gives four uint32 words ``r0..r3`` per group (four normals per call amortise the RNG arithmetic);
- ``u_i = ((r_i >> 8) + 0.5) · 2^-24`` computed in fp32: never 0 (so ``log u`` is finite); for
  ``r_i >> 8 ≥ 2^23`` the ``+ 0.5`` rounds to even, so ``u`` can reach exactly 1 (then ``ρ = 0``), and
  every backend reproduces that rounding;
- Box–Muller in fp32: ``ρ = sqrt(−2·ln u0)``, ``θ = 2π·u1``, lanes 0, 1 = ``ρ·cos θ``, ``ρ·sin θ``;
  lanes 2, 3 likewise from ``u2, u3``.

Pure-torch 32-bit arithmetic is emulated in int64 (16-bit limbs for the 32×32→64 products).
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831854820251465  # float32(2π)


def _mulhilo(multiplier: int, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``multiplier · value`` for uint32 values held in int64."""
    lo16 = value & 0xFFFF
    hi16 = value >> 16
    p_lo = multiplier * lo16  # < 2^48
    p_hi = multiplier * hi16  # < 2^48
    low_sum = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = low_sum & _MASK32
    hi = (p_hi >> 16) + (low_sum >> 32)
    return hi & _MASK32, lo


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int | torch.Tensor, int | torch.Tensor],
               ) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 words; returns four uint32 words. The key words are ints,
    or int64 tensors that broadcast against the counter (a seed kept on the device)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uint32_to_unit_float(word: torch.Tensor) -> torch.Tensor:
    """Map uint32 words to fp32 uniforms in (0, 1]: ``((r >> 8) + 0.5) · 2^-24`` (rounded in fp32)."""
    return ((word >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def philox_normal(numel: int, seed: int | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """``numel`` standard normals (fp32, flat) for a 64-bit ``seed``, in the layout above.

    seed: an int in [0, 2^64), or an int64 tensor of one element whose two's-complement bit pattern is the
    seed (read on its device, never by the host: the noise then traces into a compiled graph and replays in a
    CUDA graph).
    """
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    elif not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a 64-bit integer in [0, 2^64), got {seed}")
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(g)
    words = philox4x32((g & _MASK32, g >> 32, zeros, zeros), (seed & _MASK32, (seed >> 32) & _MASK32))
    u0, u1, u2, u3 = (uint32_to_unit_float(w) for w in words)
    rho_a = torch.sqrt(-2.0 * torch.log(u0))
    rho_b = torch.sqrt(-2.0 * torch.log(u2))
    theta_a = TWO_PI_F32 * u1
    theta_b = TWO_PI_F32 * u3
    lanes = torch.stack(
        [rho_a * torch.cos(theta_a), rho_a * torch.sin(theta_a), rho_b * torch.cos(theta_b),
         rho_b * torch.sin(theta_b)],
        dim=1,
    )
    return lanes.reshape(-1)[:numel]
