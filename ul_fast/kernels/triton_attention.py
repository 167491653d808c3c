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
inputs :func:`supports` accepts (self-attention at the long sequences where the kernels beat SDPA; everything
else, fp32 and cross-attention included, takes the reference). Under ``TRITON_INTERPRET=1`` the same kernels
run on CPU tensors with a single 16×16 block configuration (the interpreter cannot autotune); on a GPU the
fp16/bf16 block sizes are autotuned per (head dim, sequence length, dtype) and fp32 has one per head dim.

Launches: one flat grid axis (:func:`_grid`), so no batch or head count meets CUDA's 65,535 limit of the other
axes; on the tensors' device (:func:`device_guard`); row offsets in int64.
"""

from __future__ import annotations

import math

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

__all__ = ["HEAD_DIMS", "KERNELS", "faster_than_reference", "flash_attention", "supports"]

HEAD_DIMS = (16, 32, 64, 128)
LN2 = math.log(2.0)
DELTA_BLOCK = 16 if INTERPRET else 64  # rows per program of the backward's Δ kernel


def faster_than_reference(seq_len: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels beat the reference (SDPA) on CUDA at this size, forward and backward.

    Measured on an H200 in bf16 (benchmarks/gpu_bench_attention.py, torch 2.11, 2026-11-28, GPU run 3: the
    kernels as retiled for no register spills), forward+backward ms of the Triton kernels against SDPA's
    backends on contiguous ``[B, H, S, D]`` (SDPA's best case). SDPA's fixed priority puts flash first, so the
    reference runs flash on these inputs:

    ==================  ======  ==========  ==========
    B, H, S, D          Triton  SDPA flash  SDPA cuDNN
    ==================  ======  ==========  ==========
    256, 6, 64, 64      0.797   0.249       0.149
    64, 12, 256, 64     0.904   0.359       0.285
    64, 16, 256, 64     0.798   0.464       0.284
    16, 12, 1024, 64    1.021   0.804       0.490
    8, 16, 1024, 128    1.130   0.971       0.521
    4, 16, 4096, 64     2.699   3.494       2.167
    ==================  ======  ==========  ==========

    The kernels win only at S = 4096 (1.29x flash), so they take S >= 4096 alone. (Before the retiling they
    also won at S = 1024, D = 128: 0.791 ms; the spill-free backward tiles cost that. Forward alone they beat
    flash from S = 256.) fp32 never: its full-precision FMA dots are a correctness path, far slower than
    SDPA's. cuDNN, which SDPA does not pick by default, beats both everywhere.
    """
    return dtype != torch.float32 and seq_len >= 4096


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the Triton kernels take these arguments of ``ul_fast.ops.attention`` (else the reference runs):
    self-attention (one sequence length), a head dim in :data:`HEAD_DIMS`, one dtype; on CUDA only where they
    are faster than the reference (:func:`faster_than_reference`), on CPU tensors under the interpreter."""
    return (triton is not None and q.dim() == 4 and q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES
            and q.numel() > 0 and k.shape == q.shape and k.dtype == q.dtype and v.dtype == q.dtype
            and (faster_than_reference(q.shape[1], q.shape[3], q.dtype) if q.is_cuda else INTERPRET))


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

    # (BLOCK_M, BLOCK_N, num_warps, num_stages, head dims): the fp16/bf16 sweeps. Compiled for sm_90a
    # (tests/test_triton_sm90.py), the 4-warp tiles spill registers at D = 128 (up to 1.9 KB per thread in
    # dK/dV; 255 registers), so D = 128 gets 8-warp (or smaller) tiles that do not; dQ's 32×128 tile spills
    # 4 B at D = 16.
    _SMALL, _ALL, _LARGE = (16, 32, 64), HEAD_DIMS, (128,)
    _FWD_BLOCKS = [(128, 64, 4, 3, _SMALL), (128, 64, 8, 3, _ALL), (128, 128, 8, 3, _ALL), (128, 32, 4, 4, _ALL),
                   (64, 64, 4, 3, _ALL), (64, 32, 4, 4, _ALL)]
    # backward: dK/dV hold BLOCK_N keys and loop over queries, dQ the other way round (one sweep for both)
    _BWD_BLOCKS = [(64, 64, 4, 3, _SMALL), (64, 64, 8, 3, _ALL), (32, 128, 4, 3, (32, 64)), (128, 32, 4, 3, _SMALL),
                   (64, 128, 8, 3, _SMALL), (128, 64, 8, 3, _SMALL), (64, 32, 4, 4, _SMALL), (32, 128, 8, 3, _LARGE),
                   (128, 32, 8, 3, _LARGE), (64, 32, 8, 3, _LARGE), (32, 64, 4, 3, _LARGE)]
    # fp32 (full-precision FMA dots: the correctness path, which dispatch never picks on CUDA) gets one tile per
    # head dim, the one that spills least: an FMA dot holds a D-long row of each operand per thread, so D ≥ 64
    # spills whatever the tile (256 B at D = 64, 2.1 KB at D = 128, against 52 KB for the 64×32 tile before).
    # Two stages: with four, dK/dV at D = 128 needs 234 KB of shared memory.
    _FP32_BLOCKS = {16: (32, 32, 8, 2), 32: (32, 32, 8, 2), 64: (16, 32, 8, 2), 128: (16, 32, 8, 2)}

    def _config(m: int, n: int, warps: int, stages: int, head_dims: tuple[int, ...] = HEAD_DIMS):
        config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        config.head_dims = head_dims  # the head dims it is compiled for (read by _prune)
        return config

    def _configs(kind: str) -> list:
        """Block configurations: one in the interpreter (it cannot autotune), a small sweep on GPU."""
        if INTERPRET:
            return [_config(16, 16, 1, 1)]
        return [_config(*blocks) for blocks in (_FWD_BLOCKS if kind == "fwd" else _BWD_BLOCKS)]

    def _prune(configs, named_args, **kwargs):
        """The configurations for this head dim, without blocks much larger than the sequence (pure padding);
        fp32 gets its one tile per head dim."""
        if kwargs["UPCAST"]:
            return [_config(*_FP32_BLOCKS[kwargs["HEAD_DIM"]])]
        configs = [c for c in configs if kwargs["HEAD_DIM"] in c.head_dims]
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
    def _row_offsets(rows, stride):
        """``[len(rows), 1]`` int64 element offsets ``rows·stride`` (int32 would wrap past 2^31)."""
        return rows[:, None].to(tl.int64) * stride

    @triton.jit
    def _split_pid(SEQ, BLOCK: tl.constexpr):
        """(block index along the sequence, b·H + h) of this program in the flat grid of :func:`_grid`."""
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(SEQ, BLOCK)
        return pid % n_blocks, pid // n_blocks

    @triton.jit
    def _load_rows(base, rows, stride, offs_d, SEQ, MASK: tl.constexpr, UPCAST: tl.constexpr):
        """A ``[len(rows), D]`` tile; rows at or past SEQ read as zeros when MASK. Row offsets are int64: a
        sequence of a fused qkv buffer passes 2^31 elements at ``S·3·H·D``, e.g. S = 65,536 with H·D = 12,288."""
        ptrs = base + _row_offsets(rows, stride) + offs_d[None, :]
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
        """Grid :func:`_grid` with BLOCK_M: one query block of one (batch, head) against all keys."""
        pid_m, pid_bh = _split_pid(SEQ, BLOCK_M)
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
        o_ptrs = O + b * stride_ob + h * stride_oh + _row_offsets(offs_m, stride_os) + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(LSE + pid_bh.to(tl.int64) * SEQ + offs_m, lse, mask=row_ok)

    # ---------------------------------------------------------------- backward

    @triton.jit
    def _bwd_delta(O, DO, GLSE, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                   H, SEQ, HAS_GLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """``Δ = rowsum(dO ∘ O) − dLSE``, fp32 ``[B, H, S]`` (dLSE: gradient flowing into the lse).
        Grid :func:`_grid` with BLOCK_M."""
        pid_m, pid_bh = _split_pid(SEQ, BLOCK_M)
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
        """Grid :func:`_grid` with BLOCK_N: one key block's dK, dV from all queries.
        DK and DV share the strides ``stride_g*`` (both allocated contiguous)."""
        pid_n, pid_bh = _split_pid(SEQ, BLOCK_N)
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
        out_off = b * stride_gb + h * stride_gh + _row_offsets(offs_n, stride_gs) + offs_d[None, :]
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
        """Grid :func:`_grid` with BLOCK_M: one query block's dQ from all keys."""
        pid_m, pid_bh = _split_pid(SEQ, BLOCK_M)
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
        out_off = b * stride_gb + h * stride_gh + _row_offsets(offs_m, stride_gs) + offs_d[None, :]
        tl.store(DQ + out_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _upcast(dtype: torch.dtype) -> bool:
    """fp32 inputs compute in fp32; bf16 too under the interpreter, whose bf16 arithmetic is wrong."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _grid(B: int, H: int, S: int, block: int) -> tuple[int]:
    """The launch grid of every attention kernel: one program per (block of ``block`` rows, batch, head),
    flattened onto axis 0 (up to 2^31 - 1 programs) with the sequence blocks of one head adjacent, so they
    share its K and V in L2. Axis 1 would cap B·H at 65,535 (any batch ≥ 4,096 at 16 heads)."""
    return (triton.cdiv(S, block) * B * H,)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_runnable(q, "attention")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, S, H, D = q.shape
    sm_scale = D**-0.5
    with device_guard(q):
        out = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
        _attn_fwd[lambda meta: _grid(B, H, S, meta["BLOCK_M"])](
            q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), H, S, sm_scale / LN2,
            HEAD_DIM=D, UPCAST=_upcast(q.dtype))
    return out, lse


def _backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_runnable(q, "attention")
    q, k, v, out, grad_out = (last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    B, S, H, D = q.shape
    upcast = _upcast(q.dtype)
    sm_scale = D**-0.5
    with device_guard(q):
        lse = lse.contiguous()
        delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
        has_glse = grad_lse is not None
        # Without a log-sum-exp gradient the kernel reads no glse (HAS_GLSE is False) but still takes a pointer.
        glse = grad_lse.contiguous().float() if has_glse else delta
        _bwd_delta[_grid(B, H, S, DELTA_BLOCK)](out, grad_out, glse, delta, *_strides(out), *_strides(grad_out), H, S,
                                                HAS_GLSE=has_glse, HEAD_DIM=D, BLOCK_M=DELTA_BLOCK)
        dq = torch.empty((B, S, H, D), dtype=q.dtype, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty_like(dq)
        common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), H, S,
                  sm_scale / LN2, sm_scale)
        _attn_bwd_dkdv[lambda meta: _grid(B, H, S, meta["BLOCK_N"])](
            q, k, v, grad_out, lse, delta, dk, dv, *common, HEAD_DIM=D, UPCAST=upcast)
        _attn_bwd_dq[lambda meta: _grid(B, H, S, meta["BLOCK_M"])](
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
