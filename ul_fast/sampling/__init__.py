"""Diffusion samplers: DDIM and ancestral (VDM), with callback and a progress bar that can be disabled."""

from ul_fast.sampling.samplers import SAMPLERS, logsnr_grid, sample, sample_ancestral, sample_ddim

__all__ = ["SAMPLERS", "logsnr_grid", "sample", "sample_ancestral", "sample_ddim"]
