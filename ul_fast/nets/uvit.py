"""UViT diffusion decoder (SiD2 style) conditioned on the noisy latent ``z_0``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ul_fast.config import DecoderConfig
from ul_fast.nets.layers import (
    AdaLNBlock,
    LogSNREmbedding,
    ResBlock,
    group_norm,
    require_config,
    sincos_position_embedding,
)


class UViTDecoder(nn.Module):
    """Conv down stages → transformer at the bottleneck → conv up stages with skips, shaped by a
    :class:`DecoderConfig`.

    ``z_0`` enters twice: upsampled (nearest) to the image size and concatenated to ``x_t``, and
    resized to the bottleneck grid, projected and added to the tokens.
    forward: x_t ``[B, C, H, W]``, logsnr ``[B]``, z_0 ``[B, C_z, h, w]`` and, if built with
    ``latent_logsnr_conditioning`` (single-stage training), the latent's log-SNR ``[B]`` → the prediction
    ``[B, C, H, W]`` (``v̂`` or ``ε̂``, per the model's ``prediction``).
    The bottleneck grid is ``H / (patch · 2^len(conv_channels))``.
    """

    def __init__(self, config: DecoderConfig, *, image_channels: int, image_size: int, latent_channels: int,
                 latent_logsnr_conditioning: bool = False):
        super().__init__()
        require_config(config, DecoderConfig, "UViTDecoder")
        patch, conv_channels, blocks_per_stage = config.patch, config.conv_channels, config.blocks_per_stage
        width, head_dim, mlp_ratio, dropout = config.width, config.head_dim, config.mlp_ratio, config.dropout
        if not conv_channels:
            raise ValueError("DecoderConfig.conv_channels must be non-empty")
        if patch < 1 or head_dim < 1:
            raise ValueError(f"DecoderConfig.patch and head_dim must be >= 1, got {patch} and {head_dim}")
        factor = patch * 2 ** len(conv_channels)
        if image_size % factor:
            raise ValueError(f"image size {image_size} must be divisible by DecoderConfig's "
                             f"patch·2^len(conv_channels) = {factor}")
        if width % head_dim:
            raise ValueError(f"DecoderConfig.width {width} must be divisible by head_dim {head_dim}")
        self.channels, self.image_size, self.patch = image_channels, image_size, patch
        self.bottleneck_grid = image_size // factor
        cond_dim = width
        self.logsnr_embedding = LogSNREmbedding(cond_dim)
        # Single-stage training varies the latent's noise level, so the decoder must be told it.
        self.latent_logsnr_embedding = LogSNREmbedding(cond_dim) if latent_logsnr_conditioning else None
        self.stem = nn.Conv2d((image_channels + latent_channels) * patch * patch, conv_channels[0], 3, padding=1)
        self.down_stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = conv_channels[0]
        for ch in conv_channels:
            self.down_stages.append(nn.ModuleList(
                [ResBlock(previous if b == 0 else ch, ch, cond_dim, dropout) for b in range(blocks_per_stage)]))
            self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            previous = ch
        self.to_tokens = nn.Linear(previous, width)
        self.latent_to_tokens = nn.Linear(latent_channels, width)
        self.register_buffer("positions", sincos_position_embedding(self.bottleneck_grid, width), persistent=False)
        self.blocks = nn.ModuleList([AdaLNBlock(width, width // head_dim, cond_dim, mlp_ratio, dropout)
                                     for _ in range(config.depth)])
        self.token_norm = nn.LayerNorm(width)
        self.from_tokens = nn.Linear(width, previous)
        self.up_stages = nn.ModuleList()
        for ch in reversed(conv_channels):
            self.up_stages.append(nn.ModuleList(
                [ResBlock(previous + ch if b == 0 else ch, ch, cond_dim, dropout) for b in range(blocks_per_stage)]))
            previous = ch
        self.out = nn.Sequential(group_norm(previous), nn.SiLU(),
                                 nn.Conv2d(previous, image_channels * patch * patch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t: torch.Tensor, logsnr: torch.Tensor, z_0: torch.Tensor,
                latent_logsnr: torch.Tensor | None = None) -> torch.Tensor:
        if x_t.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"expected x_t [B, {self.channels}, {self.image_size}, {self.image_size}], "
                             f"got {tuple(x_t.shape)}")
        cond = self.logsnr_embedding(logsnr)
        if self.latent_logsnr_embedding is not None:
            if latent_logsnr is None:
                raise ValueError("this decoder is conditioned on the latent's log-SNR: pass latent_logsnr [B]")
            cond = cond + self.latent_logsnr_embedding(latent_logsnr)
        z_image = F.interpolate(z_0.to(x_t.dtype), size=x_t.shape[-2:], mode="nearest")
        h = self.stem(F.pixel_unshuffle(torch.cat([x_t, z_image], dim=1), self.patch))
        skips = []
        for stage, downsample in zip(self.down_stages, self.downsamples):
            for block in stage:
                h = block(h, cond)
            skips.append(h)
            h = downsample(h)
        b, c, g, _ = h.shape
        z_grid = F.adaptive_avg_pool2d(z_0, g) if z_0.shape[-1] >= g else F.interpolate(z_0, size=(g, g))
        tokens = (self.to_tokens(h.flatten(2).transpose(1, 2)) + self.positions
                  + self.latent_to_tokens(z_grid.flatten(2).transpose(1, 2).to(h.dtype)))
        for block in self.blocks:
            tokens = block(tokens, cond)
        h = self.from_tokens(self.token_norm(tokens)).transpose(1, 2).reshape(b, -1, g, g)
        for stage in self.up_stages:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.cat([h, skips.pop()], dim=1)
            for block in stage:
                h = block(h, cond)
        return F.pixel_shuffle(self.out(h), self.patch)
