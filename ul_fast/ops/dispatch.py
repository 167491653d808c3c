"""Backend selection for :mod:`ul_fast.ops`.

Fast backends live in :mod:`ul_fast.kernels` and register an implementation per (op, device type)
with :func:`register`. ``UL_FAST_BACKEND`` chooses:

- ``auto`` (default): a registered fast kernel where one exists for the tensor's device, else the
  reference;
- ``reference``: the pure-PyTorch reference everywhere.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable

from ul_fast.ops import reference

BACKENDS = ("auto", "reference")
_FAST: dict[tuple[str, str], Callable] = {}
_loaded = False


def backend() -> str:
    """The backend requested by ``UL_FAST_BACKEND`` (checked on every call, so tests can switch)."""
    choice = os.environ.get("UL_FAST_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"UL_FAST_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def register(op: str, device_type: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the fast implementation of ``op`` for tensors on ``device_type``."""
    if not hasattr(reference, op):
        raise ValueError(f"unknown op {op!r}: every fast op needs a reference of the same name")

    def decorate(fn: Callable) -> Callable:
        _FAST[(op, device_type)] = fn
        return fn

    return decorate


def load_fast_backends() -> None:
    """Import each kernel module once; one that cannot load warns and leaves the reference in place."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    kernels = importlib.import_module("ul_fast.kernels")
    for name in kernels.BACKEND_MODULES:
        try:
            importlib.import_module(name)
        except Exception as error:  # a broken optional backend must never break the package
            warnings.warn(f"ul_fast: backend {name} unavailable ({error}); using the reference ops",
                          stacklevel=3)


def implementation(op: str, device_type: str) -> Callable:
    """The function that runs ``op`` for tensors on ``device_type`` under the current backend."""
    if backend() == "auto":
        load_fast_backends()
        fast = _FAST.get((op, device_type))
        if fast is not None:
            return fast
    return getattr(reference, op)


def describe() -> dict[str, str]:
    """Which implementation each op uses per device type, e.g. for logs and ``build_info``."""
    load_fast_backends()
    ops = sorted({op for op, _ in _FAST} | {"noise_inject", "diffusion_loss", "logsnr_embed",
                                             "attention", "adaln_layernorm"})
    table = {}
    for op in ops:
        for device_type in ("cpu", "cuda"):
            fn = implementation(op, device_type)
            table[f"{op}[{device_type}]"] = f"{fn.__module__}.{fn.__name__}"
    return table
