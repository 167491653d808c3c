"""Spies for tests that check what code ran (not what it returned): a Triton kernel module's launches, and the
host's reads of tensor values."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch


def record_kernel_runs(monkeypatch, module) -> list:
    """Wrap ``module._forward`` (what its custom op runs: the kernel launches) to record each call's input shape."""
    calls = []
    forward = module._forward

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return forward(*args)

    monkeypatch.setattr(module, "_forward", spy)
    return calls


HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
"""The ``torch.Tensor`` methods that hand a tensor's value to Python: on a GPU, each waits for the device."""


@contextlib.contextmanager
def record_host_reads() -> Iterator[list[str]]:
    """Record every read of a tensor's value by the host (:data:`HOST_READS`) inside the block, as
    ``"method at file:line"`` of the nearest caller outside torch, for tests that count them."""
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name: str):
        original = originals[name]

        def read(self, *args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}torch{os.sep}" not in f.filename]
            where = frames[-1] if frames else traceback.extract_stack()[-2]
            reads.append(f"{name} at {Path(where.filename).name}:{where.lineno}")
            return original(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
