"""CUDA-graph replay of the network calls of a sampling chain (ul_fast/sampling/cuda_graph.py): identical
results to eager calls (bit for bit on a GPU), recapture when a module's weights move, a fallback with one warning
when capture is impossible, and a pass-through on CPU."""

from __future__ import annotations

import pytest
import torch

from ul_fast.model import UnifiedLatents
from ul_fast.sampling import GraphedCall, graphed_module

from micro import micro_config


def small_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 12))


def test_cpu_calls_pass_through_uncaptured():
    module = small_module()
    graphed = GraphedCall(module)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(graphed(x), module(x))
    assert graphed.graphs == {} and graphed.failure is None


def test_graphed_module_is_kept_per_module():
    first, second = small_module(), small_module()
    assert graphed_module(first) is graphed_module(first)
    assert graphed_module(first) is not graphed_module(second)


def test_model_sampling_with_the_cuda_graph_option_on_cpu_is_unchanged():
    model = UnifiedLatents(micro_config().model).eval()
    runs = [model.sample(2, 2, 2, generator=torch.Generator().manual_seed(1), cuda_graph=flag) for flag in (0, 1)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("sampler, interval", [("ddim", (-20.0, 20.0)), ("heun", (-20.0, 20.0)),
                                               ("dpmpp_2m", (-3.0, 3.0)), ("ancestral", (-20.0, 20.0))])
def test_the_whole_chain_path_draws_what_the_eager_chain_draws(sampler, interval):
    """The whole-chain path (deterministic samplers, guidance decided once for the grid) draws both starting noises
    first; the eager chain draws the decoder's after the latent chain, which draws nothing in between: the same
    images. On a CPU both run eagerly; on CUDA the first is one captured graph (GPU test below)."""
    torch.manual_seed(0)
    model = UnifiedLatents(micro_config().model).eval()
    whole = model._whole_chain_capturable(3, (sampler, sampler), "time", {"labels": torch.arange(2), "guidance": 2.0,
                                                                          "guidance_interval": interval})
    assert whole == (sampler != "ancestral" and interval[0] < -15)
    runs = [model.sample(2, 3, 3, sampler, torch.Generator().manual_seed(4), labels=torch.tensor([1, 5]),
                         guidance=2.0, guidance_interval=interval, cuda_graph=flag) for flag in (False, True)]
    assert torch.equal(*runs)


@pytest.mark.gpu
def test_gpu_a_whole_chain_replays_as_one_graph_bit_for_bit():
    """cuda_graph with ddim and guidance over the whole grid: one graph per chain (both samplers and the final
    denoising), replayed for a second chain, equal to the eager chains bit for bit."""
    from ul_fast.model import unified_latents

    torch.manual_seed(0)
    model = UnifiedLatents(micro_config().model).cuda().eval()
    with torch.no_grad():
        for p in (*model.base.parameters(), *model.decoder.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    labels = torch.tensor([0, 3, 7, 9], device="cuda")

    def chain(cuda_graph: bool, seed: int) -> torch.Tensor:
        return model.sample(4, 6, 6, "ddim", torch.Generator("cuda").manual_seed(seed), labels=labels, guidance=2.0,
                            cuda_graph=cuda_graph)

    for seed in (1, 2):
        assert torch.equal(chain(True, seed), chain(False, seed))
    (graphed,) = unified_latents._GRAPHED_CHAINS[model].values()
    assert graphed.failure is None and len(graphed.graphs) == 1
    assert not graphed_module(model.base).graphs  # no per-call graphs: the whole chain is one


@pytest.mark.gpu
def test_gpu_replay_equals_eager_bit_for_bit_and_returns_fresh_tensors():
    module = small_module().cuda()
    graphed = GraphedCall(module)
    with torch.no_grad():
        outputs = []
        for seed in range(3):
            x = torch.randn(7, 12, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            out = graphed(x)
            assert torch.equal(out, module(x))
            outputs.append(out)
        assert len(graphed.graphs) == 1 and graphed.failure is None
        assert outputs[0].data_ptr() != outputs[1].data_ptr() and not torch.equal(outputs[0], outputs[1])
        graphed(torch.randn(3, 12, device="cuda"))  # another batch size: another graph
        assert len(graphed.graphs) == 2
        module[0].weight = torch.nn.Parameter(module[0].weight * 2)  # a new tensor: the graphs are stale
        x = torch.randn(7, 12, device="cuda")
        assert torch.equal(graphed(x), module(x)) and len(graphed.graphs) == 1


_FALLBACK_SCRIPT = """
import warnings, torch
from ul_fast.sampling import GraphedCall
graphed = GraphedCall(lambda x: x * float(x.sum()))  # reads the host: cannot be captured
x = torch.randn(4, device="cuda")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = graphed(x)
    second = graphed(x)
assert torch.equal(first, x * float(x.sum())) and torch.equal(second, first), (first, second)
assert graphed.failure is not None
messages = [str(w.message) for w in caught if "CUDA-graph capture failed" in str(w.message)]
assert len(messages) == 1, messages
torch.randn(4, device="cuda").sum().item()  # the device and its generator still work
print("fallback ok")
"""


@pytest.mark.gpu
def test_gpu_capture_failure_falls_back_with_one_warning():
    """In a fresh interpreter: a failed capture can leave CUDA state behind that no later test should inherit."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_gpu_graphed_sampling_chain_is_bit_identical_to_eager(autocast):
    torch.manual_seed(0)
    model = UnifiedLatents(micro_config().model).cuda().eval()
    with torch.no_grad():
        for p in model.base.parameters():  # adaLN-Zero starts at zero output: make every path matter
            p.add_(0.2 * torch.randn_like(p))
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    labels = torch.tensor([0, 3, 7, 9], device="cuda")

    def chain(cuda_graph: bool, seed: int) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return model.sample(4, 6, 6, "dpmpp_2m", torch.Generator("cuda").manual_seed(seed), labels=labels,
                                guidance=2.0, guidance_interval=(-3.0, 3.0), cuda_graph=cuda_graph)

    for seed in (1, 2):  # the second chain replays the graphs the first captured
        assert torch.equal(chain(True, seed), chain(False, seed))
    assert graphed_module(model.base).failure is None and len(graphed_module(model.base).graphs) == 2
    assert graphed_module(model.decoder).failure is None


def test_sampling_benchmark_smoke(tmp_path):
    """benchmarks/gpu_bench_sampling.py runs end to end on CPU (its GPU minutes are not spent on a broken script)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench_sampling.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_sampling.json").read_text())["rows"]
    assert [(r["n"], r["sampler"]) for r in rows] == [(2, "ddim"), (2, "dpmpp_2m"), (4, "ddim"), (4, "dpmpp_2m")]
    assert all(r["bit_identical"] for r in rows)
