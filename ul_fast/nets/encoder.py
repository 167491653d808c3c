"""Deterministic ResNet encoder ``z_clean = E(x)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ul_fast.nets.layers import ResBlock, group_norm


class ResNetEncoder(nn.Module):
    """2×2 (``patch``) space-to-depth, then ResNet stages with a stride-2 conv between stages.

    x ``[B, C, H, W]`` → z_clean ``[B, latent_channels, H/f, W/f]`` with
    ``f = patch · 2^(len(channels) − 1)`` (:attr:`downsample_factor`).
    """

    def __init__(self, in_channels: int, latent_channels: int, channels: tuple[int, ...] = (128, 256, 512, 512),
                 blocks_per_stage: tuple[int, ...] = (2, 2, 2, 3), patch: int = 2):
        super().__init__()
        if len(channels) != len(blocks_per_stage):
            raise ValueError("encoder channels and blocks_per_stage must have the same length")
        self.patch = patch
        self.stem = nn.Conv2d(in_channels * patch * patch, channels[0], 3, padding=1)
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
