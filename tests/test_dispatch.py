"""Which implementation runs each op: the kernel tables merged by ``ul_fast.ops.dispatch``, ``UL_FAST_BACKEND``,
the per-op override ``UL_FAST_REFERENCE_OPS``, the measured-slower table ``REFERENCE_IS_FASTER``, the ``supports``
predicate at the dispatch site, ``describe()``, the fallback to the reference when a backend cannot load, and
the ops under torch.compile (the tables are filled when ``ul_fast.ops`` is imported, never inside tracing)."""

from __future__ import annotations

import inspect
import os
import re
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


@pytest.fixture
def default_dispatch(monkeypatch):
    """No backend or per-op override set: the defaults."""
    monkeypatch.delenv("UL_FAST_BACKEND", raising=False)
    monkeypatch.delenv("UL_FAST_REFERENCE_OPS", raising=False)
    return monkeypatch


def _spy_kernels(monkeypatch) -> list[str]:
    """Installs, for every op on CPU, a kernel that runs the reference and logs the op's name."""
    calls = []
    for op in dispatch.OPS:
        def spy(*args, op=op):
            calls.append(op)
            return getattr(reference, op)(*args)
        monkeypatch.setitem(dispatch.KERNELS, (op, "cpu"), Kernel(spy))
    return calls


def _call_every_op() -> None:
    """Each public op once, on small CPU tensors."""
    x, logsnr, seed = torch.randn(2, 3, 4), torch.randn(2), torch.tensor([5])
    ops.noise_inject(x, logsnr, seed)
    ops.diffusion_loss(x, x, logsnr, torch.ones(2), seed)
    ops.logsnr_embed(logsnr, torch.ones(4), torch.randn(6, 8), torch.zeros(6))
    q = torch.randn(2, 5, 2, 16)
    ops.attention(q, q, q)
    ops.adaln_layernorm(x, torch.zeros(2, 4), torch.zeros(2, 4))


@needs_ext
def test_dispatch_uses_the_extension_and_reference_backend_forces_reference(monkeypatch):
    monkeypatch.delenv("UL_FAST_REFERENCE_OPS", raising=False)
    for choice in ("auto", "fast"):
        monkeypatch.setenv("UL_FAST_BACKEND", choice)
        for op in EXTENSION_OPS:
            for device_type in ("cpu", "cuda") if extension_ops.cuda_compiled() else ("cpu",):
                kernel = dispatch.fast_kernel(op, device_type)
                if choice == "auto" and (op, device_type) in dispatch.REFERENCE_IS_FASTER:
                    assert kernel is None, (op, device_type)
                else:
                    assert kernel.fn is getattr(extension_ops, op), (choice, op, device_type)
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    for op in EXTENSION_OPS:
        assert dispatch.fast_kernel(op, "cpu") is None
        assert dispatch.fast_kernel(op, "cuda") is None
    x, logsnr, seed = torch.randn(3, 4, 5), torch.randn(3) * 3, torch.tensor([42])
    z, eps = ops.noise_inject(x, logsnr, seed, True)
    z_ref, eps_ref = reference.noise_inject(x, logsnr, seed, True)
    assert torch.equal(z, z_ref) and torch.equal(eps, eps_ref)


def test_dispatch_picks_triton_on_cuda_and_reference_otherwise(default_dispatch):
    pytest.importorskip("triton")
    from ul_fast.kernels import triton_adaln as tn
    from ul_fast.kernels import triton_attention as ta

    monkeypatch = default_dispatch
    triton_kernels = {"attention": Kernel(ta.flash_attention, ta.supports),
                      "adaln_layernorm": Kernel(tn.adaln_layernorm, tn.supports)}
    for op, kernel in triton_kernels.items():  # the default: Triton unless measured slower
        want = None if (op, "cuda") in dispatch.REFERENCE_IS_FASTER else kernel
        assert dispatch.fast_kernel(op, "cuda") == want
    monkeypatch.setenv("UL_FAST_BACKEND", "fast")
    for op, kernel in triton_kernels.items():
        assert dispatch.fast_kernel(op, "cuda") == kernel
    assert dispatch.fast_kernel("attention", "cpu") is None
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    assert dispatch.fast_kernel("attention", "cuda") is None
    assert dispatch.fast_kernel("adaln_layernorm", "cuda") is None


def test_bad_backend_name_is_refused(monkeypatch):
    monkeypatch.setenv("UL_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="UL_FAST_BACKEND must be one of"):
        ops.attention(*(torch.randn(1, 4, 1, 16) for _ in range(3)))


def test_the_dispatch_site_asks_the_kernel_what_it_supports(default_dispatch):
    """A kernel runs where its ``supports`` says so; other arguments (here cross-attention) take the reference."""
    calls = []

    def spy(q, k, v):
        calls.append(q.shape)
        return reference.attention(q, k, v)

    monkeypatch = default_dispatch
    monkeypatch.setitem(dispatch.KERNELS, ("attention", "cpu"), Kernel(spy, lambda q, k, v: k.shape == q.shape))
    q, k = torch.randn(1, 6, 2, 16), torch.randn(1, 3, 2, 16)
    ops.attention(q, q, q)
    assert calls == [q.shape]
    torch.testing.assert_close(ops.attention(q, k, k), reference.attention(q, k, k), rtol=0, atol=0)
    assert calls == [q.shape]
    monkeypatch.setenv("UL_FAST_BACKEND", "reference")
    ops.attention(q, q, q)
    assert calls == [q.shape]


def test_describe_derives_from_the_op_list(default_dispatch):
    table = dispatch.describe()
    assert set(table) == {f"{op}[{device}]" for op in dispatch.OPS for device in dispatch.DEVICE_TYPES}
    for op in ("attention", "adaln_layernorm"):
        assert table[f"{op}[cpu]"] == f"ul_fast.ops.reference.{op}"
    if extension_ops.available():
        for op in EXTENSION_OPS:
            module = "ops.reference" if (op, "cpu") in dispatch.REFERENCE_IS_FASTER else "kernels.extension_ops"
            assert table[f"{op}[cpu]"] == f"ul_fast.{module}.{op}"
    default_dispatch.setenv("UL_FAST_BACKEND", "reference")
    assert set(dispatch.describe().values()) == {f"ul_fast.ops.reference.{op}" for op in dispatch.OPS}


# ---- measured-slower kernels and the per-op override ------------------------------------------------------

def test_reference_is_faster_names_known_ops_and_says_why():
    assert ("logsnr_embed", "cpu") in dispatch.REFERENCE_IS_FASTER  # the C++ embedding: 0.15-0.28x the reference
    for (op, device_type), why in dispatch.REFERENCE_IS_FASTER.items():
        assert op in dispatch.OPS and device_type in dispatch.DEVICE_TYPES, (op, device_type)
        assert re.search(r"\d\.\d+x", why) and len(why) > 30, why  # a measured ratio, and where it was measured


def test_auto_runs_the_reference_where_it_was_measured_faster_and_fast_runs_every_kernel(default_dispatch):
    """The measured-slower table steers ``auto`` (the default), and ``describe`` tells the truth about it;
    ``fast`` runs the kernel anyway."""
    calls = _spy_kernels(default_dispatch)
    default_dispatch.setattr(dispatch, "REFERENCE_IS_FASTER", {("attention", "cpu"): "0.5x, measured here"})
    _call_every_op()
    assert sorted(calls) == sorted(set(dispatch.OPS) - {"attention"})
    assert dispatch.describe()["attention[cpu]"] == "ul_fast.ops.reference.attention"
    assert dispatch.describe()["adaln_layernorm[cpu]"].endswith(".spy")
    calls.clear()
    default_dispatch.setenv("UL_FAST_BACKEND", "fast")
    _call_every_op()
    assert sorted(calls) == sorted(dispatch.OPS)
    assert dispatch.describe()["attention[cpu]"].endswith(".spy")


@needs_ext
def test_the_default_runs_the_reference_embedding_on_cpu(default_dispatch):
    """The C++ embedding measured slower than the reference on CPU (``REFERENCE_IS_FASTER``): the default
    dispatch does not run it; ``fast`` does."""
    assert dispatch.fast_kernel("logsnr_embed", "cpu") is None
    assert dispatch.describe()["logsnr_embed[cpu]"] == "ul_fast.ops.reference.logsnr_embed"
    default_dispatch.setenv("UL_FAST_BACKEND", "fast")
    assert dispatch.fast_kernel("logsnr_embed", "cpu").fn is extension_ops.logsnr_embed


@pytest.mark.parametrize("choice", ["auto", "fast"])
def test_reference_ops_forces_the_named_ops_only(default_dispatch, choice):
    calls = _spy_kernels(default_dispatch)
    default_dispatch.setattr(dispatch, "REFERENCE_IS_FASTER", {})
    default_dispatch.setenv("UL_FAST_BACKEND", choice)
    default_dispatch.setenv("UL_FAST_REFERENCE_OPS", " logsnr_embed, Attention ,")  # spaces, case, empty names
    assert dispatch.reference_ops() == {"logsnr_embed", "attention"}
    _call_every_op()
    assert sorted(calls) == ["adaln_layernorm", "diffusion_loss", "noise_inject"]
    table = dispatch.describe()
    for device_type in dispatch.DEVICE_TYPES:
        assert table[f"logsnr_embed[{device_type}]"] == "ul_fast.ops.reference.logsnr_embed"
        assert table[f"attention[{device_type}]"] == "ul_fast.ops.reference.attention"
    assert table["noise_inject[cpu]"].endswith(".spy")
    default_dispatch.setenv("UL_FAST_REFERENCE_OPS", "")
    calls.clear()
    _call_every_op()
    assert sorted(calls) == sorted(dispatch.OPS)


def test_unknown_op_in_reference_ops_is_refused(default_dispatch):
    default_dispatch.setenv("UL_FAST_REFERENCE_OPS", "attention,layernorm")
    with pytest.raises(ValueError, match=r"UL_FAST_REFERENCE_OPS names unknown ops \['layernorm'\]"):
        ops.attention(*(torch.randn(1, 4, 1, 16) for _ in range(3)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_code_follows_a_changed_setting(default_dispatch, device):
    """Under torch.compile the settings are read while tracing, and dynamo guards on the values of the
    variables set then, so changing one recompiles instead of running the graph traced for the old value (the
    train-step benchmark sets both variables for every dispatch it interleaves through one compiled model and
    relies on this). A variable *unset* while tracing gets no guard (torch 2.13), hence both are set here."""
    def doubled(q, k, v):
        return 2 * reference.attention(q, k, v)

    default_dispatch.setitem(dispatch.KERNELS, ("attention", device), Kernel(doubled))
    default_dispatch.setattr(dispatch, "REFERENCE_IS_FASTER", {})
    q = torch.randn(1, 4, 1, 16, device=device)
    want = reference.attention(q, q, q)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ops.attention(t, t, t), backend="eager", fullgraph=True)
    for backend, reference_ops, doubles in [("fast", "", True), ("fast", "attention", False), ("auto", "", True),
                                            ("reference", "", False), ("auto", "noise_inject", True)]:
        default_dispatch.setenv("UL_FAST_BACKEND", backend)
        default_dispatch.setenv("UL_FAST_REFERENCE_OPS", reference_ops)
        torch.testing.assert_close(compiled(q), 2 * want if doubles else want, msg=f"{backend}, {reference_ops!r}")


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
def test_torch_compile_fullgraph(default_dispatch):
    """Dynamo traces the ops without graph breaks and AOT autograd runs their fake and backward
    registrations (aot_eager: the same graphs inductor gets, without its ~30 s CPU codegen); ``fast``, so
    that every extension kernel is traced, including those the default leaves out on this device type."""
    default_dispatch.setenv("UL_FAST_BACKEND", "fast")
    _check_compiled("aot_eager", "cpu")


@needs_ext
@pytest.mark.gpu
def test_torch_compile_inductor_cuda(default_dispatch):
    default_dispatch.setenv("UL_FAST_BACKEND", "fast")
    _check_compiled("inductor", "cuda")


@needs_ext
@pytest.mark.slow
def test_unified_latents_loss_compiles_fullgraph_with_extension_ops(default_dispatch):
    """The UL stage-1 loss (encoder, prior and decoder diffusion terms: three noise injections, two fused
    losses, log-SNR embeddings) traces into one graph with the extension's ops and matches eager."""
    default_dispatch.setenv("UL_FAST_BACKEND", "fast")
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
