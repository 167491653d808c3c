"""``noise_inject``: the C++/CUDA extension (``ul_fast.kernels.extension_ops``) against the reference and the
Philox spec; properties every backend shares; the size checks of ``torch.ops.ul_fast.noise_inject``.

Tolerances: the Philox integers are bitwise equal to the spec; normals differ from the torch reference
only through log/sin/cos rounding (libm vs torch's vectorised math), so within a few ulp; z is then exactly
``α·x + σ·ε`` (fp32, rounded once to the output dtype) given the kernel's own α, σ, ε, and within the
rounding bound of ``_assert_fp32_z_close`` of the reference's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from ul_fast import ops
from ul_fast.diffusion import per_example
from ul_fast.kernels import extension_ops as extension
from ul_fast.ops import reference
from ul_fast.ops.philox import philox4x32, philox_normal

pytestmark = pytest.mark.skipif(not extension.available(), reason="ul_fast._C not built")
# Every implementation of the op: the reference (the specification) and the extension's kernel.
BACKENDS = [pytest.param(reference.noise_inject, id="reference"),
            pytest.param(extension.noise_inject, id="extension")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 5, 7), (4, 3, 17, 19), (2, 4099), (5, 1, 2, 3)]
SEEDS = [0, 1, 2**32 - 1, 2**32 + 5, 2**62 - 1]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in units of the fp32 spacing at |b|."""
    spacing = torch.nextafter(b.abs(), torch.tensor(float("inf"))) - b.abs()
    return (a - b).abs() / spacing


def _assert_fp32_z_close(z: torch.Tensor, z_ref: torch.Tensor, x: torch.Tensor, logsnr: torch.Tensor,
                         eps_ref: torch.Tensor) -> None:
    """fp32 ``z = α·x + σ·ε`` of two backends, elementwise. Their ε differ by ≤ 4 ulp and their α, σ by
    ≤ 2 ulp (the tests above; ulp ≤ u·|value|, u = fp32 eps), and each rounds two products and a sum
    (≤ u/2 each): |Δz| ≤ (2 + 2)·u·|α·x| + (4 + 2 + 2)·u·|σ·ε| ≤ 8·u·(|α·x| + |σ·ε|)."""
    alpha, sigma = (per_example(t, x) for t in reference.alpha_sigma(logsnr))
    bound = 8 * torch.finfo(torch.float32).eps * ((alpha * x).abs() + (sigma * eps_ref.float()).abs())
    excess = (z - z_ref).abs() - bound
    assert excess.max() <= 0, f"|Δz| exceeds its bound by {excess.max().item():.3g}"


def _inputs(shape, dtype, generator):
    x = torch.randn(shape, generator=generator).to(dtype)
    logsnr = torch.randn(shape[0], generator=generator) * 6
    seed = torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.int64)
    return x, logsnr, seed


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("first", [0, 2**32 - 3, 2**40 + 11])  # the high counter word in use too
def test_philox_words_bitwise(seed, first):
    groups = torch.arange(first, first + 1500, dtype=torch.int64)
    zeros = torch.zeros_like(groups)
    spec = torch.stack(philox4x32((groups & 0xFFFFFFFF, groups >> 32, zeros, zeros),
                                  (seed & 0xFFFFFFFF, seed >> 32)), dim=1)
    assert torch.equal(extension.philox_words(1500, seed, first), spec)


@pytest.mark.parametrize("seed", [*SEEDS, 2**63 + 12345, 2**64 - 1])  # the last two: negative as int64
def test_a_seed_tensor_gives_the_int_seeds_noise(seed):
    """The reference reads its seed on the device (no host read: it compiles and replays in a CUDA graph): an
    int64 tensor holding the seed's two's-complement bit pattern gives exactly the noise of the int seed."""
    bits = torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64)
    assert torch.equal(philox_normal(1001, bits), philox_normal(1001, seed))
    traced = torch.compile(lambda s: reference.gaussian_noise((7, 11), s), backend="eager", fullgraph=True)
    assert torch.equal(traced(bits), philox_normal(77, seed).reshape(7, 11))


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_normals_within_few_ulp(seed):
    n = 100_003
    kernel, spec = extension.philox_normal(n, seed), philox_normal(n, seed)
    assert kernel.shape == spec.shape == (n,)
    assert _ulps(kernel, spec).max() <= 4  # measured max 3 (libm vs torch sin/cos/log)
    assert (kernel == spec).float().mean() > 0.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_noise_inject_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x, logsnr, seed = _inputs(shape, dtype, gen)
    z, eps = extension.noise_inject(x, logsnr, seed, True)
    z_ref, eps_ref = reference.noise_inject(x, logsnr, seed, True)
    assert z.dtype == eps.dtype == dtype and z.shape == eps.shape == x.shape
    if dtype == torch.float32:
        _assert_fp32_z_close(z, z_ref, x, logsnr, eps_ref)
        assert _ulps(eps, eps_ref).max() <= 4
    else:  # the fp32 values differ by a few ulp, which can flip the final rounding by one step of the dtype
        tol = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 0.5)
        torch.testing.assert_close(z, z_ref, **tol)
        torch.testing.assert_close(eps, eps_ref, **tol)
    z_only, none = extension.noise_inject(x, logsnr, seed, False)
    assert none is None and torch.equal(z_only, z)


@pytest.mark.parametrize("dtype", DTYPES)
def test_z_is_exactly_the_formula_given_own_eps(dtype):
    gen = torch.Generator().manual_seed(11)
    x, logsnr, seed = _inputs((64, 3, 11, 13), dtype, gen)
    logsnr[:4] = torch.tensor([-30.0, 30.0, 0.0, -0.0])
    z, _ = extension.noise_inject(x, logsnr, seed, False)
    eps = extension.philox_normal(x.numel(), seed).reshape(x.shape)
    alpha, sigma = extension.alpha_sigma(logsnr)
    alpha_ref, sigma_ref = reference.alpha_sigma(logsnr)
    assert _ulps(alpha, alpha_ref).max() <= 2 and _ulps(sigma, sigma_ref).max() <= 2
    shape = (-1,) + (1,) * (x.dim() - 1)
    formula = alpha.reshape(shape) * x.float() + sigma.reshape(shape) * eps
    assert torch.equal(z, formula.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_returned_eps_is_the_rounded_stream(dtype):
    x, logsnr, seed = _inputs((3, 1001), dtype, torch.Generator().manual_seed(3))
    _, eps = extension.noise_inject(x, logsnr, seed, True)
    assert torch.equal(eps, extension.philox_normal(x.numel(), seed).reshape(x.shape).to(dtype))


def test_eps_statistics():
    n_examples, per_example = 64, 8192
    x = torch.zeros(n_examples, per_example)
    logsnr = torch.full((n_examples,), -60.0)  # σ = 1 exactly in fp32, α ≈ 1e-13
    _, eps = extension.noise_inject(x, logsnr, torch.tensor([20240917]), True)
    flat = eps.double().reshape(-1)
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(flat.numpy())) < 5 * (24 / n) ** 0.5

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.corrcoef(a.reshape(-1).numpy(), b.reshape(-1).numpy())[0, 1])

    bound = 5 / n**0.5
    for lag in (1, 2, 3, 4, 5):  # within a group (lanes of one Philox call) and across groups
        assert abs(corr(flat[:-lag], flat[lag:])) < bound * 1.1
    assert abs(corr(eps[:-1], eps[1:])) < bound * 1.1  # same position, neighbouring examples
    assert abs(corr(flat[:-1] ** 2, flat[1:] ** 2)) < bound * 3  # Box–Muller pairs: independent radii


@pytest.mark.parametrize("noise_inject", BACKENDS)
def test_determinism_and_seed_sensitivity(noise_inject):
    x, logsnr, seed = _inputs((7, 3, 33, 35), torch.float32, torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        z1, e1 = noise_inject(x, logsnr, seed, True)
        torch.set_num_threads(max(2, threads))
        z2, e2 = noise_inject(x, logsnr, seed, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(z1, z2) and torch.equal(e1, e2)
    z3, e3 = noise_inject(x, logsnr, seed + 1, True)
    assert (e3 != e1).float().mean() > 0.99
    # torch.manual_seed reproduces the seed draw and hence the noise.
    torch.manual_seed(123)
    a = noise_inject(x, logsnr, ops.draw_seed("cpu"), True)[1]
    torch.manual_seed(123)
    b = noise_inject(x, logsnr, ops.draw_seed("cpu"), True)[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_is_alpha_times_grad(dtype):
    x, logsnr, seed = _inputs((5, 3, 9), dtype, torch.Generator().manual_seed(8))
    x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(x.shape).to(dtype)
    (dx,) = torch.autograd.grad(extension.noise_inject(x, logsnr, seed, True)[0], x, grad)
    (dx_ref,) = torch.autograd.grad(reference.noise_inject(x_ref, logsnr, seed)[0], x_ref, grad)
    assert dx.dtype == dtype
    alpha, _ = extension.alpha_sigma(logsnr)
    assert torch.equal(dx, (alpha[:, None, None] * grad.float()).to(dtype))
    torch.testing.assert_close(dx, dx_ref, rtol=torch.finfo(dtype).eps, atol=0)


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
@pytest.mark.parametrize("noise_inject", BACKENDS)
def test_gradcheck(noise_inject):
    x, logsnr, seed = _inputs((3, 4, 5), torch.float32, torch.Generator().manual_seed(9))
    x.requires_grad_(True)
    fn = lambda t: noise_inject(t, logsnr, seed, False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-2, atol=1e-3, rtol=1e-3)


def test_non_contiguous_input_is_made_contiguous():
    x, logsnr, seed = _inputs((6, 5, 8), torch.float32, torch.Generator().manual_seed(4))
    xt = x.transpose(1, 2)
    z, eps = extension.noise_inject(xt, logsnr, seed, True)
    z_ref, eps_ref = reference.noise_inject(xt.contiguous(), logsnr, seed, True)
    _assert_fp32_z_close(z, z_ref, xt, logsnr, eps_ref)
    assert z.is_contiguous()


@pytest.mark.parametrize("noise_inject", [pytest.param(ops.noise_inject, id="public"),
                                          pytest.param(extension.noise_inject, id="extension")])
def test_bad_input_errors(noise_inject):
    """The public op checks its arguments; the extension's op still refuses what it cannot read safely."""
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="x must be float32"):
        noise_inject(x.double(), torch.zeros(2), torch.tensor([1]))
    with pytest.raises(ValueError, match="seed must be an int64"):
        noise_inject(x, torch.zeros(2), torch.tensor([1.0]))


@pytest.mark.parametrize("case", ["short logsnr", "long logsnr", "empty seed", "int32 seed", "scalar x",
                                  "backward: short logsnr"])
def test_custom_op_checks_the_sizes_it_reads(case):
    """Called directly (no ul_fast.ops checks in front), the custom ops raise instead of reading out of bounds."""
    x, logsnr, seed = torch.randn(4, 3), torch.zeros(4), torch.tensor([1])
    calls = {
        "short logsnr": lambda: torch.ops.ul_fast.noise_inject(x, logsnr[:2], seed, True),
        "long logsnr": lambda: torch.ops.ul_fast.noise_inject(x, torch.zeros(5), seed, True),
        "empty seed": lambda: torch.ops.ul_fast.noise_inject(x, logsnr, seed[:0], True),
        "int32 seed": lambda: torch.ops.ul_fast.noise_inject(x, logsnr, seed.int(), True),
        "scalar x": lambda: torch.ops.ul_fast.noise_inject(torch.tensor(1.0), logsnr, seed, True),
        "backward: short logsnr": lambda: torch.ops.ul_fast.noise_inject_backward(x, logsnr[:3]),
    }
    with pytest.raises(ValueError, match="logsnr must have shape|seed must be an int64|leading batch"):
        calls[case]()


@pytest.mark.parametrize("noise_inject", BACKENDS + [pytest.param(ops.noise_inject, id="public")])
def test_negative_seed_is_its_bit_pattern_on_every_backend(noise_inject):
    """One meaning on every backend: an int64 seed is its 64-bit two's-complement pattern (the kernels read it
    on the device, where they cannot raise), so -5 draws the spec's stream for 2^64 - 5."""
    x, logsnr, _ = _inputs((3, 41), torch.float32, torch.Generator().manual_seed(6))
    _, eps = noise_inject(x, logsnr, torch.tensor([-5]), True)
    spec = philox_normal(x.numel(), 2**64 - 5).reshape(x.shape)
    assert _ulps(eps, spec).max() <= 4


@pytest.mark.parametrize("noise_inject", BACKENDS)
def test_empty_example_dims(noise_inject):
    z, eps = noise_inject(torch.zeros(3, 0), torch.zeros(3), torch.tensor([1]), True)
    assert z.shape == eps.shape == (3, 0)


@pytest.mark.parametrize("return_noise", [True, False])
def test_opcheck_noise(return_noise):
    x = torch.randn(3, 4, 5, requires_grad=True)
    logsnr, seed = torch.randn(3) * 3, torch.tensor([42])
    torch.library.opcheck(torch.ops.ul_fast.noise_inject.default, (x, logsnr, seed, return_noise))
    torch.library.opcheck(torch.ops.ul_fast.noise_inject_backward.default, (torch.randn(3, 4, 5), logsnr))


# ---- GPU (run by benchmarks/gpu_check.sh) -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(8, 16, 64, 64)])
def test_cuda_noise_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(21)
    x, logsnr, seed = (t.cuda() for t in _inputs(shape, dtype, gen))
    z, eps = extension.noise_inject(x, logsnr, seed, True)
    z_ref, eps_ref = reference.noise_inject(x, logsnr, seed, True)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(
        rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 0.5)
    torch.testing.assert_close(z, z_ref, **tol)
    torch.testing.assert_close(eps, eps_ref, **tol)
    # Exact formula given the kernel's own α, σ, ε.
    alpha, sigma = extension.alpha_sigma(logsnr)
    own = extension.philox_normal(x.numel(), seed).reshape(x.shape)
    view = (-1,) + (1,) * (x.dim() - 1)
    assert torch.equal(z, (alpha.reshape(view) * x.float() + sigma.reshape(view) * own).to(dtype))
    # Misaligned storage takes the scalar path and must agree too.
    x_off = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view(x.shape).copy_(x)
    assert torch.equal(extension.noise_inject(x_off, logsnr, seed, True)[0], z)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1025, 70_000])
def test_cuda_noise_one_element_per_example(batch):
    """More examples per block than threads (each block of 1024 elements spans 1024 examples) and a grid
    of more than 65,535 blocks' worth of examples: z matches the formula with the kernel's own α, σ, ε."""
    x, logsnr, seed = (t.cuda() for t in _inputs((batch, 1), torch.float32, torch.Generator().manual_seed(7)))
    z, eps = extension.noise_inject(x, logsnr, seed, True)
    alpha, sigma = extension.alpha_sigma(logsnr)
    assert torch.equal(eps.reshape(-1), extension.philox_normal(batch, seed))
    assert torch.equal(z, alpha[:, None] * x + sigma[:, None] * eps)
    (dx,) = torch.autograd.grad(extension.noise_inject(x.requires_grad_(True), logsnr, seed)[0], x, torch.ones_like(x))
    assert torch.equal(dx, alpha[:, None].expand_as(x))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_ops_on_a_non_current_device_keep_the_current_device():
    """Tensors on cuda:1 while cuda:0 is current: right results, and cuda:0 is still current after each op."""
    torch.cuda.set_device(0)
    x, logsnr, seed = (t.to("cuda:1") for t in _inputs((4, 3, 17), torch.float32, torch.Generator().manual_seed(9)))
    z, eps = extension.noise_inject(x, logsnr, seed, True)
    assert torch.cuda.current_device() == 0 and z.device == x.device
    own = extension.philox_normal(x.numel(), seed).reshape(x.shape)
    alpha, sigma = extension.alpha_sigma(logsnr)
    assert torch.equal(eps, own)
    assert torch.equal(z, alpha[:, None, None] * x + sigma[:, None, None] * own)
    pred = torch.randn_like(x).requires_grad_(True)
    loss = extension.diffusion_loss(pred, x, logsnr, torch.ones_like(logsnr), seed, "eps")
    (dpred,) = torch.autograd.grad(loss.sum(), pred)
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(loss, 0.5 * (own - pred).square().sum((1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpred, pred.detach() - own, rtol=1e-5, atol=1e-5)
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_cpu_eps_parity(seed):
    n = 1_000_003
    on_cuda = extension.philox_normal(n, torch.tensor([seed], device="cuda")).cpu()
    on_cpu = extension.philox_normal(n, seed)
    assert _ulps(on_cuda, on_cpu).max() <= 4
    assert (on_cuda == on_cpu).float().mean() > 0.5


@pytest.mark.gpu
def test_cuda_backward_and_graph_replay():
    x, logsnr, seed = (t.cuda() for t in _inputs((16, 4, 32, 32), torch.bfloat16, torch.Generator().manual_seed(2)))
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    (dx,) = torch.autograd.grad(extension.noise_inject(x, logsnr, seed)[0], x, grad)
    alpha, _ = extension.alpha_sigma(logsnr)
    assert torch.equal(dx, (alpha[:, None, None, None] * grad.float()).to(x.dtype))

    x = x.detach()
    static_seed = ops.draw_seed("cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        extension.noise_inject(x, logsnr, static_seed, True)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_seed.copy_(ops.draw_seed("cuda"))
        z_graph, eps_graph = extension.noise_inject(x, logsnr, static_seed, True)
    outputs = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        z_eager, eps_eager = extension.noise_inject(x, logsnr, static_seed, True)
        assert torch.equal(z_graph, z_eager) and torch.equal(eps_graph, eps_eager)
        outputs.append(eps_graph.clone())
    assert not torch.equal(outputs[0], outputs[1])  # a fresh seed is drawn inside the graph each replay
