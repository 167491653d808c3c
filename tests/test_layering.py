"""The package's import graph runs down the layers only (scripts/import_graph.py), and the checker catches
an upward import and a cycle when one is planted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def import_graph():
    if not SCRIPT.is_file():
        pytest.skip("scripts/ is not part of this installation")
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_runs_up_the_layers_and_no_cycle(import_graph):
    graph = import_graph.build_graph(ROOT)
    assert len(graph) > 30, "the package was not found"
    assert import_graph.upward_imports(graph) == []
    assert import_graph.cycles(graph) == []


def test_ops_reach_their_kernels_by_plain_imports(import_graph):
    """A reader (or a call-graph tool) gets from ``ul_fast.ops`` to the kernel modules."""
    graph = import_graph.build_graph(ROOT)
    reachable, todo = set(), ["ul_fast.ops"]
    while todo:
        for target in graph[todo.pop()] - reachable:
            reachable.add(target)
            todo.append(target)
    kernels = {m for m in graph if m.startswith("ul_fast.kernels.") and m != "ul_fast.kernels.triton_support"}
    assert kernels and kernels <= reachable, sorted(kernels - reachable)


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_reports_upward_imports_lazy_ones_too(import_graph, tmp_path):
    _write_package(tmp_path, {
        "ul_fast/__init__.py": "",
        "ul_fast/diffusion/__init__.py": "",
        "ul_fast/diffusion/math.py": "def f():\n    from ul_fast.ops import reference\n",
        "ul_fast/ops/__init__.py": "from ul_fast.ops import reference\n",
        "ul_fast/ops/reference.py": "from ul_fast.diffusion import math\n",
    })
    graph = import_graph.build_graph(tmp_path)
    assert ("ul_fast.diffusion.math", "ul_fast.ops") in import_graph.upward_imports(graph)
    assert ("ul_fast.diffusion.math", "ul_fast.ops.reference") in import_graph.upward_imports(graph)
    assert import_graph.main(["--root", str(tmp_path)]) == 1


def test_checker_reports_cycles_within_a_layer_and_relative_imports(import_graph, tmp_path):
    _write_package(tmp_path, {
        "ul_fast/__init__.py": "",
        "ul_fast/data/__init__.py": "from .stream import BatchStream\n",
        "ul_fast/data/stream.py": "from ul_fast.text import bank\n",
        "ul_fast/text/__init__.py": "",
        "ul_fast/text/bank.py": "from ..data import stream\n",
    })
    graph = import_graph.build_graph(tmp_path)
    assert graph["ul_fast.text.bank"] == {"ul_fast.data", "ul_fast.data.stream"}
    assert import_graph.upward_imports(graph) == []  # one layer: no upward import, but a cycle
    assert any({"ul_fast.data.stream", "ul_fast.text.bank"} <= set(c) for c in import_graph.cycles(graph))


def test_a_package_importing_its_own_submodules_is_no_cycle(import_graph, tmp_path):
    """``nets/__init__`` re-exports ``nets.vit``, which imports ``nets.layers``: Python initialises the
    enclosing package first, so this is not a dependency of ``nets.vit`` on ``nets``."""
    _write_package(tmp_path, {
        "ul_fast/__init__.py": "",
        "ul_fast/nets/__init__.py": "from ul_fast.nets.vit import ViT\n",
        "ul_fast/nets/vit.py": "from ul_fast.nets.layers import Block\n",
        "ul_fast/nets/layers.py": "Block = object\n",
    })
    graph = import_graph.build_graph(tmp_path)
    assert graph["ul_fast.nets.vit"] == {"ul_fast.nets.layers"}
    assert import_graph.cycles(graph) == []
