"""A spy on a Triton kernel module, for tests that check which code a public op ran (not what it returned)."""

from __future__ import annotations


def record_kernel_runs(monkeypatch, module) -> list:
    """Wrap ``module._forward`` (what its custom op runs: the kernel launches) to record each call's input shape."""
    calls = []
    forward = module._forward

    def spy(*args):
        calls.append(tuple(args[0].shape))
        return forward(*args)

    monkeypatch.setattr(module, "_forward", spy)
    return calls
