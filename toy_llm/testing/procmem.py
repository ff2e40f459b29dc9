"""Memory figures of this process for the leak and memory tests (Linux /proc)."""
from __future__ import annotations

import ctypes

try:   # glibc keeps freed heap pages for reuse: give them back first, so a figure is what is in use
    _trim = ctypes.CDLL(None).malloc_trim
except AttributeError:
    _trim = lambda pad: 0   # noqa: E731


def status_kib(field: str) -> int:
    """``field`` of /proc/self/status (e.g. "VmRSS", "RssAnon") in KiB, after malloc_trim(0)."""
    _trim(0)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {field}")
