"""What a GPU would reject, checked on CPU: every launch configuration of every Triton kernel compiles for Hopper
(sm_90a) within the H100's shared memory and without register spills (with Triton's compiler and its bundled
ptxas), and every launch grid the wrappers build stays within CUDA's limits, also for huge batches.

"Every configuration": for each kernel launched by ``ul_fast.kernels.triton_attention`` and ``triton_adaln``, each
block configuration its autotuner can pick after the wrapper's pruning (for every sequence length), at every
constexpr value the wrappers pass (head dims 16..128, UPCAST for fp32, HAS_GLSE, each BLOCK_C a channel count
1..MAX_CHANNELS gives) and the input dtypes bf16 and fp32 (adaLN also fp32 x with bf16 modulation, as under
autocast). fp16 compiles to the same registers, spills and shared memory as bf16 for every configuration of the
three attention kernels (measured once with this file), so of those only the Δ kernel, whose
registers differ, is compiled in fp16 too; this keeps the test near 2 minutes on two cores. Pointers and strides
are compiled as 16-divisible, as the real launches specialise them.

Spill bounds (:func:`spill_bound`, bytes of spill stores per thread): 0 for every fp16/bf16 attention
configuration and every adaLN configuration up to C = 4096. A spill goes to local memory inside the inner loop of
a compute- or bandwidth-bound kernel; the autotuner would have to time such a configuration to reject it, and a
pruned-away one costs nothing. Two exceptions, where no tiling avoids spills: the fp32 attention (the correctness
path, never chosen by dispatch on CUDA) whose FMA dots hold a whole D-long row of each operand per thread, 256 B
at D = 64 and 2.1 KB at D = 128 (52 KB before the retiling); and adaLN rows wider than 4096 channels, which do not
fit a block's registers (at most 64 a thread at 32 warps): 256 B up to C = 8192, 640 B up to 16384.

The compiles run in a subprocess without TRITON_INTERPRET (tests/conftest.py sets it), two at a time; run this
file as a script (``python tests/test_triton_sm90.py``) for the table of registers, spills and shared memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

H100_SHARED_MEMORY = 232448  # bytes per block (227 KB), the most a kernel can ask for on sm_90
KERNEL_MODULES = ("ul_fast.kernels.triton_attention", "ul_fast.kernels.triton_adaln")
DTYPES = ("fp16", "bf16", "fp32")


# ---------------------------------------------------------------- enumeration (runs without the interpreter)


def _jit(kernel):
    """The JITFunction of a kernel, autotuned or not."""
    return kernel.fn if hasattr(kernel, "configs") else kernel


def _reachable_configs(kernel, **constexprs) -> list:
    """The configurations the autotuner can choose for these constexprs: the union over sequence lengths of what
    the kernel's early pruning keeps."""
    prune = kernel.early_config_prune
    seen = {}
    for log2_seq in range(21):
        for config in prune(kernel.configs, {"SEQ": 2**log2_seq}, **constexprs):
            seen[str(config)] = config
    return list(seen.values())


def cases() -> list[dict]:
    """One dict per distinct compile: kernel name, pointer dtypes, constexprs, warps and stages, and a label."""
    from ul_fast.kernels import triton_adaln as tn
    from ul_fast.kernels import triton_attention as ta

    out = []

    def add(kernel, label, ptrs, consts, num_warps, num_stages):
        fn = _jit(kernel)
        out.append({"module": fn.__module__, "kernel": fn.__name__, "label": label, "ptrs": ptrs, "consts": consts,
                    "num_warps": num_warps, "num_stages": num_stages})

    for dt in DTYPES:
        upcast = dt == "fp32"
        for D in ta.HEAD_DIMS:
            if dt != "fp16":  # fp16 compiles to the tiles, registers and shared memory of bf16 (checked once)
                for kernel, names in ((ta._attn_fwd, "Q K V O"), (ta._attn_bwd_dkdv, "Q K V DO DK DV"),
                                      (ta._attn_bwd_dq, "Q K V DO DQ")):
                    ptrs = {n: "*" + dt for n in names.split()} | {"LSE": "*fp32", "DELTA": "*fp32"}
                    for c in _reachable_configs(kernel, HEAD_DIM=D, UPCAST=upcast):
                        add(kernel, f"{dt} D={D}", ptrs, {"HEAD_DIM": D, "UPCAST": upcast, **c.kwargs}, c.num_warps,
                            c.num_stages)
            for has_glse in (False, True):
                ptrs = {"O": "*" + dt, "DO": "*" + dt, "GLSE": "*fp32", "DELTA": "*fp32"}
                consts = {"HAS_GLSE": has_glse, "HEAD_DIM": D, "BLOCK_M": ta.DELTA_BLOCK}
                add(ta._bwd_delta, f"{dt} D={D} glse={has_glse}", ptrs, consts, 4, 3)

    # x and modulation in one dtype (fp16 measured once: bf16's spills and shared memory, registers within 20),
    # and fp32 x with bf16 modulation (autocast)
    for x_dt, mod_dt in (("bf16", "bf16"), ("fp32", "fp32"), ("fp32", "bf16")):
        for log2_c in range(tn.MAX_CHANNELS.bit_length()):
            label = f"x {x_dt}, mod {mod_dt}, C={2**log2_c}"
            block_c, rows, warps = tn._launch_shape(2**log2_c)
            ptrs = {"X": "*" + x_dt, "Y": "*" + x_dt, "SCALE": "*" + mod_dt, "SHIFT": "*" + mod_dt}
            add(tn._adaln_fwd, label, ptrs, {"BLOCK_C": block_c, "ROWS": rows}, warps, 3)
            block_c, rows, warps = tn._launch_shape(2**log2_c, backward=True)
            ptrs = {"X": "*" + x_dt, "DY": "*" + x_dt, "DX": "*" + x_dt, "SCALE": "*" + mod_dt,
                    "DSCALE_PART": "*fp32", "DSHIFT_PART": "*fp32"}
            add(tn._adaln_bwd, label, ptrs, {"BLOCK_C": block_c, "ROWS": rows}, warps, 3)
    # Triton compiles an integer argument equal to 1 (S = 1, H = 1, a unit stride) as a compile-time constant:
    # one compile per kernel with every integer argument 1 catches code that treats them as tensors (S.to(...))
    first = {}
    for case in out:
        first.setdefault(case["kernel"], case)
    out += [{**case, "label": case["label"] + ", every int argument = 1", "ones": True} for case in first.values()]
    return out


def launched_kernels() -> set[str]:
    """Names of the Triton kernels the wrappers launch (``name[grid](...)``) in the kernel modules."""
    import importlib
    import inspect

    names = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        names |= {name for name in re.findall(r"\b(_\w+)\[", inspect.getsource(module))
                  if hasattr(getattr(module, name, None), "run")}  # a JITFunction or an Autotuner
    return names


# ---------------------------------------------------------------- one compile


def compile_case(case: dict) -> dict:
    """Compile ``case`` for sm_90a; its registers and spill stores per thread (from ptxas -v) and shared memory."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(case["module"]), case["kernel"])
    fn = _jit(kernel)
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in case["ptrs"]:
            signature[name] = case["ptrs"][name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif "scale" in name or name == "eps":
            signature[name] = "fp32"
        elif case.get("ones"):
            signature[name] = "constexpr"
            case = {**case, "consts": {**case["consts"], name: 1}}
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    knobs.nvidia.dump_ptxas_log = True  # triton runs its bundled ptxas with -v; this prints the report
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs=case["consts"], attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
    report = log.getvalue()
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v report for {case}:\n{report[-2000:]}")
    return {**case, "registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)),
            "shared_bytes": compiled.metadata.shared}


def spill_bound(case: dict) -> int:
    """The most spill-store bytes per thread allowed for ``case`` (module docstring)."""
    consts = case["consts"]
    if consts.get("UPCAST") and consts["HEAD_DIM"] >= 64:
        return {64: 256, 128: 2100}[consts["HEAD_DIM"]]
    if consts.get("BLOCK_C", 0) > 4096:
        return 256 if consts["BLOCK_C"] <= 8192 else 640
    return 0


def compile_all(workers: int = 2) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_case, cases(), chunksize=4))


def _config_text(result: dict) -> str:
    consts = {k: v for k, v in result["consts"].items() if k not in ("HEAD_DIM", "UPCAST")}
    return " ".join(f"{k}={v}" for k, v in consts.items()) + f" w={result['num_warps']} s={result['num_stages']}"


def markdown(results: list[dict]) -> str:
    lines = ["| kernel | dtype, size | config | registers | spill stores (B) | shared memory (B) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['kernel']} | {r['label']} | {_config_text(r)} | {r['registers']} | {r['spill_bytes']} "
                     f"| {r['shared_bytes']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the tests


class _LaunchSpy:
    """Stands in for a Triton kernel: records the grid each launch asks for (under block sizes 16..128) and
    runs nothing."""

    def __init__(self, grids: list):
        self.grids = grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for block in (16, 32, 64, 128):
                self.grids.append(grid({**kwargs, "BLOCK_M": block, "BLOCK_N": block}) if callable(grid) else grid)
        return launch


def _assert_within_cuda_limits(grids: list, programs: int) -> None:
    """Every grid has at most three axes within CUDA's limits (2^31 - 1, then 65,535) and ``programs``
    programs (the flattening lost none)."""
    from ul_fast.kernels.triton_support import MAX_GRID

    assert grids
    for grid in grids:
        assert len(grid) <= 3 and all(n <= limit for n, limit in zip(grid, MAX_GRID)), grid
        assert math.prod(grid) == programs, (grid, programs)


def test_attention_grids_stay_within_cuda_limits(monkeypatch):
    """B·H = 70,000 (a batch of 4,375 at 16 heads): the forward, Δ, dK/dV and dQ launches keep every grid axis
    within CUDA's limits (axes 1 and 2 stop at 65,535). S = 3 is one row block at any block size, so each
    launch has one program per (example, head)."""
    from ul_fast.kernels import triton_attention as ta

    grids = []
    for name in ("_attn_fwd", "_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        monkeypatch.setattr(ta, name, _LaunchSpy(grids))
    B, S, H, D = 4375, 3, 16, 16
    q = torch.zeros(B, S, H, D)
    out, lse = ta._forward(q, q, q)
    ta._backward(q, q, q, q, out, lse, None)
    assert len(grids) == 4 * 4
    _assert_within_cuda_limits(grids, programs=B * H)


def test_adaln_grids_stay_within_cuda_limits(monkeypatch):
    """B = 100,000 examples of one row: the forward and backward launches stay within CUDA's limits, one
    program per example."""
    from ul_fast.kernels import triton_adaln as tn

    grids = []
    for name in ("_adaln_fwd", "_adaln_bwd"):
        monkeypatch.setattr(tn, name, _LaunchSpy(grids))
    x, scale = torch.zeros(100_000, 1, 16), torch.zeros(100_000, 16)
    tn._forward(x, scale, scale, 1e-6)
    tn._backward(x, x, scale, 1e-6)
    assert len(grids) == 2 * 4
    _assert_within_cuda_limits(grids, programs=100_000)


def _run_self(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """This file as a script, in a fresh interpreter without TRITON_INTERPRET (the GPU configurations)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sm90_results() -> list[dict]:
    result = _run_self("--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_launched_kernel_is_enumerated(sm90_results):
    """A kernel added to the modules without an entry in :func:`cases` fails here."""
    result = _run_self("--kernels", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    launched = set(json.loads(result.stdout))
    assert launched >= {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_bwd_delta", "_adaln_fwd", "_adaln_bwd"}
    assert launched == {r["kernel"] for r in sm90_results}


def test_every_configuration_fits_shared_memory_without_spills(sm90_results):
    too_big = [r for r in sm90_results if r["shared_bytes"] > H100_SHARED_MEMORY]
    spilling = [r for r in sm90_results if r["spill_bytes"] > spill_bound(r)]
    assert not too_big, "over the H100's shared memory:\n" + markdown(too_big)
    assert not spilling, "spill more than their bound (spill_bound):\n" + markdown(spilling)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    if "--kernels" in sys.argv:
        print(json.dumps(sorted(launched_kernels())))
    elif "--json" in sys.argv:
        print(json.dumps(compile_all()))
    else:
        print(markdown(compile_all()))
