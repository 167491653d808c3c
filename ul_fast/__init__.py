"""ul_fast: Unified Latents latent diffusion in PyTorch, with fused C++/CUDA and Triton kernels."""

__version__ = "0.1.0"
