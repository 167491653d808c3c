"""Which implementation runs each op of :mod:`ul_fast.ops`.

The fast backends in :mod:`ul_fast.kernels` each export a table ``{(op, device type): Kernel}``; this module
imports them and merges the tables once, into :data:`KERNELS`. A backend that fails to import warns and leaves
the reference in place. Two environment variables choose, read on every call (so tests and benchmarks can
switch; under ``torch.compile`` dynamo guards on the values it read, so a change recompiles):

``UL_FAST_BACKEND``
    - ``auto`` (default): the fast kernel where one exists for the tensors' device type and supports the
      arguments, except for the (op, device type) pairs of :data:`REFERENCE_IS_FASTER`, where the reference
      was measured faster;
    - ``fast``: every fast kernel that exists and supports the arguments, measured faster or not (for the
      kernels' own tests and the benchmarks that measure them);
    - ``reference``: the pure-PyTorch reference (:mod:`ul_fast.ops.reference`) everywhere.

``UL_FAST_REFERENCE_OPS``
    A comma-separated subset of :data:`OPS` (e.g. ``logsnr_embed,attention``) that runs the reference on every
    device type, whatever the backend: the per-op override, e.g. for ``benchmarks/gpu_bench_train_step.py``,
    which forces one op at a time to the reference to find the op that slows a training step.

:func:`describe` reports the resulting choice per op and device type.
"""

from __future__ import annotations

import os
import warnings

from ul_fast.kernels import Kernel
from ul_fast.ops import reference

BACKENDS = ("auto", "fast", "reference")
OPS = ("noise_inject", "diffusion_loss", "logsnr_embed", "attention", "adaln_layernorm")
"""The ops with fast kernels; each has a reference of the same name in :mod:`ul_fast.ops.reference`."""
DEVICE_TYPES = ("cpu", "cuda")

REFERENCE_IS_FASTER: dict[tuple[str, str], str] = {
    # (op, device type): the measurement that shows the kernel slower than the reference there. ``auto`` runs
    # the reference for these; ``fast`` still runs the kernel. Remove an entry when its kernel gets faster.
    ("logsnr_embed", "cpu"): "C++ fwd+bwd 0.15x (0.14-0.17) the reference at B=64, 2F=128, N=256, fp32; 2-core "
                             "x86 CPU, 1 thread, torch 2.13, benchmarks/bench_ops_cpu.py --ratios, 2026-11-28 "
                             "(0.28x in an earlier pytest-benchmark run)",
    # CUDA: GPU run 2 (NVIDIA H200, torch 2.11, 2026-11-28), benchmarks/gpu_bench_train_step.py --config fmnist
    # --batch 256, bf16 autocast, eager, 3 interleaved rounds of 10 steps (benchmarks/RESULTS.md). Alone the
    # kernels beat eager (gpu_bench_ops.py, gpu_bench_attention.py); inside this launch-bound step they do not,
    # most likely from per-call host work (custom-op and Triton-launcher overhead). Stage 1 with both entries
    # below is the script's "best" dispatch: 1.30x the reference (ul_fast with them: 1.05x).
    ("adaln_layernorm", "cuda"): "Triton in the fmnist training step: all kernels but adaLN ran 1.43x (stage 1) and "
                                 "1.31x (stage 2) the reference, all kernels 1.05x and 0.92x; H200, run 2, "
                                 "2026-11-28",
    ("logsnr_embed", "cuda"): "CUDA kernel in the fmnist training step: all kernels but the embedding ran 1.27x "
                              "(stage 1) and 1.05x (stage 2) the reference, all kernels 1.05x and 0.92x; alone "
                              "1.10-1.12x eager fwd+bwd; H200, run 2, 2026-11-28",
}


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


def reference_ops() -> frozenset[str]:
    """The ops ``UL_FAST_REFERENCE_OPS`` forces to the reference."""
    names = os.environ.get("UL_FAST_REFERENCE_OPS", "").lower().split(",")
    chosen = frozenset(name.strip() for name in names if name.strip())
    unknown = sorted(chosen - set(OPS))
    if unknown:
        raise ValueError(f"UL_FAST_REFERENCE_OPS names unknown ops {unknown}; the ops are {OPS}")
    return chosen


def fast_kernel(op: str, device_type: str) -> Kernel | None:
    """The fast kernel for ``op`` on tensors of ``device_type``, or None where the reference runs (no kernel
    loaded, the reference backend, ``op`` in ``UL_FAST_REFERENCE_OPS``, or under ``auto`` an entry of
    :data:`REFERENCE_IS_FASTER`). The caller still asks ``kernel.supports(...)`` before running it."""
    choice = backend()
    if choice == "reference" or op in reference_ops():
        return None
    if choice == "auto" and (op, device_type) in REFERENCE_IS_FASTER:
        return None
    return KERNELS.get((op, device_type))


def describe() -> dict[str, str]:
    """Which function runs each op per device type under the current settings (a fast kernel where its
    arguments allow, else the reference), e.g. for logs and ``build_info``:
    ``{"attention[cuda]": "module.function", ...}``."""
    table = {}
    for op in sorted(OPS):
        for device_type in DEVICE_TYPES:
            kernel = fast_kernel(op, device_type)
            fn = kernel.fn if kernel is not None else getattr(reference, op)
            table[f"{op}[{device_type}]"] = f"{fn.__module__}.{fn.__name__}"
    return table
