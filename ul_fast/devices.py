"""Device names from configs and the command line (``"auto"``, ``"cpu"``, ``"cuda:1"``) as torch devices, and the
machine's available memory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → the first CUDA device when one is available, else the CPU; any other name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, unreadable, or "max" (no limit)
        return None


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the kernel's ``MemAvailable`` (Linux), and no more than the
    room left under the process's cgroup memory limit (v2 or v1, as in a container); elsewhere the free physical
    pages; None where the system tells none of these."""
    candidates = []
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:  # no /proc: not Linux
        candidates += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    v1 = "/sys/fs/cgroup/memory/memory."
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         (v1 + "limit_in_bytes", v1 + "usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 2**60:  # v1 writes a huge number for "no limit"
            candidates.append(max(cap - used, 0))
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):  # e.g. macOS has no SC_AVPHYS_PAGES
            return None
    return min(candidates)
