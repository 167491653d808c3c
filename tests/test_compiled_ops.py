"""ul_fast._C as torch ops: opcheck, torch.compile, dispatch, fallback when the extension is missing or
stale, and build_info."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import ul_fast
from ul_fast import ops
from ul_fast.kernels import compiled_ext
from ul_fast.ops import dispatch, reference

compiled = pytest.importorskip("ul_fast.kernels.compiled")
needs_ext = pytest.mark.skipif(not compiled.available(), reason="ul_fast._C not built")


def _noise_args(requires_grad=True):
    x = torch.randn(3, 4, 5, requires_grad=requires_grad)
    return x, torch.randn(3) * 3, torch.tensor([42])


@needs_ext
@pytest.mark.parametrize("return_noise", [True, False])
def test_opcheck_noise(return_noise):
    x, logsnr, seed = _noise_args()
    torch.library.opcheck(torch.ops.ul_fast.noise_inject.default, (x, logsnr, seed, return_noise))
    torch.library.opcheck(torch.ops.ul_fast.noise_inject_backward.default, (torch.randn(3, 4, 5), logsnr))


@needs_ext
@pytest.mark.parametrize("prediction,bias", [("v", None), ("v", 1.0), ("eps", 2.0)])
def test_opcheck_loss(prediction, bias):
    pred = torch.randn(2, 3, 7, requires_grad=True)
    x = torch.randn(2, 3, 7, requires_grad=True)
    logsnr, ndl, seed = torch.randn(2), torch.rand(2) + 0.5, torch.tensor([3])
    torch.library.opcheck(torch.ops.ul_fast.diffusion_loss.default,
                          (pred, x, logsnr, ndl, seed, prediction, 1.5, bias))
    torch.library.opcheck(torch.ops.ul_fast.diffusion_loss_backward.default,
                          (torch.rand(2), pred.detach(), x.detach(), logsnr, ndl, seed, prediction, 1.5, bias,
                           True))


@needs_ext
def test_opcheck_embed():
    weight = torch.randn(6, 8, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    args = (torch.randn(5), torch.rand(4), weight, bias)
    torch.library.opcheck(torch.ops.ul_fast.logsnr_embed.default, args)
    out, pre, feats = torch.ops.ul_fast.logsnr_embed(*args)
    torch.library.opcheck(torch.ops.ul_fast.logsnr_embed_backward.default,
                          (torch.randn(5, 6), pre.detach(), feats.detach(), weight.detach()))


class _TinyDenoiser(torch.nn.Module):
    """Embeds λ, noises x, predicts v with a per-channel gain from the embedding, returns the loss."""

    def __init__(self, channels: int = 3, n_freq: int = 4):
        super().__init__()
        self.register_buffer("frequencies", torch.linspace(0.1, 2.0, n_freq))
        self.embed = torch.nn.Linear(2 * n_freq, channels)
        self.gain = torch.nn.Parameter(torch.ones(channels))

    def forward(self, x, logsnr, neg_dlogsnr_dt, seed):
        emb = ops.logsnr_embed(logsnr, self.frequencies, self.embed.weight, self.embed.bias)
        z, _ = ops.noise_inject(x, logsnr, seed)
        pred = z * (self.gain + emb)[:, :, None, None]
        return ops.diffusion_loss(pred, x, logsnr, neg_dlogsnr_dt, seed, "v").mean()


def _check_compiled(backend: str, device: str) -> None:
    torch.manual_seed(0)
    model = _TinyDenoiser().to(device)
    x = torch.randn(4, 3, 5, 6, device=device, requires_grad=True)
    args = (x, torch.randn(4, device=device) * 3, torch.rand(4, device=device) + 0.5,
            torch.tensor([9], device=device))
    eager = model(*args)
    eager_grads = torch.autograd.grad(eager, [x, *model.parameters()])
    compiled_model = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled_model(*args)
    grads = torch.autograd.grad(out, [x, *model.parameters()])
    torch.testing.assert_close(out, eager)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)


@needs_ext
def test_torch_compile_fullgraph():
    """Dynamo traces the ops without graph breaks and AOT autograd runs their fake and backward
    registrations (aot_eager: the same graphs inductor gets, without its ~30 s CPU codegen)."""
    _check_compiled("aot_eager", "cpu")


@needs_ext
@pytest.mark.gpu
def test_torch_compile_inductor_cuda():
    _check_compiled("inductor", "cuda")


@needs_ext
def test_dispatch_uses_compiled_and_reference_backend_forces_reference(monkeypatch):
    monkeypatch.setenv("UL_FAST_BACKEND", "auto")
    for op in ("noise_inject", "diffusion_loss", "logsnr_embed"):
        assert dispatch.implementation(op, "cpu") is getattr(compiled, op)
        if compiled.cuda_compiled():
            assert dispatch.implementation(op, "cuda") is getattr(compiled, op)
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    for op in ("noise_inject", "diffusion_loss", "logsnr_embed"):
        assert dispatch.implementation(op, "cpu") is getattr(reference, op)
        assert dispatch.implementation(op, "cuda") is getattr(reference, op)
    x, logsnr, seed = _noise_args(requires_grad=False)
    z, eps = ops.noise_inject(x, logsnr, seed, True)
    z_ref, eps_ref = reference.noise_inject(x, logsnr, seed, True)
    assert torch.equal(z, z_ref) and torch.equal(eps, eps_ref)


def test_stale_extension_is_refused(monkeypatch):
    monkeypatch.setattr(compiled_ext, "source_hash", lambda *a: "0123456789abcdef")
    ext, reason = compiled_ext.load()
    if ext is None and "stale" not in reason:
        pytest.skip(f"extension not built: {reason}")
    assert ext is None and "stale" in reason and "rebuild" in reason


def test_api_version_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(compiled_ext, "API_VERSION", -1)
    ext, reason = compiled_ext.load()
    assert ext is None and ("stale" in reason or "not built" in reason)


def test_missing_extension_falls_back_with_one_warning():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["ul_fast._C"] = None  # makes `import ul_fast._C` raise ImportError
        warnings.simplefilter("always")
        import torch
        from ul_fast import ops
        from ul_fast.ops import dispatch, reference
        x, logsnr, seed = torch.randn(2, 5), torch.zeros(2), torch.tensor([1])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z1, _ = ops.noise_inject(x, logsnr, seed)
            z2, _ = ops.noise_inject(x, logsnr, seed)
            loss = ops.diffusion_loss(x, x, logsnr, torch.ones(2), seed)
        hits = [str(w.message) for w in caught if "compiled kernels unavailable" in str(w.message)]
        assert len(hits) == 1, hits
        assert "not built" in hits[0] and "pip install" in hits[0], hits[0]
        assert dispatch.implementation("noise_inject", "cpu") is reference.noise_inject
        assert torch.equal(z1, reference.noise_inject(x, logsnr, seed)[0])
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@needs_ext
def test_build_info_reports_the_build():
    info = ul_fast.build_info()
    assert info["extension"] and info["reason"] == ""
    assert info["cxx"] and info["openmp"] > 0 and len(info["source_hash"]) == 16
    assert info["ops"]["noise_inject[cpu]"] == "ul_fast.kernels.compiled.noise_inject"
    if shutil.which("nvcc") is None or os.environ.get("UL_FAST_CUDA") == "0":
        pytest.skip("nvcc absent (or UL_FAST_CUDA=0): the CUDA part is not built here")
    assert info["cuda"], "nvcc is on PATH but ul_fast._C was built without its CUDA kernels"
    assert "90a" in info["cuda_archs"] and "80" in info["cuda_archs"]
    assert "cuda" in info["nvcc"].lower()


@needs_ext
@pytest.mark.slow
def test_unified_latents_loss_compiles_fullgraph_with_compiled_ops(monkeypatch):
    """The UL stage-1 loss (encoder, prior and decoder diffusion terms: three noise injections, two fused
    losses, log-SNR embeddings) traces into one graph with the compiled ops and matches eager."""
    monkeypatch.setenv("UL_FAST_BACKEND", "auto")
    from ul_fast.model import UnifiedLatents

    from micro import micro_config

    torch.manual_seed(0)
    model = UnifiedLatents(micro_config().model)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    for op in ("noise_inject", "diffusion_loss", "logsnr_embed"):
        assert dispatch.implementation(op, "cpu") is getattr(compiled, op)

    def loss(images):
        return model.stage1_loss(images)["loss"]

    torch.manual_seed(1)
    eager = loss(x)
    torch.manual_seed(1)
    traced = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-3)
    traced.backward()
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
