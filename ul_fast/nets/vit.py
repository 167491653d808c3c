"""ViT denoiser over latents: the prior (unconditional) and the base model (class/text conditioned).

Optionally multi-level (the paper's "two-level ViT"): level ``i`` runs at ``grid / 2^i`` tokens per side
and width ``widths[i]``; half of its blocks run on the way down, half on the way up, joined by a skip.
The last level runs all of its blocks in the middle.
"""

from __future__ import annotations

import torch
from torch import nn

from ul_fast.config import ViTConfig
from ul_fast.nets.layers import (
    AdaLNBlock,
    FinalLayer,
    LogSNREmbedding,
    patchify,
    require_config,
    sincos_position_embedding,
    unpatchify,
)


def _merge(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """2×2 token merge: ``[B, g², W]`` → ``[B, (g/2)², 4W]``."""
    b, _, w = tokens.shape
    x = tokens.reshape(b, grid // 2, 2, grid // 2, 2, w).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (grid // 2) ** 2, 4 * w)


def _split(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of :func:`_merge`: ``[B, (g/2)², 4W]`` → ``[B, g², W]``."""
    b, _, w4 = tokens.shape
    x = tokens.reshape(b, grid // 2, grid // 2, 2, 2, w4 // 4).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * grid, w4 // 4)


class ViTDenoiser(nn.Module):
    """Denoising ViT on a ``channels × grid × grid`` latent, shaped by a :class:`ViTConfig`.

    forward: z_t ``[B, C, g, g]``, logsnr ``[B]``, optional labels ``[B]`` (``num_classes`` = dropped),
    optional text ``context [B, T, context_dim]`` and ``pooled [B, context_dim]`` → the prediction
    ``[B, C, g, g]`` (``v̂`` or ``ε̂``: the model's ``prediction`` decides what it is trained to output).
    ``num_classes = 0`` and ``context_dim = None``: unconditional (the prior).
    """

    def __init__(self, config: ViTConfig, *, channels: int, grid: int, num_classes: int = 0,
                 context_dim: int | None = None):
        super().__init__()
        require_config(config, ViTConfig, "ViTDenoiser")
        widths, depths, head_dim, patch = config.widths, config.depths, config.head_dim, config.patch
        mlp_ratio, dropout = config.mlp_ratio, config.dropout
        if not widths or len(widths) != len(depths):
            raise ValueError(f"ViTConfig.widths and depths must be non-empty and of the same length, "
                             f"got {list(widths)} and {list(depths)}")
        if patch < 1 or head_dim < 1:
            raise ValueError(f"ViTConfig.patch and head_dim must be >= 1, got {patch} and {head_dim}")
        if grid % patch:
            raise ValueError(f"latent grid {grid} must be divisible by ViTConfig.patch {patch}")
        token_grid = grid // patch
        if token_grid % (2 ** (len(widths) - 1)):
            raise ValueError(f"token grid {token_grid} cannot be halved {len(widths) - 1} times "
                             f"(one fewer than the {len(widths)} levels of ViTConfig.widths)")
        for level, (w, d) in enumerate(zip(widths, depths)):
            if w % head_dim:
                raise ValueError(f"ViTConfig.widths[{level}] = {w} must be divisible by head_dim {head_dim}")
            if level < len(widths) - 1 and d % 2:
                raise ValueError(f"ViTConfig.depths[{level}] = {d} must be even (half down, half up)")
        self.channels, self.grid, self.patch, self.token_grid = channels, grid, patch, token_grid
        self.num_classes = num_classes
        cond_dim = max(widths)
        self.logsnr_embedding = LogSNREmbedding(cond_dim)
        self.label_embedding = nn.Embedding(num_classes + 1, cond_dim) if num_classes else None
        self.pooled_projection = nn.Linear(context_dim, cond_dim) if context_dim else None
        self.embed = nn.Linear(channels * patch * patch, widths[0])
        self.register_buffer("positions", sincos_position_embedding(token_grid, widths[0]), persistent=False)

        def blocks(width: int, count: int) -> nn.ModuleList:
            return nn.ModuleList([AdaLNBlock(width, width // head_dim, cond_dim, mlp_ratio, dropout, context_dim)
                                  for _ in range(count)])

        last = len(widths) - 1
        self.down_blocks = nn.ModuleList([blocks(w, d // 2) for w, d in zip(widths[:last], depths[:last])])
        self.up_blocks = nn.ModuleList([blocks(w, d // 2) for w, d in zip(widths[:last], depths[:last])])
        self.middle_blocks = blocks(widths[last], depths[last])
        self.merges = nn.ModuleList([nn.Linear(4 * widths[i], widths[i + 1]) for i in range(last)])
        self.splits = nn.ModuleList([nn.Linear(widths[i + 1], 4 * widths[i]) for i in range(last)])
        self.final = FinalLayer(widths[0], channels * patch * patch, cond_dim)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor | None = None,
                context: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        if z_t.shape[1:] != (self.channels, self.grid, self.grid):
            raise ValueError(f"expected latents [B, {self.channels}, {self.grid}, {self.grid}], got {tuple(z_t.shape)}")
        cond = self.logsnr_embedding(logsnr)
        if self.label_embedding is not None:
            if labels is None:  # unconditional: the "dropped label" embedding
                labels = torch.full((z_t.shape[0],), self.num_classes, device=z_t.device, dtype=torch.long)
            cond = cond + self.label_embedding(labels)
        if self.pooled_projection is not None and pooled is not None:
            cond = cond + self.pooled_projection(pooled)
        x = self.embed(patchify(z_t, self.patch)) + self.positions
        skips, grid = [], self.token_grid
        for level, level_blocks in enumerate(self.down_blocks):
            for block in level_blocks:
                x = block(x, cond, context)
            skips.append(x)
            x, grid = self.merges[level](_merge(x, grid)), grid // 2
        for block in self.middle_blocks:
            x = block(x, cond, context)
        for level in reversed(range(len(self.up_blocks))):
            grid *= 2
            x = _split(self.splits[level](x), grid) + skips[level]
            for block in self.up_blocks[level]:
                x = block(x, cond, context)
        return unpatchify(self.final(x, cond), self.channels, self.grid, self.grid, self.patch)
