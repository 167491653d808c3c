"""Test set-up. TRITON_INTERPRET must be set before any Triton kernel module is imported, so the
Triton kernels run (slowly, on tiny shapes) in the interpreter on CPU-only machines."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state; tests that need fresh inputs draw them."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
