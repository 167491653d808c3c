"""What the Triton kernel modules share: the optional import, interpreter detection, dtypes, device and layout
checks, the launch limits and the device guard."""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it the Triton modules register nothing
    triton = None
    tl = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# CUDA's launch limits: grid axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65,535. The wrappers flatten every
# launch onto axis 0, so no batch or head count can reach the small limits.
MAX_GRID = (2**31 - 1, 65535, 65535)
# TRITON_INTERPRET=1 (set by tests/conftest.py on CPU machines) runs the kernels on CPU tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_runnable(x: torch.Tensor, what: str) -> None:
    """Raise a clear error if the Triton kernel ``what`` cannot run on ``x``'s device."""
    if triton is None:
        raise RuntimeError(f"ul_fast Triton {what} needs the triton package")
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(f"Triton {what} runs on CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
                           "before importing ul_fast to run the kernels in the Triton interpreter on CPU")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1, else a contiguous copy: the kernels address rows through
    strides but read each row as one contiguous vector."""
    return t if t.stride(-1) == 1 else t.contiguous()


def device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``x``'s GPU the current device for a launch and restore the caller's afterwards (Triton launches on
    the current device and stream, whatever device the tensors are on); nothing to do for a CPU tensor."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
