"""ul_fast: Unified Latents latent diffusion in PyTorch, with fused C++/CUDA and Triton kernels.

``ul_fast.load(source)`` loads a trained model (a run folder, an exported folder, or a shipped model such as
``"fmnist-tiny"``) for use from Python: see :mod:`ul_fast.api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ul_fast._build_info import build_info as build_info  # noqa: E402

if TYPE_CHECKING:
    from ul_fast.api import load as load

__all__ = ["build_info", "load"]


def __getattr__(name: str) -> Any:
    """``ul_fast.load``, imported on first use: ``import ul_fast`` stays light (0.1 s, no torch), as the build
    and ``ul_fast.build_info()`` need."""
    if name == "load":
        from ul_fast.api import load

        return load
    raise AttributeError(f"module 'ul_fast' has no attribute {name!r}")
