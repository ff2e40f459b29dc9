"""Build the cffi API-mode extension for libtinynn.

The cdef is the block of ``libtinynn/tinynn.h`` between ``TNN_CDEF_BEGIN`` and
``TNN_CDEF_END``: the header is the single source of truth for the binding.
Run by ``make`` after ``libtinynn.so`` has been copied into this package:

    python toy_llm/tinynn/_ffi_build.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(PKG_DIR))  # run as a script: importing the package would load the old extension
from cdef import read_cdef  # noqa: E402

REPO = PKG_DIR.parents[1]


def build(tmpdir: Path | None = None) -> Path:
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(read_cdef())
    ffi.set_source(
        "toy_llm.tinynn._tinynn_api",
        '#include "tinynn.h"',
        include_dirs=[str(REPO / "libtinynn")],
        library_dirs=[str(PKG_DIR)],
        libraries=[":libtinynn.so"],
        extra_link_args=["-Wl,-rpath,$ORIGIN"],
    )
    out = ffi.compile(tmpdir=str(tmpdir or (REPO / "build" / "cffi")), verbose=False)
    built = Path(out)
    target = PKG_DIR / built.name
    os.replace(built, target)
    return target


if __name__ == "__main__":
    print(build(), file=sys.stderr)
