"""The C++/CUDA kernels of the extension ``ul_fast._C`` (sources in ``csrc/``) as ``torch.library`` ops.

Layering: ``_C`` kernel, called with keyword arguments, each tensor as a View ``(address, element count,
dtype code, device)`` (:func:`_view`), checked in C++ (``csrc/boundary.h``: dtype, length, one device,
alignment) before any kernel reads it -> ``torch.ops.ul_fast.*`` custom op with ``register_fake`` and
``register_autograd`` (each checks the shapes and makes its inputs contiguous) -> the functions with the
reference signatures below, which assume arguments that passed the checks in :mod:`ul_fast.ops` ->
:data:`KERNELS`, for ``cpu`` (always) and ``cuda`` (when ``_C`` has CUDA kernels). Under torch.compile those
functions call the custom ops (traceable); in eager mode an ``autograd.Function`` runs the same implementations
and gradients, skipping torch.library's per-call dispatch: these calls are host-bound on a GPU, and a loss
forward + backward took 1.5-2.3x less host time that way (CPU, measured in one process).

Ops (each a single pass over memory; ε is regenerated from the seed, never stored for backward):

- ``noise_inject(x, logsnr, seed, return_noise) -> (z, ε or empty)``; backward ``dx = α·grad``.
- ``diffusion_loss(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias) -> [B]`` fp32;
  backward gives ``pred`` and (v-prediction) ``x`` gradients.
- ``logsnr_embed(logsnr, frequencies, weight, bias) -> (out, pre-activation, features)``; the last two
  are fp32 and saved for the one-launch backward (grads for weight and bias).

Inputs that are not contiguous are copied to contiguous memory first. If ``_C`` is missing or stale this
module warns once and :data:`KERNELS` is empty, so the reference ops run.
"""

from __future__ import annotations

import warnings

import torch

from ul_fast.diffusion import PREDICTIONS
from ul_fast.kernels import Kernel
from ul_fast.kernels.extension_loader import load

Tensor = torch.Tensor
# csrc/common.h DType: the float types the kernels compute on; int64 seeds; int32 debug Philox words.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int64: 3, torch.int32: 4}
_FLOAT_CODES = (0, 1, 2)

_C, _UNAVAILABLE = load()
if _C is None:
    warnings.warn(f"ul_fast: compiled kernels unavailable: {_UNAVAILABLE}. Using the reference ops.",
                  stacklevel=2)


def available() -> bool:
    """True when ``ul_fast._C`` loaded (and so :data:`KERNELS` holds these ops)."""
    return _C is not None


def cuda_compiled() -> bool:
    """True when ``ul_fast._C`` has its CUDA kernels."""
    return _C is not None and bool(_C.WITH_CUDA)


# ---- helpers ---------------------------------------------------------------------------------------

def _check_float(name: str, t: Tensor) -> None:
    if _DTYPE_CODES.get(t.dtype) not in _FLOAT_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _view(t: Tensor) -> tuple[int, int, int, int]:
    """``t`` as the kernels see it, a View (csrc/boundary.h): ``(data, numel, dtype code, device)``, device -1
    for cpu. ``t`` must be contiguous, and the caller keeps it alive until the kernel has run."""
    if not t.is_contiguous():
        raise ValueError("ul_fast._C reads contiguous tensors only")
    return t.data_ptr(), t.numel(), _DTYPE_CODES[t.dtype], t.get_device()


def _launch(t: Tensor) -> dict[str, int]:
    """Where a kernel on ``t``'s device runs: torch's current stream of that device on CUDA (the C++ side
    makes the device current for the launch and restores the caller's), else ``threads`` OpenMP threads."""
    if _on_cuda(t):
        return {"stream": torch.cuda.current_stream(t.device).cuda_stream}
    return {"threads": torch.get_num_threads()}


def _on_cuda(t: Tensor) -> bool:
    if t.device.type == "cpu":
        return False
    if t.device.type == "cuda":
        if not cuda_compiled():
            raise RuntimeError("ul_fast._C was built without CUDA kernels; rebuild with nvcc available "
                               "(UL_FAST_CUDA=1) or use UL_FAST_BACKEND=reference")
        return True
    raise RuntimeError(f"ul_fast compiled kernels support cpu and cuda tensors, got {t.device}")


def _batch(name: str, t: Tensor) -> int:
    """The leading (batch) size of ``t``: the number of per-example values the kernels read."""
    if t.dim() == 0:
        raise ValueError(f"{name} must have a leading batch dimension, got a scalar")
    return t.shape[0]


def _fp32_vector(name: str, t: Tensor, length: int) -> Tensor:
    """``t`` (shape ``[length]``) as a detached, contiguous fp32 vector: the kernels read such per-example
    (or per-frequency) values through a raw fp32 pointer."""
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
    return t.detach().float().contiguous()


def _seed(seed: Tensor) -> Tensor:
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("seed must be an int64 tensor with one element (use ul_fast.ops.draw_seed)")
    return seed.reshape(1).contiguous()


def _shape(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    if t.shape != shape or (dtype is not None and t.dtype != dtype):
        want = f"shape {list(shape)}" + ("" if dtype is None else f" and dtype {dtype}")
        raise ValueError(f"{name} must have {want}, got {tuple(t.shape)} {t.dtype}")


# ---- noise injection -------------------------------------------------------------------------------

def _noise_inject(x: Tensor, logsnr: Tensor, seed: Tensor, return_noise: bool) -> tuple[Tensor, Tensor]:
    """``z = α(λ_b)·x + σ(λ_b)·ε``: x ``[B, ...]``, logsnr ``[B]``, seed int64 ``[1]`` -> ``(z, ε)`` in
    x.dtype; ε is an empty tensor unless ``return_noise``."""
    _check_float("x", x)
    x = x.contiguous()
    lam, seed = _fp32_vector("logsnr", logsnr, _batch("x", x)), _seed(seed)
    z = torch.empty_like(x)
    eps = torch.empty_like(x) if return_noise else x.new_empty(0)
    _C.noise_inject(x=_view(x), z=_view(z), eps=_view(eps) if return_noise else None, logsnr=_view(lam),
                    seed=_view(seed), batch=x.shape[0], **_launch(x))
    return z, eps


noise_inject_op = torch.library.custom_op("ul_fast::noise_inject", _noise_inject, mutates_args=())


@noise_inject_op.register_fake
def _(x, logsnr, seed, return_noise):
    return x.new_empty(x.shape), (x.new_empty(x.shape) if return_noise else x.new_empty(0))


def _noise_inject_backward(grad: Tensor, logsnr: Tensor) -> Tensor:
    """``dx = α(λ_b)·grad`` (z's gradient w.r.t. x; ε is not needed): grad ``[B, ...]`` -> like grad."""
    _check_float("grad", grad)
    grad = grad.contiguous()
    lam = _fp32_vector("logsnr", logsnr, _batch("grad", grad))
    dx = torch.empty_like(grad)
    _C.noise_backward(grad=_view(grad), dx=_view(dx), logsnr=_view(lam), batch=grad.shape[0], **_launch(grad))
    return dx


noise_inject_backward_op = torch.library.custom_op("ul_fast::noise_inject_backward", _noise_inject_backward,
                                                   mutates_args=())


@noise_inject_backward_op.register_fake
def _(grad, logsnr):
    return grad.new_empty(grad.shape)


def _noise_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _noise_backward(ctx, grad_z: Tensor, grad_eps: Tensor):
    (logsnr,) = ctx.saved_tensors
    return noise_inject_backward_op(grad_z, logsnr), None, None, None


noise_inject_op.register_autograd(_noise_backward, setup_context=_noise_setup)


class _EagerNoiseInject(torch.autograd.Function):
    """:data:`noise_inject_op` outside torch.compile: the same implementation and gradient without
    torch.library's per-call dispatch, which costs more host time than the kernel takes on a GPU."""

    @staticmethod
    def forward(ctx, x, logsnr, seed, return_noise):
        _noise_setup(ctx, (x, logsnr, seed, return_noise), None)
        return _noise_inject(x, logsnr, seed, return_noise)

    @staticmethod
    def backward(ctx, grad_z, grad_eps):
        (logsnr,) = ctx.saved_tensors
        return _noise_inject_backward(grad_z, logsnr), None, None, None


# ---- diffusion loss --------------------------------------------------------------------------------

def _loss_args(pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor, seed: Tensor,
               prediction: str, loss_factor: float, bias: float | None) -> tuple[dict, tuple[Tensor, ...]]:
    """Keyword arguments of ``_C.loss_forward`` / ``_C.loss_backward`` shared by both, and the contiguous
    tensors their Views point into (kept alive by the caller)."""
    if pred.shape != x.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and x {tuple(x.shape)} must have the same shape")
    if prediction not in PREDICTIONS:  # the kernel reads a flag: anything but "v" would silently mean ε
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    _check_float("pred", pred)
    _check_float("x", x)
    pred, x = pred.contiguous(), x.contiguous()
    batch = _batch("x", x)
    lam, ndl = _fp32_vector("logsnr", logsnr, batch), _fp32_vector("neg_dlogsnr_dt", neg_dlogsnr_dt, batch)
    seed = _seed(seed)
    args = dict(pred=_view(pred), x=_view(x), logsnr=_view(lam), neg_dlogsnr_dt=_view(ndl), seed=_view(seed),
                batch=batch, v_prediction=prediction == "v", loss_factor=float(loss_factor),
                bias=None if bias is None else float(bias), **_launch(x))
    return args, (pred, x, lam, ndl, seed)


def _diffusion_loss(pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor, seed: Tensor,
                    prediction: str, loss_factor: float, bias: float | None) -> Tensor:
    """Per-example ``½·(−dλ/dt)·w(λ)·‖ε − ε̂‖²`` (fp32 ``[B]``) with ε regenerated from ``seed``;
    ``prediction`` is ``"v"`` or ``"eps"`` (checked by :func:`ul_fast.ops.diffusion_loss`)."""
    args, keep = _loss_args(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    workspace = None
    if _on_cuda(x):
        workspace = torch.empty(_C.loss_workspace(numel=x.numel(), batch=x.shape[0]), dtype=torch.float32,
                                device=x.device)
    _C.loss_forward(**args, out=_view(out), workspace=None if workspace is None else _view(workspace))
    del keep
    return out


diffusion_loss_op = torch.library.custom_op("ul_fast::diffusion_loss", _diffusion_loss, mutates_args=())


@diffusion_loss_op.register_fake
def _(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias):
    return x.new_empty(x.shape[0], dtype=torch.float32)


def _diffusion_loss_backward(grad: Tensor, pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor,
                             seed: Tensor, prediction: str, loss_factor: float, bias: float | None,
                             grad_x: bool) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`diffusion_loss_op` for ``grad`` ``[B]``: ``(d pred, d x)``; d x is empty unless
    ``grad_x`` and v-prediction (with ε-prediction the loss does not depend on x)."""
    args, keep = _loss_args(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias)
    grad = _fp32_vector("grad", grad, x.shape[0])
    want_dx = grad_x and prediction == "v"
    dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_dx else x.new_empty(0)
    _C.loss_backward(**args, grad_out=_view(grad), dpred=_view(dpred), dx=_view(dx) if want_dx else None)
    del keep
    return dpred, dx


diffusion_loss_backward_op = torch.library.custom_op("ul_fast::diffusion_loss_backward", _diffusion_loss_backward,
                                                     mutates_args=())


@diffusion_loss_backward_op.register_fake
def _(grad, pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias, grad_x):
    want_dx = grad_x and prediction == "v"
    return pred.new_empty(pred.shape), (x.new_empty(x.shape) if want_dx else x.new_empty(0))


def _loss_setup(ctx, inputs, output) -> None:
    pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias = inputs
    ctx.save_for_backward(pred, x, logsnr, neg_dlogsnr_dt, seed)
    ctx.options = (prediction, loss_factor, bias)


def _loss_grads(ctx, grad: Tensor, backward) -> tuple:
    """The inputs' gradients from ``backward`` (the backward op, or its implementation in eager mode)."""
    pred, x, logsnr, neg_dlogsnr_dt, seed = ctx.saved_tensors
    prediction, loss_factor, bias = ctx.options
    want_dx = ctx.needs_input_grad[1] and prediction == "v"
    dpred, dx = backward(grad, pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias, want_dx)
    return dpred, (dx if want_dx else None), None, None, None, None, None, None


def _loss_backward(ctx, grad: Tensor):
    return _loss_grads(ctx, grad, diffusion_loss_backward_op)


diffusion_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


class _EagerDiffusionLoss(torch.autograd.Function):
    """:data:`diffusion_loss_op` outside torch.compile, as :class:`_EagerNoiseInject` (a forward and backward
    took 2.3x less host time this way than through the custom ops, measured on CPU)."""

    @staticmethod
    def forward(ctx, *inputs):
        _loss_setup(ctx, inputs, None)
        return _diffusion_loss(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _loss_grads(ctx, grad, _diffusion_loss_backward)


# ---- log-SNR embedding -----------------------------------------------------------------------------

def _embed_args(logsnr: Tensor, frequencies: Tensor, weight: Tensor, bias: Tensor) -> tuple[dict, tuple]:
    if logsnr.dim() != 1 or frequencies.dim() != 1:
        raise ValueError(f"logsnr and frequencies must be 1-D, got {tuple(logsnr.shape)} and "
                         f"{tuple(frequencies.shape)}")
    if weight.dim() != 2 or weight.shape[1] != 2 * frequencies.shape[0]:
        raise ValueError(f"weight must have shape [N, 2F] = [N, {2 * frequencies.shape[0]}], "
                         f"got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
        raise ValueError(f"bias must have shape [N] = [{weight.shape[0]}] and dtype {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    _check_float("weight", weight)
    lam = _fp32_vector("logsnr", logsnr, logsnr.shape[0])
    freqs = _fp32_vector("frequencies", frequencies, frequencies.shape[0])
    weight, bias = weight.contiguous(), bias.contiguous()
    args = dict(logsnr=_view(lam), freqs=_view(freqs), weight=_view(weight), bias=_view(bias),
                nout=weight.shape[0], **_launch(weight))
    return args, (lam, freqs, weight, bias)


def _logsnr_embed(logsnr: Tensor, frequencies: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``SiLU(W·[sin λf, cos λf] + b)``: logsnr ``[B]``, frequencies ``[F]``, weight ``[N, 2F]``,
    bias ``[N]`` -> (out ``[B, N]`` in weight.dtype, pre-activation ``[B, N]`` fp32, features ``[B, 2F]``
    fp32); the last two are saved for backward."""
    args, keep = _embed_args(logsnr, frequencies, weight, bias)
    batch, n_out = logsnr.shape[0], weight.shape[0]
    out = torch.empty(batch, n_out, dtype=weight.dtype, device=weight.device)
    pre = torch.empty(batch, n_out, dtype=torch.float32, device=weight.device)
    feats = torch.empty(batch, weight.shape[1], dtype=torch.float32, device=weight.device)
    _C.embed_forward(**args, out=_view(out), pre=_view(pre), feats=_view(feats))
    del keep
    return out, pre, feats


logsnr_embed_op = torch.library.custom_op("ul_fast::logsnr_embed", _logsnr_embed, mutates_args=())


@logsnr_embed_op.register_fake
def _(logsnr, frequencies, weight, bias):
    batch, n_out = logsnr.shape[0], weight.shape[0]
    return (weight.new_empty(batch, n_out), weight.new_empty(batch, n_out, dtype=torch.float32),
            weight.new_empty(batch, weight.shape[1], dtype=torch.float32))


def _logsnr_embed_backward(grad: Tensor, pre: Tensor, feats: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(dW, db)`` of :func:`logsnr_embed_op` from the output gradient ``[B, N]`` and the saved
    pre-activation and features; weight gives the shapes and dtype."""
    _check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] % 2:
        raise ValueError(f"weight must have shape [N, 2F], got {tuple(weight.shape)}")
    batch, n_out, n_freq = _batch("pre", pre), weight.shape[0], weight.shape[1] // 2
    _shape("grad", grad, (batch, n_out))
    _shape("pre", pre, (batch, n_out), torch.float32)
    _shape("feats", feats, (batch, 2 * n_freq), torch.float32)
    grad = grad.to(weight.dtype).contiguous()
    pre, feats = pre.contiguous(), feats.contiguous()
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    dbias = torch.empty(n_out, dtype=weight.dtype, device=weight.device)
    _C.embed_backward(grad_out=_view(grad), pre=_view(pre), feats=_view(feats), batch=batch, nfreq=n_freq,
                      nout=n_out, dweight=_view(dweight), dbias=_view(dbias), **_launch(weight))
    return dweight, dbias


logsnr_embed_backward_op = torch.library.custom_op("ul_fast::logsnr_embed_backward", _logsnr_embed_backward,
                                                   mutates_args=())


@logsnr_embed_backward_op.register_fake
def _(grad, pre, feats, weight):
    return weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _embed_setup(ctx, inputs, output) -> None:
    _, pre, feats = output
    ctx.mark_non_differentiable(pre, feats)
    ctx.save_for_backward(pre, feats, inputs[2])


def _embed_grads(ctx, grad_out: Tensor, backward) -> tuple:
    """The inputs' gradients from ``backward`` (the backward op, or its implementation in eager mode)."""
    pre, feats, weight = ctx.saved_tensors
    dweight, dbias = backward(grad_out, pre, feats, weight)
    return None, None, dweight, dbias


def _embed_backward(ctx, grad_out: Tensor, grad_pre: Tensor, grad_feats: Tensor):
    return _embed_grads(ctx, grad_out, logsnr_embed_backward_op)


logsnr_embed_op.register_autograd(_embed_backward, setup_context=_embed_setup)


class _EagerLogsnrEmbed(torch.autograd.Function):
    """:data:`logsnr_embed_op` outside torch.compile, as :class:`_EagerNoiseInject`."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _logsnr_embed(*inputs)
        _embed_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_pre, grad_feats):
        return _embed_grads(ctx, grad_out, _logsnr_embed_backward)


# ---- implementations with the signatures of ul_fast.ops.reference (arguments checked by ul_fast.ops) --

def noise_inject(x: Tensor, logsnr: Tensor, seed: Tensor,
                 return_noise: bool = False) -> tuple[Tensor, Tensor | None]:
    """Fused :func:`ul_fast.ops.reference.noise_inject`: returns ``(z, ε or None)`` in x.dtype."""
    op = noise_inject_op if torch.compiler.is_compiling() else _EagerNoiseInject.apply
    z, eps = op(x, logsnr, seed, bool(return_noise))
    return z, (eps if return_noise else None)


def diffusion_loss(pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor, seed: Tensor,
                   prediction: str = "v", loss_factor: float = 1.0, bias: float | None = None) -> Tensor:
    """Fused :func:`ul_fast.ops.reference.diffusion_loss`: per-example loss, fp32 ``[B]``."""
    op = diffusion_loss_op if torch.compiler.is_compiling() else _EagerDiffusionLoss.apply
    return op(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, float(loss_factor),
              None if bias is None else float(bias))


def logsnr_embed(logsnr: Tensor, frequencies: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Fused :func:`ul_fast.ops.reference.logsnr_embed`: ``[B]`` -> ``[B, N]`` in weight.dtype.

    Differentiable in ``weight`` and ``bias`` only: λ and the frequencies get no gradient (unlike the
    reference)."""
    op = logsnr_embed_op if torch.compiler.is_compiling() else _EagerLogsnrEmbed.apply
    return op(logsnr, frequencies, weight, bias)[0]


def embed_supports(logsnr: Tensor, frequencies: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether :func:`logsnr_embed` computes every gradient asked for: not when λ or the frequencies require
    one (it differentiates weight and bias only), so those calls take the reference. (Where it is slower than
    the reference is :data:`ul_fast.ops.dispatch.REFERENCE_IS_FASTER`'s to say.)"""
    return not (logsnr.requires_grad or frequencies.requires_grad)


def philox_normal(numel: int, seed: int | Tensor) -> Tensor:
    """Debug: the first ``numel`` normals of the noise stream from the compiled kernels (fp32, flat).

    An int seed runs the CPU kernel; a seed tensor runs on its device (CUDA reads it in-kernel).
    """
    if _C is None:
        raise RuntimeError(_UNAVAILABLE)
    if not isinstance(seed, Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64)
    seed = _seed(seed)
    out = torch.empty(numel, dtype=torch.float32, device=seed.device)
    _C.philox_normal(seed=_view(seed), out=_view(out), **_launch(seed))
    return out


def philox_words(groups: int, seed: int, first: int = 0) -> Tensor:
    """Debug: Philox4x32-10 words ``[groups, 4]`` (int64 holding uint32) of the CPU kernel for counter
    groups ``first .. first + groups - 1``."""
    if _C is None:
        raise RuntimeError(_UNAVAILABLE)
    words = torch.empty(groups * 4, dtype=torch.int32)
    _C.philox_words(seed=int(seed) & (2**64 - 1), first=int(first), out=_view(words))
    return (words.to(torch.int64) & 0xFFFFFFFF).reshape(groups, 4)


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Debug: the per-example ``(α, σ)`` (fp32 ``[B]``) the kernels compute, on logsnr's device."""
    if _C is None:
        raise RuntimeError(_UNAVAILABLE)
    lam = _fp32_vector("logsnr", logsnr, _batch("logsnr", logsnr))
    alpha, sigma = torch.empty_like(lam), torch.empty_like(lam)
    stream = _launch(lam).get("stream", 0)  # on cpu one thread computes the B values
    _C.alpha_sigma(logsnr=_view(lam), alpha=_view(alpha), sigma=_view(sigma), stream=stream)
    return alpha, sigma


_DEVICE_TYPES = ("cpu", "cuda") if cuda_compiled() else ("cpu",) if available() else ()
KERNELS: dict[tuple[str, str], Kernel] = {
    (kernel.fn.__name__, device_type): kernel
    for kernel in (Kernel(noise_inject), Kernel(diffusion_loss), Kernel(logsnr_embed, embed_supports))
    for device_type in _DEVICE_TYPES
}
"""``(op, device type) -> Kernel``: these ops on cpu, and on cuda when ``_C`` has its CUDA kernels."""
