"""Fused adaLN-modulated LayerNorm in Triton for ``ul_fast.ops.adaln_layernorm``.

``y = LayerNorm(x)·(1 + scale) + shift`` with x ``[B, S, C]`` (any batch/sequence strides, contiguous
channels), per-example scale and shift ``[B, C]`` (row strides allowed, e.g. chunks of one modulation
projection), no affine; y ``[B, S, C]`` contiguous in x's dtype. Statistics and arithmetic in fp32.

One pass each way: the forward reads x once and writes y; the backward reads x and dy once, recomputes
the row statistics (cheaper than storing them: the row is in registers anyway), writes dx, and reduces
``dscale = Σ_s dy·x̂`` and ``dshift = Σ_s dy`` per example through fp32 partial sums per chunk of rows
(deterministic, no atomics), summed by a tiny torch reduction.

Layers: kernels → ``torch.ops.ul_fast.adaln_layernorm`` / ``adaln_layernorm_backward`` custom ops (which
check the shapes, dtypes and device the kernels read) → :func:`adaln_layernorm` → :data:`KERNELS`, the CUDA
implementation of ``ul_fast.ops.adaln_layernorm`` for the inputs :func:`supports` accepts.

Launches: one flat grid axis (no batch meets CUDA's 65,535 limit of the other axes), on the tensors' device
(:func:`device_guard`).
"""

from __future__ import annotations

import functools

import torch

from ul_fast.kernels import Kernel
from ul_fast.kernels.triton_support import (
    DTYPES,
    INTERPRET,
    check_runnable,
    device_guard,
    last_dim_contiguous,
    tl,
    triton,
)

__all__ = ["KERNELS", "MAX_CHANNELS", "adaln_layernorm", "supports"]

MAX_CHANNELS = 16384  # a whole row lives in registers


def supports(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> bool:
    """Whether the Triton kernels handle these arguments of ``ul_fast.ops.adaln_layernorm`` (else the
    reference runs)."""
    return (triton is not None and x.dim() == 3 and x.numel() > 0 and 0 < x.shape[2] <= MAX_CHANNELS
            and x.dtype in DTYPES and scale.dtype in DTYPES and shift.dtype in DTYPES
            and (x.is_cuda or INTERPRET))


def _check_inputs(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """What the kernels need (the shapes they read, their dtypes, one device, at most MAX_CHANNELS): a clear
    error instead of an out-of-bounds read or a failed launch."""
    if x.dim() != 3 or scale.shape != (x.shape[0], x.shape[2]) or shift.shape != scale.shape:
        raise ValueError(f"adaln_layernorm expects x [B, S, C] and scale, shift [B, C]; got x "
                         f"{tuple(x.shape)}, scale {tuple(scale.shape)}, shift {tuple(shift.shape)}")
    for name, t in (("x", x), ("scale", scale), ("shift", shift)):
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.numel() == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if x.shape[2] > MAX_CHANNELS:
        raise ValueError(f"x has C = {x.shape[2]} channels; the Triton kernel supports at most {MAX_CHANNELS}")


if triton is not None:

    @triton.jit
    def _row_tile(X, b, s0, stride_xb, stride_xs, offs_r, offs_c, S, C):
        """Pointers and mask of the ``[ROWS, BLOCK_C]`` tile of rows s0.. of example b."""
        rows = s0 + offs_r
        mask = (rows < S)[:, None] & (offs_c < C)[None, :]
        ptrs = X + b * stride_xb + rows[:, None].to(tl.int64) * stride_xs + offs_c[None, :]
        return ptrs, mask

    @triton.jit
    def _normalize(x, mask, C, eps):
        """fp32 ``x̂`` and ``1/σ`` of each row of a tile (masked lanes give x̂ = 0)."""
        mean = tl.sum(x, 1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
        return xc * rstd[:, None], rstd

    @triton.jit
    def _adaln_fwd(X, SCALE, SHIFT, Y, S, C, stride_xb, stride_xs, stride_sb, stride_tb, stride_yb, eps,
                   BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
        """Grid ``(B·cdiv(S, ROWS),)``, the tiles of one example adjacent: ROWS rows of one example; Y is
        contiguous [B, S, C] (``stride_yb`` = S·C comes from the host: Triton turns an argument equal to 1,
        such as S = 1, into a compile-time int, which has no ``.to``)."""
        n_tiles = tl.cdiv(S, ROWS)
        b = (tl.program_id(0) // n_tiles).to(tl.int64)
        s0 = (tl.program_id(0) % n_tiles) * ROWS
        offs_r = tl.arange(0, ROWS)
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        gain = 1.0 + tl.load(SCALE + b * stride_sb + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        bias = tl.load(SHIFT + b * stride_tb + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        ptrs, mask = _row_tile(X, b, s0, stride_xb, stride_xs, offs_r, offs_c, S, C)
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        xhat, _ = _normalize(x, mask, C, eps)
        y = xhat * gain[None, :] + bias[None, :]
        y_ptrs, _ = _row_tile(Y, b, s0, stride_yb, C, offs_r, offs_c, S, C)
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _adaln_bwd(X, SCALE, DY, DX, DSCALE_PART, DSHIFT_PART, S, C, n_chunks, rows_per_chunk,
                   stride_xb, stride_xs, stride_sb, stride_db, stride_ds, stride_dxb, eps,
                   BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
        """Grid ``(B·n_chunks,)``: rows [chunk·rows_per_chunk, …) of example b. Writes dx (contiguous like y)
        and this chunk's partial sums ``Σ dy·x̂``, ``Σ dy`` to ``*_PART[b, chunk, :]`` (fp32)."""
        chunk = tl.program_id(0) % n_chunks
        b = (tl.program_id(0) // n_chunks).to(tl.int64)
        offs_r = tl.arange(0, ROWS)
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        gain = 1.0 + tl.load(SCALE + b * stride_sb + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        dscale = tl.zeros([BLOCK_C], tl.float32)
        dshift = tl.zeros([BLOCK_C], tl.float32)
        s_begin = chunk * rows_per_chunk
        s_end = tl.minimum(s_begin + rows_per_chunk, S)
        for s0 in range(s_begin, s_end, ROWS):
            x_ptrs, mask = _row_tile(X, b, s0, stride_xb, stride_xs, offs_r, offs_c, s_end, C)
            dy_ptrs, _ = _row_tile(DY, b, s0, stride_db, stride_ds, offs_r, offs_c, s_end, C)
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
            xhat, rstd = _normalize(x, mask, C, eps)
            dscale += tl.sum(dy * xhat, 0)
            dshift += tl.sum(dy, 0)
            # dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / σ with dx̂ = dy·(1 + scale)
            dxhat = dy * gain[None, :]
            c1 = tl.sum(dxhat * xhat, 1) / C
            c2 = tl.sum(dxhat, 1) / C
            dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            dx_ptrs, _ = _row_tile(DX, b, s0, stride_dxb, C, offs_r, offs_c, s_end, C)
            tl.store(dx_ptrs, dx.to(DX.dtype.element_ty), mask=mask)
        part = (b * n_chunks + chunk) * C + offs_c
        tl.store(DSCALE_PART + part, dscale, mask=c_ok)
        tl.store(DSHIFT_PART + part, dshift, mask=c_ok)


def _launch_shape(C: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS per tile, num_warps): tiles of about 4096 fp32 values per program iteration.

    The backward holds about three times the live values of the forward (x, dy, x̂ and the per-channel sums),
    so it gets more warps: with the forward's, compiled for sm_90a, it spills 320 B per thread from C = 4096
    (tests/test_triton_sm90.py). Above C = 4096 a row no longer fits one block's registers (at most 64 per
    thread at 32 warps) and the backward spills up to 0.6 KB per thread however it is split."""
    block_c = triton.next_power_of_2(C)
    rows = 2 if INTERPRET else max(1, min(16, 4096 // block_c))
    if backward:
        return block_c, rows, max(4, min(32, block_c // 256))
    warps = 4 if block_c * rows <= 4096 else 8 if block_c * rows <= 8192 else 16
    return block_c, rows, warps


def _forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    check_runnable(x, "adaLN LayerNorm")
    x, scale, shift = (last_dim_contiguous(t) for t in (x, scale, shift))
    B, S, C = x.shape
    block_c, rows, warps = _launch_shape(C)
    with device_guard(x):
        y = torch.empty((B, S, C), dtype=x.dtype, device=x.device)
        _adaln_fwd[(B * triton.cdiv(S, rows),)](x, scale, shift, y, S, C, x.stride(0), x.stride(1), scale.stride(0),
                                                shift.stride(0), y.stride(0), eps, BLOCK_C=block_c, ROWS=rows,
                                                num_warps=warps)
    return y


@functools.cache
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a GPU (asked once per device, not on every call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _chunking(B: int, S: int, rows: int, device: torch.device) -> tuple[int, int]:
    """``(n_chunks, rows_per_chunk)`` of the backward grid: enough programs to fill the GPU (about 16 per
    SM), each a whole number of ``rows``-row tiles, together covering the S rows of an example."""
    # (the interpreter on CPU counts as one SM: a few chunks, each several tiles, as on a GPU)
    sms = _sm_count(device.index) if device.type == "cuda" else 1
    want = max(1, min(triton.cdiv(16 * sms, B), triton.cdiv(S, rows)))
    rows_per_chunk = triton.cdiv(triton.cdiv(S, want), rows) * rows
    return triton.cdiv(S, rows_per_chunk), rows_per_chunk


def _backward(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_runnable(x, "adaLN LayerNorm")
    x, scale, grad_y = (last_dim_contiguous(t) for t in (x, scale, grad_y))
    B, S, C = x.shape
    block_c, rows, warps = _launch_shape(C, backward=True)
    n_chunks, rows_per_chunk = _chunking(B, S, rows, x.device)
    with device_guard(x):
        dx = torch.empty((B, S, C), dtype=x.dtype, device=x.device)
        # two buffers, not views of one: custom-op outputs must not alias each other
        dscale_part = torch.empty((B, n_chunks, C), dtype=torch.float32, device=x.device)
        dshift_part = torch.empty_like(dscale_part)
        _adaln_bwd[(B * n_chunks,)](x, scale, grad_y, dx, dscale_part, dshift_part, S, C, n_chunks, rows_per_chunk,
                                    x.stride(0), x.stride(1), scale.stride(0), grad_y.stride(0), grad_y.stride(1),
                                    dx.stride(0), eps, BLOCK_C=block_c, ROWS=rows, num_warps=warps)
        return dx, dscale_part.sum(1).to(scale.dtype), dshift_part.sum(1)


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("ul_fast::adaln_layernorm", mutates_args=())
def adaln_layernorm_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x)·(1 + scale) + shift``: x ``[B, S, C]``, scale/shift ``[B, C]`` → ``[B, S, C]``."""
    _check_inputs(x, scale, shift)
    return _forward(x, scale, shift, eps)


@adaln_layernorm_op.register_fake
def _adaln_layernorm_fake(x, scale, shift, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("ul_fast::adaln_layernorm_backward", mutates_args=())
def adaln_layernorm_backward_op(grad_y: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx [B, S, C] in x.dtype, dscale [B, C] in scale.dtype, dshift [B, C] fp32)``."""
    _check_inputs(x, scale, scale)  # the backward reads no shift
    if grad_y.shape != x.shape or grad_y.device != x.device:
        raise ValueError(f"grad_y must match x {tuple(x.shape)} on {x.device}, got {tuple(grad_y.shape)} on "
                         f"{grad_y.device}")
    return _backward(grad_y, x, scale, eps)


@adaln_layernorm_backward_op.register_fake
def _adaln_layernorm_backward_fake(grad_y, x, scale, eps):
    B, S, C = x.shape
    return x.new_empty((B, S, C)), scale.new_empty((B, C)), scale.new_empty((B, C), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, scale, shift, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps
    ctx.shift_dtype = shift.dtype


def _adaln_layernorm_grad(ctx, grad_y):
    x, scale = ctx.saved_tensors
    dx, dscale, dshift = torch.ops.ul_fast.adaln_layernorm_backward(grad_y, x, scale, ctx.eps)
    return dx, dscale, dshift.to(ctx.shift_dtype), None


adaln_layernorm_op.register_autograd(_adaln_layernorm_grad, setup_context=_setup_context)


# ---------------------------------------------------------------- functional API and the kernel table


def adaln_layernorm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x)·(1 + scale) + shift`` (fp32 statistics, no affine), differentiable in x, scale, shift.

    x ``[B, S, C]``; scale, shift ``[B, C]`` → ``[B, S, C]`` in x.dtype; eps > 0 (checked by
    ``ul_fast.ops.adaln_layernorm``). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    return torch.ops.ul_fast.adaln_layernorm(x, scale, shift, float(eps))


KERNELS: dict[tuple[str, str], Kernel] = (
    {("adaln_layernorm", "cuda"): Kernel(adaln_layernorm, supports)} if triton is not None else {})
"""``(op, device type) -> Kernel``: the CUDA adaLN LayerNorm when triton is installed."""
