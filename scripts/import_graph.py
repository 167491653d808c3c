"""The import graph of the ``ul_fast`` package, checked against its layers.

Every ``import`` in the package (at module level and inside functions alike: a lazy import is still a
dependency) is read with :mod:`ast`, without importing anything. Importing ``ul_fast.a.b`` also runs
``ul_fast/a/__init__.py``, so it counts as a dependency on the package ``ul_fast.a`` too. A module may import
modules of its own layer or of a lower one; an import that runs back up the layers, or a cycle between
modules, is a violation.

    python scripts/import_graph.py            # layer table, edges between layers, violations (exit 1 if any)
    python scripts/import_graph.py --dot FILE # also write the module graph in Graphviz DOT, grouped by layer
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = "ul_fast"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("files (atomic writes, checksums)", ("ul_fast.files",)),
    ("diffusion math", ("ul_fast.diffusion",)),
    ("kernels", ("ul_fast.kernels",)),
    ("ops", ("ul_fast.ops",)),
    ("sampling", ("ul_fast.sampling",)),
    ("config", ("ul_fast.config", "ul_fast.configs")),
    ("networks", ("ul_fast.nets",)),
    ("model", ("ul_fast.model",)),
    ("data, text, evaluation, devices", ("ul_fast.data", "ul_fast.text", "ul_fast.eval", "ul_fast.devices")),
    ("training", ("ul_fast.train",)),
    ("public API", ("ul_fast.api",)),
    ("entry points", ("ul_fast.cli", "ul_fast._build_info", "ul_fast")),
)
"""Lowest first. A module belongs to the layer of the longest prefix that names it (``ul_fast`` itself, the
root ``__init__``, is an entry point)."""


def layer_of(module: str) -> int:
    """Index into :data:`LAYERS` of ``module`` (a dotted name inside the package)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise ValueError(f"module {module} is in no layer: add it to LAYERS in {__file__}")
    return best


def module_name(path: Path, root: Path) -> str:
    """``root/ul_fast/a/b.py`` → ``ul_fast.a.b``; ``…/a/__init__.py`` → ``ul_fast.a``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module named by a (possibly relative) ``from … import``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Package modules ``path`` imports, with every parent package whose ``__init__`` the import runs
    (except the packages that enclose ``path`` itself: they are initialised before it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    named: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one; ``pkg`` itself is
            # a dependency when a name comes from its ``__init__`` (or, below, as the parent of ``pkg.sub``)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            named.update(submodules)
            if len(submodules) < len(node.names):
                named.add(base)
    targets: set[str] = set()
    for name in named:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        parts = name.split(".")
        for end in range(2, len(parts) + 1):  # the root package's __init__ is not a dependency of note
            prefix = ".".join(parts[:end])
            inside = module == prefix or module.startswith(prefix + ".")  # an enclosing package runs first anyway
            if prefix in known and (end == len(parts) or not inside):
                targets.add(prefix)
    targets.discard(module)
    return targets


def build_graph(root: Path) -> dict[str, set[str]]:
    """``{module: {imported package modules}}`` for every ``.py`` file under ``root/ul_fast``."""
    files = {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}
    known = set(files)
    return {module: imports_of(path, module, known) for module, path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Edges ``(importer, imported)`` where the imported module sits in a higher layer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def to_dot(graph: dict[str, set[str]]) -> str:
    """The module graph in Graphviz DOT, one cluster per layer (bottom layer drawn at the bottom)."""
    lines = ["digraph ul_fast {", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
    by_layer: dict[int, list[str]] = defaultdict(list)
    for module in graph:
        by_layer[layer_of(module)].append(module)
    for layer, modules in sorted(by_layer.items()):
        lines.append(f'  subgraph cluster_{layer} {{ label="{layer + 1}. {LAYERS[layer][0]}";')
        lines += [f'    "{m}";' for m in sorted(modules)]
        lines.append("  }")
    for a in sorted(graph):
        for b in sorted(graph[a]):
            style = ' [color=red, penwidth=2]' if layer_of(b) > layer_of(a) else ""
            lines.append(f'  "{a}" -> "{b}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository root (holds ul_fast/)")
    parser.add_argument("--dot", type=Path, help="write the module graph in Graphviz DOT to this file")
    args = parser.parse_args(argv)
    graph = build_graph(args.root)
    edges: dict[tuple[int, int], int] = defaultdict(int)
    for a, targets in graph.items():
        for b in targets:
            edges[layer_of(a), layer_of(b)] += 1
    print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} imports")
    for index, (name, _) in enumerate(LAYERS):
        below = sorted({b for (a, b) in edges if a == index and b != index})
        uses = ", ".join(f"{b + 1}" for b in below) or "-"
        count = sum(1 for m in graph if layer_of(m) == index)
        print(f"  {index + 1:2d}. {name:<34s} {count:3d} modules  imports layers: {uses}")
    if args.dot:
        args.dot.write_text(to_dot(graph))
        print(f"wrote {args.dot}")
    up, loops = upward_imports(graph), cycles(graph)
    for a, b in up:
        print(f"upward import: {a} (layer {layer_of(a) + 1}) imports {b} (layer {layer_of(b) + 1})")
    for loop in loops:
        print(f"import cycle: {' <-> '.join(loop)}")
    if up or loops:
        return 1
    print("no upward import, no cycle")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
