"""Flash attention (forward and backward) in Triton for ``ul_fast.ops.attention``.

Layout: q, k, v are ``[B, S, H, D]`` with any batch/sequence/head strides and a contiguous last dim,
so the views ``qkv.reshape(B, S, 3, H, D).unbind(2)`` of a fused qkv projection are read in place
(no copies). Output ``[B, S, H, D]`` contiguous in q's dtype; the log-sum-exp of each attention row
(natural log, fp32, ``[B, H, S]``) is saved for the backward.

Numerics: scale ``D^-½`` as the reference; softmax statistics and all accumulators in fp32.
fp16/bf16 inputs use tensor-core dots on the input dtype (the probabilities are rounded to the input
dtype before ``P·V``, as in FlashAttention-2). fp32 inputs are computed in full fp32
(``input_precision="ieee"``, no tf32), so fp32 is exact to fp32 rounding but not fast.
Head dims 16, 32, 64, 128; any sequence length (the last block is masked).

Layers: Triton kernels → ``torch.ops.ul_fast.flash_attention`` / ``flash_attention_backward`` custom
ops (fake impls + autograd; they check the shapes, dtypes and device the kernels read) →
:func:`flash_attention` → :data:`KERNELS`, the CUDA implementation of ``ul_fast.ops.attention`` for the
inputs :func:`supports` accepts (self-attention; cross-attention takes the reference). Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors with a single block configuration (the
interpreter cannot autotune); on a GPU the block sizes are autotuned per (head dim, sequence length, dtype).
"""

from __future__ import annotations

import math

import torch

from ul_fast.kernels import Kernel
from ul_fast.kernels.triton_support import DTYPES, INTERPRET, check_runnable, last_dim_contiguous, tl, triton

__all__ = ["HEAD_DIMS", "KERNELS", "flash_attention", "supports"]

HEAD_DIMS = (16, 32, 64, 128)
LN2 = math.log(2.0)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these arguments of ``ul_fast.ops.attention`` (else the reference
    runs): self-attention (one sequence length), a head dim in :data:`HEAD_DIMS`, one dtype."""
    return (triton is not None and q.dim() == 4 and q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES
            and q.numel() > 0 and (q.is_cuda or INTERPRET)
            and k.shape == q.shape and k.dtype == q.dtype and v.dtype == q.dtype)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What the kernels need (one shape, which they read through q's sizes, a head dim they were written for,
    one dtype and device): a clear error instead of an out-of-bounds read or a failed launch."""
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all have shape [B, S, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {HEAD_DIMS}, got {q.shape[-1]}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.numel() == 0:
        raise ValueError(f"q, k, v must be non-empty, got shape {tuple(q.shape)}")


if triton is not None:

    # ---------------------------------------------------------------- autotuning

    def _configs(kind: str) -> list:
        """Block configurations: one in the interpreter (it cannot autotune), a small sweep on GPU."""
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
        if kind == "fwd":
            shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                      (64, 32, 4, 4)]
        else:  # backward: dK/dV hold BLOCK_N keys and loop over queries, dQ the other way round
            shapes = [(64, 64, 4, 3), (64, 64, 8, 3), (32, 128, 4, 3), (128, 32, 4, 3), (64, 128, 8, 3),
                      (128, 64, 8, 3), (64, 32, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]

    def _prune(configs, named_args, **kwargs):
        """Drop blocks much larger than the sequence (pure padding). fp32 (full-precision FMA dots, the
        correctness path, not the fast one) gets one small 64×32 tile: its large tiles exceed shared
        memory at D = 128 and take a minute each to compile."""
        if kwargs.get("UPCAST", False):  # two stages: with four, dK/dV at D = 128 needs 234 KB of smem
            return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
        cap = max(32, triton.next_power_of_2(named_args["SEQ"]))
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap and c.kwargs["BLOCK_N"] <= cap]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    # ---------------------------------------------------------------- helpers

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _load_rows(base, rows, stride, offs_d, SEQ, MASK: tl.constexpr, UPCAST: tl.constexpr):
        """A ``[len(rows), D]`` tile; rows at or past SEQ read as zeros when MASK."""
        ptrs = base + rows[:, None] * stride + offs_d[None, :]
        if MASK:
            tile = tl.load(ptrs, mask=(rows < SEQ)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs)
        if UPCAST:  # fp32 math: fp32 inputs, or bf16 under the interpreter (its bf16 math is wrong)
            tile = tile.to(tl.float32)
        return tile

    # ---------------------------------------------------------------- forward

    @triton.jit
    def _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d, stride_ks, stride_vs, SEQ,
                   qk_scale, MASK: tl.constexpr, UPCAST: tl.constexpr):
        """One key/value block of the online softmax (base-2 exponent; qk_scale includes log2 e)."""
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_ks, offs_d, SEQ, MASK, UPCAST)
        v = _load_rows(v_base, cols, stride_vs, offs_d, SEQ, MASK, UPCAST)
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), UPCAST) * qk_scale
        if MASK:
            qk = tl.where((cols < SEQ)[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        return acc, m_new, l_i

    @triton.autotune(configs=_configs("fwd"), key=["SEQ", "HEAD_DIM", "UPCAST"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE,
                  stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                  stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                  H, SEQ, qk_scale,
                  HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Grid (cdiv(SEQ, BLOCK_M), B·H): one query block of one (batch, head) against all keys."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qs, offs_d, SEQ, True, UPCAST)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (SEQ // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):  # full blocks: no masks in the hot loop
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, start_n, offs_n, offs_d,
                                       stride_ks, stride_vs, SEQ, qk_scale, False, UPCAST)
        if n_full < SEQ:  # the ragged tail block
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, n_full, offs_n, offs_d,
                                       stride_ks, stride_vs, SEQ, qk_scale, True, UPCAST)

        acc = acc / l_i[:, None]
        row_ok = offs_m < SEQ
        o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + pid_bh.to(tl.int64) * SEQ + offs_m, lse, mask=row_ok)

    # ---------------------------------------------------------------- backward

    @triton.jit
    def _bwd_delta(O, DO, GLSE, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                   H, SEQ, HAS_GLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """``Δ = rowsum(dO ∘ O) − dLSE``, fp32 ``[B, H, S]`` (dLSE: gradient flowing into the lse)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_os, offs_d, SEQ, True, True)
        do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, stride_ds, offs_d, SEQ, True, True)
        delta = tl.sum(o * do, 1)
        row_ok = offs_m < SEQ
        if HAS_GLSE:
            delta -= tl.load(GLSE + pid_bh.to(tl.int64) * SEQ + offs_m, mask=row_ok, other=0.0)
        tl.store(DELTA + pid_bh.to(tl.int64) * SEQ + offs_m, delta, mask=row_ok)

    @triton.jit
    def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m, offs_d,
                    stride_qs, stride_ds, SEQ, qk_scale, MASK: tl.constexpr, UPCAST: tl.constexpr):
        """Accumulate one query block's contribution to dK, dV (transposed form: rows are keys)."""
        rows = start_m + offs_m
        q = _load_rows(q_base, rows, stride_qs, offs_d, SEQ, MASK, UPCAST)
        do = _load_rows(do_base, rows, stride_ds, offs_d, SEQ, MASK, UPCAST)
        if MASK:
            lse2 = tl.load(lse_base + rows, mask=rows < SEQ, other=float("inf"))  # → P = 0 past SEQ
            delta = tl.load(delta_base + rows, mask=rows < SEQ, other=0.0)
        else:
            lse2 = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        lse2 = lse2 * 1.4426950408889634
        qk_t = _dot(k, tl.trans(q), tl.zeros([k.shape[0], q.shape[0]], tl.float32), UPCAST)
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        dv = _dot(p_t.to(do.dtype), do, dv, UPCAST)
        dp_t = _dot(v, tl.trans(do), tl.zeros([k.shape[0], q.shape[0]], tl.float32), UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(ds_t.to(q.dtype), q, dk, UPCAST)
        return dk, dv

    @triton.autotune(configs=_configs("bwd"), key=["SEQ", "HEAD_DIM", "UPCAST"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                       stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                       stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                       stride_gb, stride_gs, stride_gh,
                       H, SEQ, qk_scale, sm_scale,
                       HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Grid (cdiv(SEQ, BLOCK_N), B·H): one key block's dK, dV from all queries.
        DK and DV share the strides ``stride_g*`` (both allocated contiguous)."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_ks, offs_d, SEQ, True, UPCAST)
        v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vs, offs_d, SEQ, True, UPCAST)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        lse_base = LSE + pid_bh.to(tl.int64) * SEQ
        delta_base = DELTA + pid_bh.to(tl.int64) * SEQ

        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        m_full = (SEQ // BLOCK_M) * BLOCK_M
        for start_m in range(0, m_full, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_m,
                                 offs_d, stride_qs, stride_ds, SEQ, qk_scale, False, UPCAST)
        if m_full < SEQ:
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, m_full, offs_m,
                                 offs_d, stride_qs, stride_ds, SEQ, qk_scale, True, UPCAST)

        row_ok = (offs_n < SEQ)[:, None]
        out_off = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gs + offs_d[None, :]
        tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=row_ok)
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_n, offs_d, stride_ks, stride_vs,
                  SEQ, qk_scale, MASK: tl.constexpr, UPCAST: tl.constexpr):
        """Accumulate one key/value block's contribution to dQ."""
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_ks, offs_d, SEQ, MASK, UPCAST)
        v = _load_rows(v_base, cols, stride_vs, offs_d, SEQ, MASK, UPCAST)
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], tl.float32), UPCAST)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where((cols < SEQ)[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], k.shape[0]], tl.float32), UPCAST)
        ds = p * (dp - delta[:, None])
        return _dot(ds.to(k.dtype), k, dq, UPCAST)

    @triton.autotune(configs=_configs("bwd"), key=["SEQ", "HEAD_DIM", "UPCAST"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                     stride_gb, stride_gs, stride_gh,
                     H, SEQ, qk_scale, sm_scale,
                     HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Grid (cdiv(SEQ, BLOCK_M), B·H): one query block's dQ from all keys."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < SEQ
        q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qs, offs_d, SEQ, True, UPCAST)
        do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, stride_ds, offs_d, SEQ, True, UPCAST)
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * SEQ + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * SEQ + offs_m, mask=row_ok, other=0.0)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (SEQ // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, start_n, offs_n, offs_d, stride_ks,
                           stride_vs, SEQ, qk_scale, False, UPCAST)
        if n_full < SEQ:
            dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, n_full, offs_n, offs_d, stride_ks,
                           stride_vs, SEQ, qk_scale, True, UPCAST)
        out_off = b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :]
        tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _upcast(dtype: torch.dtype) -> bool:
    """fp32 inputs compute in fp32; bf16 too under the interpreter, whose bf16 arithmetic is wrong."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_runnable(q, "attention")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, S, H, D = q.shape
    out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    sm_scale = D**-0.5

    def grid(meta):
        return (triton.cdiv(S, meta["BLOCK_M"]), B * H)

    _attn_fwd[grid](q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                    H, S, sm_scale / LN2, HEAD_DIM=D, UPCAST=_upcast(q.dtype))
    return out, lse


def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_runnable(q, "attention")
    q, k, v, out, grad_out = (last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    B, S, H, D = q.shape
    lse = lse.contiguous()
    upcast = _upcast(q.dtype)
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    block = 16 if INTERPRET else 64
    has_glse = grad_lse is not None
    # Without a log-sum-exp gradient the kernel reads no glse (HAS_GLSE is False) but still takes a pointer.
    glse = grad_lse.contiguous().float() if has_glse else delta
    _bwd_delta[(triton.cdiv(S, block), B * H)](out, grad_out, glse, delta, *_strides(out), *_strides(grad_out),
                                               H, S, HAS_GLSE=has_glse, HEAD_DIM=D, BLOCK_M=block)

    dq = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    sm_scale = D**-0.5
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), H, S,
              sm_scale / LN2, sm_scale)
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, *common, HEAD_DIM=D, UPCAST=upcast)
    _attn_bwd_dq[lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)](
        q, k, v, grad_out, lse, delta, dq, *common, HEAD_DIM=D, UPCAST=upcast)
    return dq, dk, dv


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("ul_fast::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, S, H, D], lse [B, H, S] fp32)`` for q, k, v ``[B, S, H, D]``; lse in natural log."""
    _check_inputs(q, k, v)
    return _forward(q, k, v)


@flash_attention_op.register_fake
def _flash_attention_fake(q, k, v):
    B, S, H, D = q.shape
    return q.new_empty((B, S, H, D)), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("ul_fast::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, grad_lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each ``[B, S, H, D]`` contiguous; ``grad_lse`` ``[B, H, S]`` or None."""
    _check_inputs(q, k, v)
    B, S, H, _ = q.shape
    for name, t, shape in (("grad_out", grad_out, q.shape), ("out", out, q.shape), ("lse", lse, (B, H, S)),
                           ("grad_lse", grad_lse, (B, H, S))):
        if t is not None and (t.shape != shape or t.device != q.device):
            raise ValueError(f"{name} must have shape {tuple(shape)} on {q.device}, got {tuple(t.shape)} on "
                             f"{t.device}")
    return _backward(grad_out, q, k, v, out, lse, grad_lse)


@flash_attention_backward_op.register_fake
def _flash_attention_backward_fake(grad_out, q, k, v, out, lse, grad_lse):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.set_materialize_grads(False)  # an unused lse gets grad None, not a zero tensor to read


def _flash_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return torch.ops.ul_fast.flash_attention_backward(grad_out, q, k, v, out, lse, grad_lse)


flash_attention_op.register_autograd(_flash_attention_grad, setup_context=_setup_context)


# ---------------------------------------------------------------- functional API and the kernel table


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention, scale ``D^-½``: q, k, v ``[B, S, H, D]`` → ``[B, S, H, D]``.

    Differentiable (the backward recomputes the probabilities from the saved log-sum-exp).
    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    return torch.ops.ul_fast.flash_attention(q, k, v)[0]


KERNELS: dict[tuple[str, str], Kernel] = (
    {("attention", "cuda"): Kernel(flash_attention, supports)} if triton is not None else {})
"""``(op, device type) -> Kernel``: the CUDA attention when triton is installed."""
