"""The README's code blocks, for the tests that run them as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block after the line ``heading`` (e.g. ``"## Python API"``) of README.md; skips the test
    where the README is not part of the installation."""
    if not README.is_file():
        pytest.skip("README.md is not part of this installation")
    parts = README.read_text().split(f"\n{heading}\n", 1)
    assert len(parts) == 2, f"README.md has no {heading!r} heading"
    block = re.search(r"```python\n(.*?)```", parts[1], re.S)
    assert block is not None, f"the README's {heading!r} section has no python code block"
    return block.group(1)


def run_block(heading: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute :func:`python_block` with ``folder`` as the working directory (whatever it writes lands there)."""
    code = python_block(heading)
    monkeypatch.chdir(folder)
    exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "readme"})
