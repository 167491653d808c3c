"""Which implementation runs each op of :mod:`ul_fast.ops`.

The fast backends in :mod:`ul_fast.kernels` each export a table ``{(op, device type): Kernel}``; this module
imports them and merges the tables once, into :data:`KERNELS`. A backend that fails to import warns and leaves
the reference in place. ``UL_FAST_BACKEND`` (read on every call, so tests can switch) chooses:

- ``auto`` (default): the fast kernel where one exists for the tensors' device type and supports the
  arguments, else the reference;
- ``reference``: the pure-PyTorch reference (:mod:`ul_fast.ops.reference`) everywhere.
"""

from __future__ import annotations

import os
import warnings

from ul_fast.kernels import Kernel
from ul_fast.ops import reference

BACKENDS = ("auto", "reference")
OPS = ("noise_inject", "diffusion_loss", "logsnr_embed", "attention", "adaln_layernorm")
"""The ops with fast kernels; each has a reference of the same name in :mod:`ul_fast.ops.reference`."""
DEVICE_TYPES = ("cpu", "cuda")


def _unavailable(module: str, error: Exception) -> None:
    # a broken optional backend must never break the package
    warnings.warn(f"ul_fast: backend {module} unavailable ({error}); using the reference ops", stacklevel=2)


KERNELS: dict[tuple[str, str], Kernel] = {}
try:
    from ul_fast.kernels import extension_ops
    KERNELS.update(extension_ops.KERNELS)
except Exception as error:
    _unavailable("ul_fast.kernels.extension_ops", error)
try:
    from ul_fast.kernels import triton_attention
    KERNELS.update(triton_attention.KERNELS)
except Exception as error:
    _unavailable("ul_fast.kernels.triton_attention", error)
try:
    from ul_fast.kernels import triton_adaln
    KERNELS.update(triton_adaln.KERNELS)
except Exception as error:
    _unavailable("ul_fast.kernels.triton_adaln", error)


def backend() -> str:
    """The backend requested by ``UL_FAST_BACKEND``."""
    choice = os.environ.get("UL_FAST_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"UL_FAST_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def fast_kernel(op: str, device_type: str) -> Kernel | None:
    """The fast kernel for ``op`` on tensors of ``device_type``, or None (none loaded, or the reference
    backend is chosen). The caller still asks ``kernel.supports(...)`` before running it."""
    if backend() == "reference":
        return None
    return KERNELS.get((op, device_type))


def describe() -> dict[str, str]:
    """Which function runs each op per device type (a fast kernel where its arguments allow, else the
    reference), e.g. for logs and ``build_info``: ``{"attention[cuda]": "module.function", ...}``."""
    table = {}
    for op in sorted(OPS):
        for device_type in DEVICE_TYPES:
            kernel = fast_kernel(op, device_type)
            fn = kernel.fn if kernel is not None else getattr(reference, op)
            table[f"{op}[{device_type}]"] = f"{fn.__module__}.{fn.__name__}"
    return table
