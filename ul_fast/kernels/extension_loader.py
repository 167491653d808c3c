"""Loading ``ul_fast._C`` (the C++/CUDA kernels built by ``setup.py`` from ``csrc/``).

:func:`load` never raises: a missing or stale extension yields ``(None, reason)`` so the caller can warn
once and fall back to the reference ops.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from ul_fast.kernels.extension_version import API_VERSION, source_hash

_REBUILD = "rebuild it with `pip install -e . --no-build-isolation` (see README)"


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
