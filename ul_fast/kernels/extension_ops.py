"""The C++/CUDA kernels of the extension ``ul_fast._C`` (sources in ``csrc/``) as ``torch.library`` ops.

Layering: ``_C`` kernel (raw pointers) -> ``torch.ops.ul_fast.*`` custom op with ``register_fake`` and
``register_autograd`` (each checks the devices, dtypes and sizes the kernel reads, so no call can read out
of bounds) -> the functions with the reference signatures below, which assume arguments that passed the
checks in :mod:`ul_fast.ops` -> :data:`KERNELS`, for ``cpu`` (always) and ``cuda`` (when ``_C`` has CUDA
kernels).

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
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

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

def _dtype_code(name: str, t: Tensor) -> int:
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return _DTYPE_CODES[t.dtype]


def _on_cuda(t: Tensor) -> bool:
    if t.device.type == "cpu":
        return False
    if t.device.type == "cuda":
        if not cuda_compiled():
            raise RuntimeError("ul_fast._C was built without CUDA kernels; rebuild with nvcc available "
                               "(UL_FAST_CUDA=1) or use UL_FAST_BACKEND=reference")
        return True
    raise RuntimeError(f"ul_fast compiled kernels support cpu and cuda tensors, got {t.device}")


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


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

@torch.library.custom_op("ul_fast::noise_inject", mutates_args=())
def noise_inject_op(x: Tensor, logsnr: Tensor, seed: Tensor, return_noise: bool) -> tuple[Tensor, Tensor]:
    """``z = α(λ_b)·x + σ(λ_b)·ε``: x ``[B, ...]``, logsnr ``[B]``, seed int64 ``[1]`` -> ``(z, ε)`` in
    x.dtype; ε is an empty tensor unless ``return_noise``."""
    _same_device(x=x, logsnr=logsnr, seed=seed)
    code = _dtype_code("x", x)
    x = x.contiguous()
    lam, seed = _fp32_vector("logsnr", logsnr, _batch("x", x)), _seed(seed)
    z = torch.empty_like(x)
    eps = torch.empty_like(x) if return_noise else x.new_empty(0)
    args = (x.data_ptr(), z.data_ptr(), eps.data_ptr() if return_noise else 0, code, lam.data_ptr(),
            seed.data_ptr(), x.numel(), x.shape[0])
    if _on_cuda(x):
        _C.noise_inject_cuda(*args, x.device.index, _stream(x))
    else:
        _C.noise_inject_cpu(*args, torch.get_num_threads())
    return z, eps


@noise_inject_op.register_fake
def _(x, logsnr, seed, return_noise):
    return x.new_empty(x.shape), (x.new_empty(x.shape) if return_noise else x.new_empty(0))


@torch.library.custom_op("ul_fast::noise_inject_backward", mutates_args=())
def noise_inject_backward_op(grad: Tensor, logsnr: Tensor) -> Tensor:
    """``dx = α(λ_b)·grad`` (z's gradient w.r.t. x; ε is not needed): grad ``[B, ...]`` -> like grad."""
    _same_device(grad=grad, logsnr=logsnr)
    code = _dtype_code("grad", grad)
    grad = grad.contiguous()
    lam = _fp32_vector("logsnr", logsnr, _batch("grad", grad))
    dx = torch.empty_like(grad)
    args = (grad.data_ptr(), dx.data_ptr(), code, lam.data_ptr(), grad.numel(), grad.shape[0])
    if _on_cuda(grad):
        _C.noise_backward_cuda(*args, grad.device.index, _stream(grad))
    else:
        _C.noise_backward_cpu(*args, torch.get_num_threads())
    return dx


@noise_inject_backward_op.register_fake
def _(grad, logsnr):
    return grad.new_empty(grad.shape)


def _noise_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _noise_backward(ctx, grad_z: Tensor, grad_eps: Tensor):
    (logsnr,) = ctx.saved_tensors
    return noise_inject_backward_op(grad_z, logsnr), None, None, None


noise_inject_op.register_autograd(_noise_backward, setup_context=_noise_setup)


# ---- diffusion loss --------------------------------------------------------------------------------

def _loss_args(pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor, seed: Tensor,
               prediction: str, loss_factor: float, bias: float | None) -> tuple[tuple, tuple[Tensor, ...]]:
    """Kernel arguments, and the contiguous tensors they point into (kept alive by the caller)."""
    _same_device(pred=pred, x=x, logsnr=logsnr, neg_dlogsnr_dt=neg_dlogsnr_dt, seed=seed)
    if pred.shape != x.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and x {tuple(x.shape)} must have the same shape")
    if prediction not in PREDICTIONS:  # the kernel reads a flag: anything but "v" would silently mean ε
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    codes = _dtype_code("pred", pred), _dtype_code("x", x)
    pred, x = pred.contiguous(), x.contiguous()
    batch = _batch("x", x)
    lam, ndl = _fp32_vector("logsnr", logsnr, batch), _fp32_vector("neg_dlogsnr_dt", neg_dlogsnr_dt, batch)
    seed = _seed(seed)
    args = (pred.data_ptr(), x.data_ptr(), *codes, lam.data_ptr(), ndl.data_ptr(), seed.data_ptr(),
            x.numel(), x.shape[0], prediction == "v", bias is not None, float(loss_factor),
            0.0 if bias is None else float(bias))
    return args, (pred, x, lam, ndl, seed)


@torch.library.custom_op("ul_fast::diffusion_loss", mutates_args=())
def diffusion_loss_op(pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor, seed: Tensor,
                      prediction: str, loss_factor: float, bias: float | None) -> Tensor:
    """Per-example ``½·(−dλ/dt)·w(λ)·‖ε − ε̂‖²`` (fp32 ``[B]``) with ε regenerated from ``seed``;
    ``prediction`` is ``"v"`` or ``"eps"`` (checked by :func:`ul_fast.ops.diffusion_loss`)."""
    args, keep = _loss_args(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if _on_cuda(x):
        workspace = torch.empty(_C.loss_workspace_cuda(x.numel(), x.shape[0]), dtype=torch.float32,
                                device=x.device)
        _C.loss_forward_cuda(*args, out.data_ptr(), workspace.data_ptr(), x.device.index, _stream(x))
    else:
        _C.loss_forward_cpu(*args, out.data_ptr(), torch.get_num_threads())
    del keep
    return out


@diffusion_loss_op.register_fake
def _(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias):
    return x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("ul_fast::diffusion_loss_backward", mutates_args=())
def diffusion_loss_backward_op(grad: Tensor, pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor,
                               seed: Tensor, prediction: str, loss_factor: float, bias: float | None,
                               grad_x: bool) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`diffusion_loss_op` for ``grad`` ``[B]``: ``(d pred, d x)``; d x is empty unless
    ``grad_x`` and v-prediction (with ε-prediction the loss does not depend on x)."""
    args, keep = _loss_args(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias)
    _same_device(grad=grad, x=x)
    grad = _fp32_vector("grad", grad, x.shape[0])
    want_dx = grad_x and prediction == "v"
    dpred = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_dx else x.new_empty(0)
    ptrs = (grad.data_ptr(), dpred.data_ptr(), dx.data_ptr() if want_dx else 0)
    if _on_cuda(x):
        _C.loss_backward_cuda(*args, *ptrs, x.device.index, _stream(x))
    else:
        _C.loss_backward_cpu(*args, *ptrs, torch.get_num_threads())
    del keep
    return dpred, dx


@diffusion_loss_backward_op.register_fake
def _(grad, pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias, grad_x):
    want_dx = grad_x and prediction == "v"
    return pred.new_empty(pred.shape), (x.new_empty(x.shape) if want_dx else x.new_empty(0))


def _loss_setup(ctx, inputs, output) -> None:
    pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, loss_factor, bias = inputs
    ctx.save_for_backward(pred, x, logsnr, neg_dlogsnr_dt, seed)
    ctx.options = (prediction, loss_factor, bias)


def _loss_backward(ctx, grad: Tensor):
    pred, x, logsnr, neg_dlogsnr_dt, seed = ctx.saved_tensors
    prediction, loss_factor, bias = ctx.options
    want_dx = ctx.needs_input_grad[1] and prediction == "v"
    dpred, dx = diffusion_loss_backward_op(grad, pred, x, logsnr, neg_dlogsnr_dt, seed, prediction,
                                           loss_factor, bias, want_dx)
    return dpred, (dx if want_dx else None), None, None, None, None, None, None


diffusion_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# ---- log-SNR embedding -----------------------------------------------------------------------------

def _embed_args(logsnr: Tensor, frequencies: Tensor, weight: Tensor, bias: Tensor) -> tuple[tuple, tuple]:
    _same_device(logsnr=logsnr, frequencies=frequencies, weight=weight, bias=bias)
    if logsnr.dim() != 1 or frequencies.dim() != 1:
        raise ValueError(f"logsnr and frequencies must be 1-D, got {tuple(logsnr.shape)} and "
                         f"{tuple(frequencies.shape)}")
    if weight.dim() != 2 or weight.shape[1] != 2 * frequencies.shape[0]:
        raise ValueError(f"weight must have shape [N, 2F] = [N, {2 * frequencies.shape[0]}], "
                         f"got {tuple(weight.shape)}")
    if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
        raise ValueError(f"bias must have shape [N] = [{weight.shape[0]}] and dtype {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    code = _dtype_code("weight", weight)
    lam = _fp32_vector("logsnr", logsnr, logsnr.shape[0])
    freqs = _fp32_vector("frequencies", frequencies, frequencies.shape[0])
    weight, bias = weight.contiguous(), bias.contiguous()
    args = (lam.data_ptr(), freqs.data_ptr(), weight.data_ptr(), bias.data_ptr(), code, lam.shape[0],
            freqs.shape[0], weight.shape[0])
    return args, (lam, freqs, weight, bias)


@torch.library.custom_op("ul_fast::logsnr_embed", mutates_args=())
def logsnr_embed_op(logsnr: Tensor, frequencies: Tensor, weight: Tensor,
                    bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``SiLU(W·[sin λf, cos λf] + b)``: logsnr ``[B]``, frequencies ``[F]``, weight ``[N, 2F]``,
    bias ``[N]`` -> (out ``[B, N]`` in weight.dtype, pre-activation ``[B, N]`` fp32, features ``[B, 2F]``
    fp32); the last two are saved for backward."""
    args, keep = _embed_args(logsnr, frequencies, weight, bias)
    batch, n_out = logsnr.shape[0], weight.shape[0]
    out = torch.empty(batch, n_out, dtype=weight.dtype, device=weight.device)
    pre = torch.empty(batch, n_out, dtype=torch.float32, device=weight.device)
    feats = torch.empty(batch, weight.shape[1], dtype=torch.float32, device=weight.device)
    ptrs = (out.data_ptr(), pre.data_ptr(), feats.data_ptr())
    if _on_cuda(weight):
        _C.embed_forward_cuda(*args, *ptrs, weight.device.index, _stream(weight))
    else:
        _C.embed_forward_cpu(*args, *ptrs, torch.get_num_threads())
    del keep
    return out, pre, feats


@logsnr_embed_op.register_fake
def _(logsnr, frequencies, weight, bias):
    batch, n_out = logsnr.shape[0], weight.shape[0]
    return (weight.new_empty(batch, n_out), weight.new_empty(batch, n_out, dtype=torch.float32),
            weight.new_empty(batch, weight.shape[1], dtype=torch.float32))


@torch.library.custom_op("ul_fast::logsnr_embed_backward", mutates_args=())
def logsnr_embed_backward_op(grad: Tensor, pre: Tensor, feats: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(dW, db)`` of :func:`logsnr_embed_op` from the output gradient ``[B, N]`` and the saved
    pre-activation and features; weight gives the shapes and dtype."""
    _same_device(grad=grad, pre=pre, feats=feats, weight=weight)
    code = _dtype_code("weight", weight)
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
    args = (0, 0, 0, 0, code, batch, n_freq, n_out, grad.data_ptr(), pre.data_ptr(), feats.data_ptr(),
            dweight.data_ptr(), dbias.data_ptr())
    if _on_cuda(weight):
        _C.embed_backward_cuda(*args, weight.device.index, _stream(weight))
    else:
        _C.embed_backward_cpu(*args, torch.get_num_threads())
    return dweight, dbias


@logsnr_embed_backward_op.register_fake
def _(grad, pre, feats, weight):
    return weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _embed_setup(ctx, inputs, output) -> None:
    _, pre, feats = output
    ctx.mark_non_differentiable(pre, feats)
    ctx.save_for_backward(pre, feats, inputs[2])


def _embed_backward(ctx, grad_out: Tensor, grad_pre: Tensor, grad_feats: Tensor):
    pre, feats, weight = ctx.saved_tensors
    dweight, dbias = logsnr_embed_backward_op(grad_out, pre, feats, weight)
    return None, None, dweight, dbias


logsnr_embed_op.register_autograd(_embed_backward, setup_context=_embed_setup)


# ---- implementations with the signatures of ul_fast.ops.reference (arguments checked by ul_fast.ops) --

def noise_inject(x: Tensor, logsnr: Tensor, seed: Tensor,
                 return_noise: bool = False) -> tuple[Tensor, Tensor | None]:
    """Fused :func:`ul_fast.ops.reference.noise_inject`: returns ``(z, ε or None)`` in x.dtype."""
    z, eps = noise_inject_op(x, logsnr, seed, bool(return_noise))
    return z, (eps if return_noise else None)


def diffusion_loss(pred: Tensor, x: Tensor, logsnr: Tensor, neg_dlogsnr_dt: Tensor, seed: Tensor,
                   prediction: str = "v", loss_factor: float = 1.0, bias: float | None = None) -> Tensor:
    """Fused :func:`ul_fast.ops.reference.diffusion_loss`: per-example loss, fp32 ``[B]``."""
    return diffusion_loss_op(pred, x, logsnr, neg_dlogsnr_dt, seed, prediction, float(loss_factor),
                             None if bias is None else float(bias))


def logsnr_embed(logsnr: Tensor, frequencies: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Fused :func:`ul_fast.ops.reference.logsnr_embed`: ``[B]`` -> ``[B, N]`` in weight.dtype."""
    return logsnr_embed_op(logsnr, frequencies, weight, bias)[0]


def philox_normal(numel: int, seed: int | Tensor) -> Tensor:
    """Debug: the first ``numel`` normals of the noise stream from the compiled kernels (fp32, flat).

    An int seed runs the CPU kernel; a seed tensor runs on its device (CUDA reads it in-kernel).
    """
    if _C is None:
        raise RuntimeError(_UNAVAILABLE)
    if isinstance(seed, Tensor) and seed.device.type == "cuda":
        out = torch.empty(numel, dtype=torch.float32, device=seed.device)
        if _on_cuda(seed):
            seed = _seed(seed)
            _C.philox_normal_cuda(seed.data_ptr(), numel, out.data_ptr(), seed.device.index, _stream(seed))
        return out
    value = int(seed.reshape(-1)[0].item()) if isinstance(seed, Tensor) else int(seed)
    out = torch.empty(numel, dtype=torch.float32)
    _C.philox_normal_cpu(value & (2**64 - 1), numel, out.data_ptr(), torch.get_num_threads())
    return out


def philox_words(groups: int, seed: int, first: int = 0) -> Tensor:
    """Debug: Philox4x32-10 words ``[groups, 4]`` (int64 holding uint32) of the CPU kernel for counter
    groups ``first .. first + groups - 1``."""
    if _C is None:
        raise RuntimeError(_UNAVAILABLE)
    words = torch.empty(groups * 4, dtype=torch.int32)
    _C.philox_words_cpu(int(seed) & (2**64 - 1), int(first), groups, words.data_ptr())
    return (words.to(torch.int64) & 0xFFFFFFFF).reshape(groups, 4)


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Debug: the per-example ``(α, σ)`` (fp32 ``[B]``) the kernels compute, on logsnr's device."""
    if _C is None:
        raise RuntimeError(_UNAVAILABLE)
    lam = _fp32_vector("logsnr", logsnr, _batch("logsnr", logsnr))
    alpha, sigma = torch.empty_like(lam), torch.empty_like(lam)
    if _on_cuda(lam):
        _C.alpha_sigma_cuda(lam.data_ptr(), lam.numel(), alpha.data_ptr(), sigma.data_ptr(), lam.device.index,
                            _stream(lam))
    else:
        _C.alpha_sigma_cpu(lam.data_ptr(), lam.numel(), alpha.data_ptr(), sigma.data_ptr())
    return alpha, sigma


_DEVICE_TYPES = ("cpu", "cuda") if cuda_compiled() else ("cpu",) if available() else ()
KERNELS: dict[tuple[str, str], Kernel] = {
    (fn.__name__, device_type): Kernel(fn) for fn in (noise_inject, diffusion_loss, logsnr_embed)
    for device_type in _DEVICE_TYPES
}
"""``(op, device type) -> Kernel``: these ops on cpu, and on cuda when ``_C`` has its CUDA kernels."""
