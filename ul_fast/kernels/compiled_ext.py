"""Loading ``ul_fast._C`` (the compiled C++/CUDA kernels built by ``setup.py`` from ``csrc/``).

:func:`load` never raises: a missing or stale extension yields ``(None, reason)`` so the caller can warn
once and fall back to the reference ops.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from types import ModuleType

API_VERSION = 1
"""The Python <-> ``_C`` calling convention; must equal ``API_VERSION`` in setup.py."""

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_REBUILD = "rebuild it with `pip install -e . --no-build-isolation` (see README)"


def source_hash(csrc: Path = _CSRC) -> str | None:
    """Hash of the sources in ``csrc`` (same recipe as setup.py), or None without a source tree
    (an installed wheel carries no csrc/, so it is never reported stale)."""
    if not csrc.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        if path.is_file() and path.suffix in (".h", ".cpp", ".cu"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def load() -> tuple[ModuleType | None, str]:
    """``(module, "")`` when ``ul_fast._C`` imports and matches the sources, else ``(None, reason)``."""
    # torch runs its own OpenMP pool; with both pools spin-waiting on a few cores each slows the other by
    # milliseconds per call, so _C's runtime (initialised when it loads) sleeps between parallel regions
    # unless the user chose a policy. The variable is restored so nothing else inherits it.
    previous = os.environ.get("OMP_WAIT_POLICY")
    if previous is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        ext = importlib.import_module("ul_fast._C")
    except ImportError as error:
        return None, f"ul_fast._C is not built or cannot load ({error}); {_REBUILD}"
    finally:
        if previous is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    if getattr(ext, "API_VERSION", None) != API_VERSION:
        return None, (f"ul_fast._C is stale (API version {getattr(ext, 'API_VERSION', None)}, this package "
                      f"needs {API_VERSION}); {_REBUILD}")
    current = source_hash()
    if current is not None and current != getattr(ext, "SOURCE_HASH", None):
        return None, f"ul_fast._C is stale (csrc/ changed since it was built); {_REBUILD}"
    return ext, ""
