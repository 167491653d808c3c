"""GPU benchmark of the Triton flash attention and fused adaLN LayerNorm, baselines re-measured in the
same run on the same card.

Attention (bf16, non-causal, q/k/v strided views of a fused ``[B, S, 3, H, D]`` projection for Triton;
contiguous ``[B, H, S, D]`` for SDPA, its best case): TFLOP/s forward and forward+backward for Triton and
for SDPA's flash, cuDNN and memory-efficient backends (``torch.nn.attention.sdpa_kernel``). FLOPs:
forward ``4·B·H·S²·D``, forward+backward 3.5× that (the usual convention: the backward is 2.5 forwards).

adaLN LayerNorm (bf16, 65536 tokens = 256×256, width 768 and 1024, scale/shift chunks of a ``[B, 2C]``
modulation): forward and forward+backward of the Triton kernel, of the eager reference
(``ul_fast.ops.reference.adaln_layernorm``) and of that reference under ``torch.compile``; GB/s is the
minimal traffic (benchmarks/FLOORS_TRITON.md) over the time.

Timing: ``triton.testing.do_bench`` (CUDA events, median); the first call of each Triton kernel is
made before timing, so autotuning is excluded. Each result row also records the max-abs difference of
the output against SDPA/eager as a sanity check.

Usage: python benchmarks/gpu_bench_attention.py [--out DIR (default $OUT)] [--quick]
       python benchmarks/gpu_bench_attention.py --smoke   (CPU: tiny shapes through the interpreter,
       checks the script's code paths; its timings mean nothing)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernel imports

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from ul_fast.kernels import triton_adaln, triton_attention  # noqa: E402
from ul_fast.ops import reference  # noqa: E402

ATTENTION_SHAPES = [  # (B, H, S, D): the four, then the model presets
    (64, 12, 256, 64), (16, 12, 1024, 64), (8, 16, 1024, 128), (4, 16, 4096, 64),
    (256, 6, 64, 64), (64, 16, 256, 64),
]
ADALN_SHAPES = [(256, 256, 768), (256, 256, 1024)]  # (B, S, C): 65536 tokens
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "mem_efficient": SDPBackend.EFFICIENT_ATTENTION}


def bench_ms(fn, grad_to_none=None, smoke: bool = False) -> float:
    """Median milliseconds of ``fn()``."""
    if smoke:  # CPU: wall clock of one call, only to exercise the code path
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _fwd_bwd(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        out.backward(grad)
    return run


def bench_attention(shape, dtype, device, smoke):
    B, H, S, D = shape
    fwd_flops = 4.0 * B * H * S * S * D
    qkv = torch.randn(B, S, 3, H, D, device=device, dtype=dtype)
    # [B, S, H, D] strided views of one buffer, as leaves (so no unbind-backward copy is timed, as SDPA's
    # leaves time none)
    views = [t.requires_grad_() for t in qkv.unbind(2)]
    grad = torch.randn(B, S, H, D, device=device, dtype=dtype)
    bhsd = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in views]
    grad_bhsd = grad.transpose(1, 2).contiguous()
    rows = []

    with torch.no_grad():
        ours_out = triton_attention.flash_attention(*[t.detach() for t in views])  # autotunes once
    _fwd_bwd(triton_attention.flash_attention, views, grad)()  # autotunes the backward once
    with torch.no_grad():
        fwd_ms = bench_ms(lambda: triton_attention.flash_attention(*views), smoke=smoke)
    full_ms = bench_ms(_fwd_bwd(triton_attention.flash_attention, views, grad), grad_to_none=views, smoke=smoke)
    rows.append({"impl": "triton", "fwd_ms": fwd_ms, "fwd_bwd_ms": full_ms, "max_abs_diff": 0.0})

    for name, backend in SDPA_BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                with torch.no_grad():
                    sdpa_out = F.scaled_dot_product_attention(*[t.detach() for t in bhsd])
                    fwd_ms = bench_ms(lambda: F.scaled_dot_product_attention(*bhsd), smoke=smoke)
                full_ms = bench_ms(_fwd_bwd(F.scaled_dot_product_attention, bhsd, grad_bhsd),
                                   grad_to_none=bhsd, smoke=smoke)
        except RuntimeError as error:  # backend unavailable for this shape/dtype/card
            rows.append({"impl": f"sdpa_{name}", "error": str(error).splitlines()[0][:200]})
            continue
        diff = (ours_out.float() - sdpa_out.transpose(1, 2).float()).abs().max().item()
        rows.append({"impl": f"sdpa_{name}", "fwd_ms": fwd_ms, "fwd_bwd_ms": full_ms, "max_abs_diff": diff})
    for row in rows:
        row.update(shape=dict(zip("BHSD", shape)), dtype=str(dtype).removeprefix("torch."))
        if "fwd_ms" in row:
            row["fwd_tflops"] = fwd_flops / (row["fwd_ms"] * 1e-3) / 1e12
            row["fwd_bwd_tflops"] = 3.5 * fwd_flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return rows


def bench_adaln(shape, dtype, device, smoke):
    B, S, C = shape
    eps = 1e-6
    x = torch.randn(B, S, C, device=device, dtype=dtype, requires_grad=True)
    mod = torch.randn(B, 2 * C, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, S, C, device=device, dtype=dtype)
    elem = x.element_size()
    # minimal traffic: forward reads x, writes y; backward reads x, dy, writes dx (scale/shift: B·C, tiny)
    fwd_bytes = 2 * B * S * C * elem
    full_bytes = fwd_bytes + 3 * B * S * C * elem
    compiled = torch.compile(reference.adaln_layernorm)
    impls = {"triton": triton_adaln.adaln_layernorm, "eager": reference.adaln_layernorm}
    if not smoke:
        impls["torch.compile"] = compiled
    rows = []
    with torch.no_grad():
        expected = reference.adaln_layernorm(x, *mod.chunk(2, dim=1), eps)
    for name, fn in impls.items():
        def call(fn=fn):
            return fn(x, *mod.chunk(2, dim=1), eps)
        def full(call=call):
            call().backward(grad)
        full()  # compile / warm up
        with torch.no_grad():
            diff = (call().float() - expected.float()).abs().max().item()
            fwd_ms = bench_ms(call, smoke=smoke)
        full_ms = bench_ms(full, grad_to_none=[x, mod], smoke=smoke)
        rows.append({"impl": name, "shape": dict(zip("BSC", shape)), "dtype": str(dtype).removeprefix("torch."),
                     "fwd_ms": fwd_ms, "fwd_bwd_ms": full_ms, "max_abs_diff": diff,
                     "fwd_gbps": fwd_bytes / (fwd_ms * 1e-3) / 1e9,
                     "fwd_bwd_gbps": full_bytes / (full_ms * 1e-3) / 1e9})
    return rows


def markdown(meta, attention_rows, adaln_rows) -> str:
    lines = [f"# Triton attention and adaLN LayerNorm — {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; "
             "times are CUDA-event medians (triton.testing.do_bench).", "",
             "## Attention, TFLOP/s forward / forward+backward (ms in brackets)", "",
             "| B, H, S, D | " + " | ".join(["triton", *[f"sdpa {n}" for n in SDPA_BACKENDS]]) + " |",
             "| --- | --- | --- | --- | --- |"]
    by_shape: dict[tuple, dict] = {}
    for row in attention_rows:
        by_shape.setdefault(tuple(row["shape"].values()), {})[row["impl"]] = row
    for shape, impls in by_shape.items():
        cells = []
        for impl in ["triton", *[f"sdpa_{n}" for n in SDPA_BACKENDS]]:
            row = impls.get(impl, {})
            cells.append(f"{row['fwd_tflops']:.0f} / {row['fwd_bwd_tflops']:.0f} "
                         f"({row['fwd_ms']:.3f} / {row['fwd_bwd_ms']:.3f})" if "fwd_ms" in row else "n/a")
        lines.append(f"| {', '.join(map(str, shape))} | " + " | ".join(cells) + " |")
    lines += ["", "## adaLN LayerNorm, ms forward / forward+backward (GB/s of minimal traffic)", "",
              "| B, S, C | impl | forward | forward+backward |", "| --- | --- | --- | --- |"]
    for row in adaln_rows:
        shape = ", ".join(map(str, row["shape"].values()))
        lines.append(f"| {shape} | {row['impl']} | {row['fwd_ms']:.3f} ({row['fwd_gbps']:.0f}) | "
                     f"{row['fwd_bwd_ms']:.3f} ({row['fwd_bwd_gbps']:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                        help="directory for the JSON and markdown results (default: $OUT if set)")
    parser.add_argument("--quick", action="store_true", help="first attention shape and width 768 only")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes (code-path check)")
    args = parser.parse_args(argv)

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_bench_attention: no CUDA device; nothing measured (use --smoke to check the script on CPU)")
        return 0
    device = "cpu" if smoke else "cuda"
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter's bf16 conversions truncate
    attention_shapes = [(1, 2, 33, 32)] if smoke else ATTENTION_SHAPES[:1] if args.quick else ATTENTION_SHAPES
    adaln_shapes = [(2, 9, 48)] if smoke else ADALN_SHAPES[:1] if args.quick else ADALN_SHAPES
    meta = {"device": "cpu (smoke)" if smoke else torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}

    attention_rows = [r for s in attention_shapes for r in bench_attention(s, dtype, device, smoke)]
    adaln_rows = [r for s in adaln_shapes for r in bench_adaln(s, dtype, device, smoke)]
    table = markdown(meta, attention_rows, adaln_rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "triton_attention_adaln.json").write_text(
            json.dumps({"meta": meta, "attention": attention_rows, "adaln": adaln_rows}, indent=1))
        (args.out / "triton_attention_adaln.md").write_text(table)
        print(f"wrote {args.out / 'triton_attention_adaln.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
