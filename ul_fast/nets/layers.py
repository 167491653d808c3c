"""Building blocks shared by the UL networks. All fused math goes through :mod:`ul_fast.ops`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ul_fast import ops


class CheckpointedBlock(nn.Module):
    """A block whose activations can be recomputed in the backward pass instead of stored
    (:func:`set_activation_checkpointing`, ``train.activation_checkpointing``): the same values and gradients, for
    one more forward of the block. Only while gradients are recorded; evaluation and sampling never recompute."""

    checkpointed: bool = False

    def _run(self, forward: Callable[..., torch.Tensor], *args: torch.Tensor | None) -> torch.Tensor:
        if not (self.checkpointed and torch.is_grad_enabled()):
            return forward(*args)
        # The RNG state is saved and restored around the recomputation only where the block draws from it
        # (dropout): saving it reads the generator, which a CUDA-graph capture does not allow.
        uses_rng = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules()) and self.training
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=uses_rng)


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Turn activation checkpointing on or off for every :class:`CheckpointedBlock` inside ``module`` (the
    transformer and residual blocks of all four networks); returns how many blocks there are."""
    blocks = [m for m in module.modules() if isinstance(m, CheckpointedBlock)]
    for block in blocks:
        block.checkpointed = enabled
    return len(blocks)


class LogSNREmbedding(nn.Module):
    """Noise-level conditioning: Fourier features of λ → Linear → SiLU → Linear.

    The first two stages are the fused op :func:`ul_fast.ops.logsnr_embed`. Frequencies are geometric
    from 1/16 to 16 radians per unit log-SNR, covering periods from ~0.4 to ~100 over λ ∈ [−15, 15].
    logsnr ``[B]`` → ``[B, dim]``.
    """

    def __init__(self, dim: int, num_frequencies: int = 64):
        super().__init__()
        frequencies = torch.exp(torch.linspace(math.log(1 / 16), math.log(16.0), num_frequencies))
        self.register_buffer("frequencies", frequencies, persistent=False)
        self.weight = nn.Parameter(torch.empty(dim, 2 * num_frequencies))
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(2 * num_frequencies))
        self.out = nn.Linear(dim, dim)

    def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
        hidden = ops.logsnr_embed(logsnr.float(), self.frequencies, self.weight, self.bias)
        return self.out(hidden)


class Attention(nn.Module):
    """Multi-head self-attention (or cross-attention when ``context`` is given) on ``[B, S, W]``."""

    def __init__(self, width: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(context_dim, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, width = x.shape
        head_dim = width // self.heads
        if self.cross:
            q = self.q(x).reshape(batch, tokens, self.heads, head_dim)
            k, v = self.kv(context).reshape(batch, context.shape[1], 2, self.heads, head_dim).unbind(2)
        else:
            # [B, S, 3, H, D] unbound on dim 2: strided [B, S, H, D] views, no copies.
            q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, head_dim).unbind(2)
        return self.proj(ops.attention(q, k, v).reshape(batch, tokens, width))


class AdaLNBlock(CheckpointedBlock):
    """Transformer block with adaLN-Zero conditioning (DiT): per-example shift, scale and gate.

    x ``[B, S, W]``, cond ``[B, C]``; optional cross-attention to ``context [B, T, E]`` (text tokens).
    """

    def __init__(self, width: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 context_dim: int | None = None):
        super().__init__()
        self.attn = Attention(width, heads)
        self.cross_attn = Attention(width, heads, context_dim) if context_dim else None
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, width))
        self.dropout = nn.Dropout(dropout)
        self.modulation = nn.Linear(cond_dim, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)
        if self.cross_attn is not None:
            self.cross_norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(self._forward, x, cond, context)

    def _forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).chunk(6, dim=1)
        x = x + gate1[:, None] * self.dropout(self.attn(ops.adaln_layernorm(x, scale1, shift1)))
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(self.cross_norm(x), context)
        return x + gate2[:, None] * self.dropout(self.mlp(ops.adaln_layernorm(x, scale2, shift2)))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a zero-initialised projection to the output channels."""

    def __init__(self, width: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.modulation = nn.Linear(cond_dim, 2 * width)
        self.proj = nn.Linear(width, out_dim)
        for layer in (self.modulation, self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(cond)).chunk(2, dim=1)
        return self.proj(ops.adaln_layernorm(x, scale, shift))


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``channels``."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


class ResBlock(CheckpointedBlock):
    """Pre-activation residual conv block; optional per-example scale/shift from a conditioning vector.

    x ``[B, C_in, H, W]`` → ``[B, C_out, H, W]``.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.cond = nn.Linear(cond_dim, 2 * out_channels) if cond_dim else None
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(self._forward, x, cond)

    def _forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.cond is not None:
            scale, shift = self.cond(F.silu(cond)).chunk(2, dim=1)
            h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` → tokens ``[B, (H/p)·(W/p), C·p²]`` (row-major over the patch grid)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, channels: int, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, C·p²]`` → ``[B, C, H, W]``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)


def sincos_position_embedding(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding for a ``grid × grid`` token map: ``[grid², width]``."""
    if width % 4:
        raise ValueError(f"width {width} must be divisible by 4 for 2-D sin-cos positions")
    quarter = width // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for c in (yy.reshape(-1), xx.reshape(-1)):
        angles = c[:, None] * omega[None]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def require_config(config: object, expected: type, network: str) -> None:
    """Raise a clear TypeError when ``network`` is given something other than its config dataclass."""
    if not isinstance(config, expected):
        raise TypeError(f"{network} takes its {expected.__name__} (from ul_fast.config) as first argument, "
                        f"got {type(config).__name__}")
