"""The stamp that ties a build of ``ul_fast._C`` to these sources: calling-convention version and source hash.

setup.py compiles both into the extension and :mod:`ul_fast.kernels.extension_loader` compares them with this
checkout to refuse a stale build. setup.py loads this file by path (it cannot import the package before the
package is built), so it imports only the standard library.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

API_VERSION = 2
"""The Python <-> ``_C`` calling convention: bump it with any change to the functions ``_C`` exports."""

CSRC = Path(__file__).resolve().parents[2] / "csrc"
"""The extension's sources in a checkout (absent from an installed wheel)."""


def source_hash(csrc: Path = CSRC) -> str | None:
    """Hash of the names and contents of the ``.h``, ``.cpp`` and ``.cu`` files in ``csrc`` (16 hex digits), or
    None without a source tree (an installed wheel carries no csrc/, so it is never reported stale)."""
    if not csrc.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        if path.is_file() and path.suffix in (".h", ".cpp", ".cu"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
