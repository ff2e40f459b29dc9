"""The shim's declarations for cffi, read from libtinynn/tinynn.h (the single source of truth)."""
from __future__ import annotations

import re
from pathlib import Path

HEADER = Path(__file__).resolve().parents[2] / "libtinynn" / "tinynn.h"


def read_cdef(header: Path = HEADER) -> str:
    """The plain-C declarations of the shim, as cffi's cdef() wants them."""
    text = header.read_text()
    m = re.search(r"/\* TNN_CDEF_BEGIN \*/(.*)/\* TNN_CDEF_END \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{header}: no TNN_CDEF_BEGIN/END block")
    return re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
