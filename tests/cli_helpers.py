"""Shared by the CLI tests: run ``ul-fast`` in-process and check its one-line user error."""

from __future__ import annotations

import pytest

from ul_fast import cli


def one_line_error(capsys, argv: list[str], *words: str) -> str:
    """Run ``ul-fast ARGV``; assert it exits with 2 after exactly one stderr line naming ``words``."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ul-fast: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]
