"""ul_fast: Unified Latents latent diffusion in PyTorch, with fused C++/CUDA and Triton kernels."""

__version__ = "0.1.0"

from ul_fast._build_info import build_info as build_info  # noqa: E402
