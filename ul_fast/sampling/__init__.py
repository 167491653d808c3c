"""Diffusion samplers in log-SNR (DDIM, ancestral, DPM-Solver++(2M), Heun) as plain functions, with callback
and a progress bar that can be disabled; CUDA-graph replay of the network call of a chain."""

from ul_fast.sampling.cuda_graph import GraphedCall, graphed_module
from ul_fast.sampling.samplers import (
    EVALUATIONS_PER_STEP,
    SAMPLERS,
    SPACINGS,
    logsnr_grid,
    sample,
    sample_ancestral,
    sample_ddim,
    sample_dpmpp_2m,
    sample_heun,
)

__all__ = ["EVALUATIONS_PER_STEP", "GraphedCall", "SAMPLERS", "SPACINGS", "logsnr_grid", "sample", "sample_ancestral",
           "graphed_module", "sample_ddim", "sample_dpmpp_2m", "sample_heun"]
