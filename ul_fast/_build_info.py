"""``ul_fast.build_info()``: what the compiled extension was built with and which kernels run."""

from __future__ import annotations

from typing import Any


def build_info() -> dict[str, Any]:
    """Describe the compiled extension ``ul_fast._C`` and the active op implementations.

    Keys: ``extension`` (bool: ``_C`` loaded and up to date), ``reason`` (why not, else ""),
    ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (e.g. ``"80+PTX;90a"``), ``nvcc``,
    ``cxx`` (compiler version lines), ``openmp`` (``_OPENMP`` date, 0 if none), ``source_hash``,
    ``built`` (UTC build time), ``torch`` (runtime torch version), ``cuda_available`` (a GPU is visible now)
    and ``ops`` (``ul_fast.ops.dispatch.describe()``: implementation per op and device type).
    """
    import torch

    from ul_fast.kernels.extension_loader import load
    from ul_fast.ops.dispatch import describe

    ext, reason = load()
    info: dict[str, Any] = {"extension": ext is not None, "reason": reason, "torch": torch.__version__,
                            "cuda_available": torch.cuda.is_available()}
    info.update(
        cuda=bool(getattr(ext, "WITH_CUDA", False)),
        cuda_archs=getattr(ext, "CUDA_ARCHS", ""),
        nvcc=getattr(ext, "NVCC_VERSION", ""),
        cxx=getattr(ext, "CXX_COMPILER", ""),
        openmp=getattr(ext, "OPENMP", 0),
        source_hash=getattr(ext, "SOURCE_HASH", ""),
        built=getattr(ext, "BUILD_TIME", ""),
    )
    info["ops"] = describe()
    return info
