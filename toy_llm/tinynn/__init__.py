"""cffi binding of libtinynn: every ``tnn_*`` function under its own name.

Each wrapper calls the C function once and turns the shim's failure signal
(NULL, or a negative number) into :class:`TinyNNError` carrying
``tnn_last_error()``. Handles are cffi pointers; pass ``None`` for NULL.
Host I/O helpers (:func:`upload`, :func:`download`) move whole numpy buffers
in one call.

Two cffi modes exist. API mode (a compiled extension, built by ``make``) is the
default because it is faster per call (see README, "Call overhead"); ABI mode
(``ffi.dlopen``) is the fallback when the extension is missing, or when
``TINYNN_FFI=abi`` is set.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .cdef import read_cdef

_PKG_DIR = Path(__file__).resolve().parent
LIB_PATH = Path(os.environ.get("TINYNN_LIB", _PKG_DIR / "libtinynn.so"))


class TinyNNError(RuntimeError):
    """A libtinynn call failed; the message is the shim's ``tnn_last_error()``."""


_DECL = re.compile(r"^\s*(?:const\s+)?(\w+)\s*(\*?)\s*(tnn_\w+)\s*\(", re.M)


def _load(mode: str):
    if mode == "api":
        from . import _tinynn_api  # type: ignore[attr-defined]

        return _tinynn_api.ffi, _tinynn_api.lib
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(read_cdef())
    if not LIB_PATH.exists():
        raise ImportError(f"{LIB_PATH} not found: run `make` in the repository root to build libtinynn")
    try:
        return ffi, ffi.dlopen(str(LIB_PATH))
    except OSError as e:
        raise ImportError(_load_failure_hint(str(e))) from e


def _load_failure_hint(msg: str) -> str:
    """Say what to do when libtinynn.so exists but the dynamic loader refuses it."""
    if "libcuda.so" in msg:
        return (f"{LIB_PATH} was built with `make CUDA=1` but this machine has no NVIDIA driver "
                f"(libcuda.so.1): rebuild for the CPU with `make`, or install the driver ({msg})")
    if "libcudart" in msg or "libcublas" in msg:
        return (f"{LIB_PATH} was built with `make CUDA=1` against a CUDA toolkit this machine lacks: "
                f"rebuild here with `make` (CPU) or `make CUDA=1` ({msg})")
    return f"cannot load {LIB_PATH}: {msg}; rebuild it with `make`"


def _pick_mode() -> str:
    want = os.environ.get("TINYNN_FFI", "api")
    if want == "abi":
        return "abi"
    try:
        from . import _tinynn_api  # type: ignore[attr-defined]
    except ImportError:
        return "abi"
    names = set(dir(_tinynn_api.lib))
    if any(m[2] not in names for m in _DECL.findall(read_cdef())):
        # the compiled extension predates the header (rebuild with `make`); dlopen still works
        return "abi"
    return "api"


MODE = _pick_mode()
ffi, lib = _load(MODE)

from ..ggml_types import (GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I32,  # noqa: E402,F401
                          GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q4_K,
                          GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K, GGML_TYPE_Q8_0,
                          GGML_TYPE_Q8_1)

ROPE_NORMAL, ROPE_NEOX = 0, 2


def last_error() -> str:
    return ffi.string(lib.tnn_last_error()).decode("utf-8", "replace")


# Functions whose negative/NULL results are values, not failures.
#   tnn_gguf_find_index / tnn_gguf_find_key / tnn_gguf_get_bool: -1 means "absent"; -2 is an error.
_ABSENT_IS_MINUS_ONE = {"tnn_gguf_find_index", "tnn_gguf_find_key", "tnn_gguf_get_bool"}
_NEVER_FAILS = {"tnn_null_ptr", "tnn_last_error", "tnn_clear_error", "tnn_type_name", "tnn_type_count",
                "tnn_have_backend"}



def _coerce(args):
    """None -> NULL and str -> bytes; only on the slow path, after cffi refused the raw args."""
    # a list, not a generator: a tuple grown from a generator and unpacked into a cffi call is never
    # freed (one leaked tuple per call, seen with cffi 2.1 on CPython 3.11; tests/test_leaks.py)
    return tuple([ffi.NULL if x is None else x.encode() if isinstance(x, str) else x for x in args])


# Host buffers the shim cannot size: (buffer argument, count argument, bytes per counted item). A
# cffi array (ffi.new / ffi.from_buffer) knows its size, so a count past its end is refused here
# instead of letting the shim read or write beyond it; a bare pointer (ffi.cast) is the caller's word.
_HOST_BUFFERS = {
    "tnn_tensor_set_f32": ((2, 3, 4),), "tnn_tensor_set_i32": ((2, 3, 4),), "tnn_tensor_set_raw": ((2, 3, 1),),
    "tnn_tensor_get_f32": ((2, 3, 4),), "tnn_tensor_get_i32": ((2, 3, 4),), "tnn_tensor_get_raw": ((2, 3, 1),),
    "tnn_upload_from_float_array": ((2, 3, 4),),
    "tnn_quantize": ((2, 5, 1),), "tnn_dequantize": ((1, 4, 1), (2, 3, 4)),
    "tnn_gguf_arr_copy": ((2, 3, 1),),
}


def _host_buffer_check(name: str, specs):
    def check(args):
        for ib, icount, unit in specs:
            if len(args) <= max(ib, icount):
                continue
            buf, count = args[ib], args[icount]
            if isinstance(buf, ffi.CData) and ffi.typeof(buf).kind == "array" and isinstance(count, int):
                have = ffi.sizeof(buf)
                if count * unit > have:
                    raise TinyNNError(f"{name}: argument {icount} asks for {count * unit} bytes but the host buffer "
                                      f"(argument {ib}) holds {have}")
    return check


def _make_wrapper(name: str, ctype: str, is_ptr: bool):
    fn = getattr(lib, name)
    if name in _HOST_BUFFERS:
        check, unchecked = _host_buffer_check(name, _HOST_BUFFERS[name]), fn

        def fn(*args):
            check(args)
            return unchecked(*args)

    def raw(*args):
        try:
            return fn(*args)
        except TypeError:
            return fn(*_coerce(args))
        except OverflowError as e:
            raise TinyNNError(f"{name}: integer argument out of range ({e})") from e

    if name in _NEVER_FAILS:
        if is_ptr and ctype == "char":
            return lambda *a: ffi.string(raw(*a)).decode()
        return raw
    null = ffi.NULL
    if is_ptr and ctype == "char":
        def call(*args):
            r = raw(*args)
            if r == null:
                raise TinyNNError(last_error())
            return ffi.string(r).decode("utf-8", "replace")
    elif ctype == "void" and not is_ptr:
        return raw
    else:
        floor = -1 if name in _ABSENT_IS_MINUS_ONE else 0

        def call(*args):
            try:  # the fast path: one C call, no argument conversion
                r = fn(*args)
            except (TypeError, OverflowError):
                r = raw(*args)
            if (r == null) if is_ptr else (r < floor):
                raise TinyNNError(last_error())
            return r
    call.__name__ = name
    call.__qualname__ = name
    call.__doc__ = f"libtinynn {name}; raises TinyNNError on failure."
    return call


def _export_all() -> list[str]:
    names = []
    for ctype, star, name in _DECL.findall(read_cdef()):
        globals()[name] = _make_wrapper(name, ctype, bool(star))
        names.append(name)
    return names


TNN_FUNCTIONS = _export_all()


# ---------------------------------------------------------------- numpy host I/O

def shape_of(t) -> tuple[int, ...]:
    """numpy shape (row-major: ne reversed, trailing 1-dims of ne dropped) of a tensor."""
    ne = [lib.tnn_tensor_ne(t, d) for d in range(4)]
    if min(ne) < 0:
        raise TinyNNError(last_error())
    nd = max(1, lib.tnn_tensor_ndim(t))
    return tuple(reversed(ne[:nd]))


def upload(sess, t, arr) -> None:
    """Copy a whole numpy array into tensor ``t``: values for F32/I32 tensors, raw bytes when ``arr``
    is uint8 (any tensor type, e.g. quantized blocks)."""
    ttype = lib.tnn_tensor_type(t) if t is not None else -1
    if getattr(arr, "dtype", None) == np.uint8:
        a = np.ascontiguousarray(arr)
        rc = lib.tnn_tensor_set_raw(sess, t, ffi.from_buffer(a) if a.size else ffi.NULL, a.nbytes)
    elif ttype == GGML_TYPE_F32:
        a = np.ascontiguousarray(arr, dtype=np.float32)
        rc = lib.tnn_tensor_set_f32(sess, t, ffi.from_buffer("float[]", a), a.size)
    elif ttype == GGML_TYPE_I32:
        a = np.ascontiguousarray(arr, dtype=np.int32)
        rc = lib.tnn_tensor_set_i32(sess, t, ffi.from_buffer("int32_t[]", a), a.size)
    else:
        a = np.ascontiguousarray(arr)
        rc = lib.tnn_tensor_set_raw(sess, t, ffi.from_buffer(a) if a.size else ffi.NULL, a.nbytes)
    if rc < 0:
        raise TinyNNError(last_error())


def download(sess, t, raw: bool = False) -> np.ndarray:
    """The whole tensor ``t`` as a numpy array shaped like ``shape_of(t)`` (raw uint8 bytes for quantized)."""
    ttype = lib.tnn_tensor_type(t) if t is not None else -1
    if ttype < 0:
        raise TinyNNError(last_error())
    if raw or ttype not in (GGML_TYPE_F32, GGML_TYPE_I32):
        n = lib.tnn_tensor_nbytes(t)
        out = np.empty(max(n, 0), dtype=np.uint8)
        rc = lib.tnn_tensor_get_raw(sess, t, ffi.from_buffer(out), n)
    elif ttype == GGML_TYPE_F32:
        out = np.empty(shape_of(t), dtype=np.float32)
        rc = lib.tnn_tensor_get_f32(sess, t, ffi.from_buffer("float[]", out), out.size)
    else:
        out = np.empty(shape_of(t), dtype=np.int32)
        rc = lib.tnn_tensor_get_i32(sess, t, ffi.from_buffer("int32_t[]", out), out.size)
    if rc < 0:
        raise TinyNNError(last_error())
    return out


def upload_row_major(sess, t, mat) -> None:
    """The seed's name: upload a (rows, cols) matrix into a tensor with ne=[cols, rows]."""
    upload(sess, t, mat)


def download_to_mat(sess, t, rows: int, cols: int) -> np.ndarray:
    """The seed's name: a persistent tensor back as a (rows, cols) float32 matrix."""
    out = download(sess, t)
    if out.size != rows * cols:
        raise TinyNNError(f"download_to_mat: tensor has {out.size} elements, not {rows}x{cols}")
    return out.reshape(rows, cols)


def quantize(type_id: int, data: np.ndarray) -> np.ndarray:
    """Quantize a float32 (rows, n_per_row) matrix with ggml's own quantizer; raw bytes out."""
    a = np.ascontiguousarray(data, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"quantize: want a 1-D or 2-D array, got shape {a.shape}")
    rows, n = a.shape
    rs = tnn_row_size(type_id, n)  # noqa: F821  (exported above)
    out = np.empty(rows * rs, dtype=np.uint8)
    tnn_quantize(type_id, ffi.from_buffer("float[]", a), ffi.from_buffer(out), rows, n, out.nbytes)  # noqa: F821
    return out


def dequantize(type_id: int, raw: np.ndarray, n: int) -> np.ndarray:
    """Dequantize ``n`` elements of ``type_id`` from raw bytes with ggml's own to_float."""
    src = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    tnn_dequantize(type_id, ffi.from_buffer(src), ffi.from_buffer("float[]", out), n, src.nbytes)  # noqa: F821
    return out
