"""Deterministic ResNet encoder ``z_clean = E(x)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ul_fast.config import EncoderConfig
from ul_fast.nets.layers import ResBlock, group_norm, require_config


class ResNetEncoder(nn.Module):
    """2×2 (``patch``) space-to-depth, then ResNet stages with a stride-2 conv between stages.

    x ``[B, image_channels, H, W]`` → z_clean ``[B, latent_channels, H/f, W/f]`` with
    ``f = patch · 2^(len(channels) − 1)`` (:attr:`downsample_factor`).
    """

    def __init__(self, config: EncoderConfig, *, image_channels: int, latent_channels: int):
        super().__init__()
        require_config(config, EncoderConfig, "ResNetEncoder")
        channels, blocks_per_stage, patch = config.channels, config.blocks_per_stage, config.patch
        if not channels or len(channels) != len(blocks_per_stage):
            raise ValueError(f"EncoderConfig.channels and blocks_per_stage must be non-empty and of the same "
                             f"length, got {list(channels)} and {list(blocks_per_stage)}")
        if patch < 1:
            raise ValueError(f"EncoderConfig.patch must be >= 1, got {patch}")
        self.patch = patch
        self.stem = nn.Conv2d(image_channels * patch * patch, channels[0], 3, padding=1)
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = channels[0]
        for index, (width, blocks) in enumerate(zip(channels, blocks_per_stage)):
            self.stages.append(nn.Sequential(*[ResBlock(previous if b == 0 else width, width) for b in range(blocks)]))
            previous = width
            if index < len(channels) - 1:
                self.downsamples.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.out = nn.Sequential(group_norm(previous), nn.SiLU(), nn.Conv2d(previous, latent_channels, 3, padding=1))
        self.downsample_factor = patch * 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(F.pixel_unshuffle(x, self.patch))
        for index, stage in enumerate(self.stages):
            h = stage(h)
            if index < len(self.downsamples):
                h = self.downsamples[index](h)
        return self.out(h)
