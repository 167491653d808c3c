"""CUDA-graph replay of a network call or of a whole sampling chain.

A sampling chain calls the same network 32 times or more on tensors of one shape; with small models each call is
dozens of kernel launches whose CPU-side cost exceeds the GPU work. :class:`GraphedCall` captures one call per
input signature (shapes, dtypes, which optional arguments are None) into a ``torch.cuda.CUDAGraph`` and replays
it: the inputs are copied into the graph's static buffers, the graph runs, and a copy of its output is returned
(a sampler may keep it across steps, e.g. DPM-Solver++'s previous prediction). The callable may be one network
(:func:`graphed_module`) or a whole deterministic chain from its starting noise to the images
(:meth:`UnifiedLatents.sample <ul_fast.model.UnifiedLatents.sample>`): the samplers fill each step's log-SNR on
the device from the host's grid, so nothing in a chain waits for the host.

This is safe for ul_fast's networks because nothing in them reads the host during a call: the kernels take their
seeds from device tensors, dispatch depends only on shapes and dtypes, and eval mode has no dropout. The callable
must not depend on anything but its tensor arguments and tensors it holds (e.g. the decoder's conditioning
latent, which a chain keeps fixed).

Capture runs the call twice first on a side stream (warming up cuBLAS handles and Triton's autotuner, which
cannot run inside a capture). If capture fails, a warning says why, once, and every later call runs eagerly. A
failed capture leaves the device's default generator in capture mode (PyTorch ends its capture bookkeeping only
after a successful ``cudaStreamEndCapture``), so every later random op would fail with "Offset increment outside
graph capture": the generator gets a fresh state with the same seed and offset.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GraphedCall", "graphed_module", "release_generator_from_failed_capture"]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor | None]  # static buffers, refreshed before each replay
    output: torch.Tensor


class GraphedCall:
    """``GraphedCall(fn)(*args)`` equals ``fn(*args)``; on CUDA tensors it replays a captured graph.

    fn: a function of tensors (or None) returning one tensor, with no host-side dependence on the values of
    its arguments. Non-CUDA calls, and every call after a failed capture, run ``fn`` eagerly.
    module: the module whose weights ``fn`` reads (default: ``fn`` itself when it is a module), held weakly: its
    graphs are recaptured when its weights move.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup_calls: int = 2, module: torch.nn.Module | None = None):
        self.fn = fn
        if module is None and isinstance(fn, torch.nn.Module):
            module = fn
        self._module = None if module is None else weakref.ref(module)
        self.warmup_calls = warmup_calls
        self.graphs: dict[tuple, _Captured] = {}
        self.failure: str | None = None  # why capture failed, once it has
        self._pool = None
        self._module_state: tuple | None = None

    def _check_module_state(self) -> None:
        """A graph reads a module's weights at the addresses they had at capture: if any parameter or buffer
        moved (``.to()``, a replaced tensor) or the mode changed, drop the graphs (they are recaptured)."""
        module = None if self._module is None else self._module()
        if module is None:
            return
        state = (module.training, *(t.data_ptr() for t in module.parameters()),
                 *(t.data_ptr() for t in module.buffers()))
        if state != self._module_state:
            # a fresh memory pool too: dropping the graphs frees theirs, and capturing into a freed pool trips an
            # internal assert of PyTorch's caching allocator (seen on torch 2.11, H200)
            self.graphs.clear()
            self._pool = None
            self._module_state = state

    @staticmethod
    def _signature(args: tuple[Any, ...]) -> tuple:
        """What a graph is specific to: each argument's shape, dtype and device (or None), and the autocast
        and grad modes it was captured under."""
        modes = (torch.is_grad_enabled(), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return modes + tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)

    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        tensors = [a for a in args if a is not None]
        if self.failure is not None or not tensors or any(not isinstance(a, torch.Tensor) or not a.is_cuda
                                                          for a in tensors):
            return self.fn(*args)
        self._check_module_state()
        key = self._signature(args)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(args)
            if captured is None:
                return self.fn(*args)
            self.graphs[key] = captured
        for static, value in zip(captured.inputs, args):
            if static is not None:
                static.copy_(value)
        captured.graph.replay()
        return captured.output.clone()

    def _capture(self, args: tuple[torch.Tensor | None, ...]) -> _Captured | None:
        device = next(a for a in args if a is not None).device
        inputs = [None if a is None else a.clone() for a in args]
        # autocast's weight-cast cache would hold tensors made during capture: CUDA graphs need it off
        autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        try:
            with torch.cuda.device(device), autocast:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup_calls):
                        self.fn(*inputs)
                torch.cuda.current_stream().wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    output = self.fn(*inputs)
        except Exception as error:  # capture is an optimisation: fall back, say why once
            torch.cuda.synchronize(device)
            release_generator_from_failed_capture(device)
            return self._give_up(f"{type(error).__name__}: {error}".splitlines()[0][:300])
        if not isinstance(output, torch.Tensor):
            return self._give_up(f"the captured function returned {type(output).__name__}, not a tensor")
        return _Captured(graph, inputs, output)

    def _give_up(self, reason: str) -> None:
        """Record why capture failed and warn once; every later call runs eagerly."""
        self.failure = reason
        warnings.warn(f"ul_fast: CUDA-graph capture failed ({reason}); sampling runs eagerly", RuntimeWarning,
                      stacklevel=4)


def release_generator_from_failed_capture(device: torch.device) -> None:
    """Give ``device``'s default CUDA generator a fresh state (not in capture mode) with its seed and offset.

    Random ops inside a capture advance only the capture's own offset, so the generator's offset is what it was
    before the capture began: restoring it keeps ``torch.manual_seed`` reproducing eager runs.
    """
    generator = torch.cuda.default_generators[device.index if device.index is not None else
                                              torch.cuda.current_device()]
    fresh = torch.cuda.Generator(device)
    fresh.manual_seed(generator.initial_seed())
    fresh.set_offset(generator.get_offset())
    generator.graphsafe_set_state(fresh)


_GRAPHED_MODULES: weakref.WeakKeyDictionary[torch.nn.Module, GraphedCall] = weakref.WeakKeyDictionary()


def graphed_module(module: torch.nn.Module) -> GraphedCall:
    """The :class:`GraphedCall` of ``module``, kept (weakly) for the module's life, so that successive sampling
    chains replay the graphs captured by the first instead of capturing their own."""
    graphed = _GRAPHED_MODULES.get(module)
    if graphed is None:
        graphed = _GRAPHED_MODULES[module] = GraphedCall(module)
    return graphed
