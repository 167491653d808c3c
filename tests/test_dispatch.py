"""Which implementation runs each op: the kernel tables merged by ``ul_fast.ops.dispatch``, ``UL_FAST_BACKEND``,
the ``supports`` predicate at the dispatch site, ``describe()``, the fallback to the reference when a backend
cannot load, and the ops under torch.compile (the tables are filled when ``ul_fast.ops`` is imported, never
inside tracing)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ul_fast import ops
from ul_fast.kernels import Kernel, extension_ops
from ul_fast.ops import dispatch, reference

needs_ext = pytest.mark.skipif(not extension_ops.available(), reason="ul_fast._C not built")
EXTENSION_OPS = ("noise_inject", "diffusion_loss", "logsnr_embed")


def _run_script(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_every_kernel_implements_a_known_op_with_the_reference_signature():
    assert dispatch.KERNELS, "no fast backend loaded"
    for (op, device_type), kernel in dispatch.KERNELS.items():
        assert op in dispatch.OPS and device_type in dispatch.DEVICE_TYPES, (op, device_type)
        assert isinstance(kernel, Kernel)
        want = list(inspect.signature(getattr(reference, op)).parameters)
        assert list(inspect.signature(kernel.fn).parameters) == want, (op, kernel.fn)
        assert list(inspect.signature(kernel.supports).parameters) in (want, ["args"]), (op, kernel.supports)


@needs_ext
def test_dispatch_uses_the_extension_and_reference_backend_forces_reference(monkeypatch):
    monkeypatch.setenv("UL_FAST_BACKEND", "auto")
    for op in EXTENSION_OPS:
        assert dispatch.fast_kernel(op, "cpu").fn is getattr(extension_ops, op)
        if extension_ops.cuda_compiled():
            assert dispatch.fast_kernel(op, "cuda").fn is getattr(extension_ops, op)
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    for op in EXTENSION_OPS:
        assert dispatch.fast_kernel(op, "cpu") is None
        assert dispatch.fast_kernel(op, "cuda") is None
    x, logsnr, seed = torch.randn(3, 4, 5), torch.randn(3) * 3, torch.tensor([42])
    z, eps = ops.noise_inject(x, logsnr, seed, True)
    z_ref, eps_ref = reference.noise_inject(x, logsnr, seed, True)
    assert torch.equal(z, z_ref) and torch.equal(eps, eps_ref)


def test_dispatch_picks_triton_on_cuda_and_reference_otherwise(monkeypatch):
    pytest.importorskip("triton")
    from ul_fast.kernels import triton_adaln as tn
    from ul_fast.kernels import triton_attention as ta

    monkeypatch.delenv("UL_FAST_BACKEND", raising=False)
    assert dispatch.fast_kernel("attention", "cuda") == Kernel(ta.flash_attention, ta.supports)
    assert dispatch.fast_kernel("adaln_layernorm", "cuda") == Kernel(tn.adaln_layernorm, tn.supports)
    assert dispatch.fast_kernel("attention", "cpu") is None
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    assert dispatch.fast_kernel("attention", "cuda") is None
    assert dispatch.fast_kernel("adaln_layernorm", "cuda") is None


def test_bad_backend_name_is_refused(monkeypatch):
    monkeypatch.setenv("UL_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="UL_FAST_BACKEND must be one of"):
        ops.attention(*(torch.randn(1, 4, 1, 16) for _ in range(3)))


def test_the_dispatch_site_asks_the_kernel_what_it_supports(monkeypatch):
    """A kernel runs where its ``supports`` says so; other arguments (here cross-attention) take the reference."""
    calls = []

    def spy(q, k, v):
        calls.append(q.shape)
        return reference.attention(q, k, v)

    monkeypatch.delenv("UL_FAST_BACKEND", raising=False)
    monkeypatch.setitem(dispatch.KERNELS, ("attention", "cpu"), Kernel(spy, lambda q, k, v: k.shape == q.shape))
    q, k = torch.randn(1, 6, 2, 16), torch.randn(1, 3, 2, 16)
    ops.attention(q, q, q)
    assert calls == [q.shape]
    torch.testing.assert_close(ops.attention(q, k, k), reference.attention(q, k, k), rtol=0, atol=0)
    assert calls == [q.shape]
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    ops.attention(q, q, q)
    assert calls == [q.shape]


def test_describe_derives_from_the_op_list(monkeypatch):
    monkeypatch.delenv("UL_FAST_BACKEND", raising=False)
    table = dispatch.describe()
    assert set(table) == {f"{op}[{device}]" for op in dispatch.OPS for device in dispatch.DEVICE_TYPES}
    for op in ("attention", "adaln_layernorm"):
        assert table[f"{op}[cpu]"] == f"ul_fast.ops.reference.{op}"
    if extension_ops.available():
        for op in EXTENSION_OPS:
            assert table[f"{op}[cpu]"] == f"ul_fast.kernels.extension_ops.{op}"
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    assert set(dispatch.describe().values()) == {f"ul_fast.ops.reference.{op}" for op in dispatch.OPS}


def test_missing_extension_falls_back_with_one_warning():
    result = _run_script("""
        import sys, warnings
        sys.modules["ul_fast._C"] = None  # makes `import ul_fast._C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from ul_fast import ops
            from ul_fast.ops import dispatch, reference
            x, logsnr, seed = torch.randn(2, 5), torch.zeros(2), torch.tensor([1])
            z1, _ = ops.noise_inject(x, logsnr, seed)
            z2, _ = ops.noise_inject(x, logsnr, seed)
            loss = ops.diffusion_loss(x, x, logsnr, torch.ones(2), seed)
        hits = [str(w.message) for w in caught if "compiled kernels unavailable" in str(w.message)]
        assert len(hits) == 1, hits
        assert "not built" in hits[0] and "pip install" in hits[0], hits[0]
        assert dispatch.fast_kernel("noise_inject", "cpu") is None
        assert torch.equal(z1, reference.noise_inject(x, logsnr, seed)[0])
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_a_backend_that_fails_to_import_warns_and_leaves_the_reference():
    """Any error while importing a kernel module (not only a missing optional dependency) must not break
    ``ul_fast.ops``: it warns, and that backend's ops run the reference."""
    result = _run_script("""
        import sys, warnings
        sys.modules["ul_fast.kernels.triton_attention"] = None  # its import now raises ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from ul_fast.ops import dispatch
        messages = [str(w.message) for w in caught]
        hits = [m for m in messages if "backend ul_fast.kernels.triton_attention unavailable" in m]
        assert len(hits) == 1, messages
        table = dispatch.describe()
        assert table["attention[cuda]"] == "ul_fast.ops.reference.attention", table
        assert table["adaln_layernorm[cuda]"] == "ul_fast.kernels.triton_adaln.adaln_layernorm", table
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_modules_import_without_triton():
    """With triton absent the kernel modules import cleanly and their tables are empty."""
    result = _run_script("""
        import sys; sys.modules['triton'] = None
        import ul_fast.kernels.triton_attention as a, ul_fast.kernels.triton_adaln as n
        from ul_fast.ops import dispatch
        assert a.triton is None and n.triton is None and not a.KERNELS and not n.KERNELS
        assert not {op for op, _ in dispatch.KERNELS} & {"attention", "adaln_layernorm"}, dispatch.KERNELS
        print('ok')
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---- the ops under torch.compile ----------------------------------------------------------------------

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
@pytest.mark.slow
def test_unified_latents_loss_compiles_fullgraph_with_extension_ops(monkeypatch):
    """The UL stage-1 loss (encoder, prior and decoder diffusion terms: three noise injections, two fused
    losses, log-SNR embeddings) traces into one graph with the extension's ops and matches eager."""
    monkeypatch.setenv("UL_FAST_BACKEND", "auto")
    from ul_fast.model import UnifiedLatents

    from micro import micro_config

    torch.manual_seed(0)
    model = UnifiedLatents(micro_config().model)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    for op in EXTENSION_OPS:
        assert dispatch.fast_kernel(op, "cpu").fn is getattr(extension_ops, op)

    def loss(images):
        return model.stage1_loss(images)["loss"]

    torch.manual_seed(1)
    eager = loss(x)
    torch.manual_seed(1)
    traced = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    # Exact: aot_eager runs the traced aten graph with no compiler and no decompositions beyond those eager
    # dispatch performs itself, so every op runs the same kernel on the same inputs in the same process
    # (same thread count, same SIMD path); whatever the machine's rounding, eager and traced share it.
    assert torch.equal(traced, eager), (traced, eager)
    traced.backward()
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
