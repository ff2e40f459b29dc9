"""A GGUF file's metadata and tensor table, read through ggml's own GGUF reader.

:class:`GGUFMeta` opens a file with ``tnn_gguf_load`` (llama.cpp's loader: every claimed count,
array length and string length is checked against the bytes the file has before anything is
allocated, so no parse loops or allocates in proportion to a length the file does not contain)
and answers from the ``tnn_gguf_*`` getters: one C call per scalar, one per numeric array (the
whole token score / type table lands in one numpy array), one per string array (the bytes of all
strings in one buffer, decoded once into the list the caller keeps)::

    with GGUFMeta("model.gguf") as m:
        arch = m.get_str("general.architecture")
        n_layers = m.get_int(f"{arch}.block_count")
        tokens = m.get_str_list("tokenizer.ggml.tokens")
        info = m.tensors["token_embd.weight"]     # TensorInfo(type, shape, nbytes, offset)

Values: ints (any width) are ``int``, floats ``float``, ``bool``, strings ``str`` (UTF-8 decoded
with ``surrogateescape``, so no byte is lost), string arrays ``list[str]``, numeric and bool arrays
numpy arrays. Typed accessors raise :class:`GGUFLoadError` naming the file, the key, and the type
found and expected. Shapes are ggml ``ne`` order (as ``gguf.GGUFReader``'s ``ReaderTensor.shape``),
trailing 1-dims dropped as ``ggml_n_dims`` does; offsets are from the start of the file.

:class:`GGUFReaderMeta` offers the same interface over a ``gguf.GGUFReader`` (for callers that
already hold one); the ``gguf`` package stays the tool for *writing* files.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np

__all__ = ["GGUFLoadError", "GGUFMeta", "GGUFReaderMeta", "TensorInfo", "open_meta", "GGUF_TYPE_NAMES"]


class GGUFLoadError(ValueError):
    """A GGUF file cannot be used; the message names the file and the key or tensor."""


# GGUF value types (gguf.h enum gguf_type), named as ggml names them
GGUF_TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "str",
                   9: "arr", 10: "u64", 11: "i64", 12: "f64"}
T_U64, T_BOOL, T_STR, T_ARR = 10, 7, 8, 9
INT_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))
FLOAT_TYPES = frozenset((6, 12))
NUMPY_DTYPES = {0: np.dtype("u1"), 1: np.dtype("i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
                5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("?"), 10: np.dtype("<u8"), 11: np.dtype("<i8"),
                12: np.dtype("<f8")}

_MISSING = object()


class TensorInfo(NamedTuple):
    """One entry of the tensor table."""

    type: int                   # ggml type id
    shape: tuple[int, ...]      # ggml ne order, trailing 1s dropped (at least one dim)
    nbytes: int
    offset: int                 # from the start of the file

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def type_name(vtype: int, etype: int | None = None) -> str:
    """"u32", "str", "arr[str]", ... for a value type (and an array's element type)."""
    name = GGUF_TYPE_NAMES.get(vtype, f"type {vtype}")
    if vtype == T_ARR and etype is not None:
        return f"arr[{GGUF_TYPE_NAMES.get(etype, f'type {etype}')}]"
    return name


class _MetaBase:
    """Typed accessors over two primitives: ``_types(key)`` -> (value type, element type or None)
    or None when absent, and ``_value(key, vtype, etype)``."""

    path: str

    # ---- primitives (subclasses)
    def _types(self, key: str) -> tuple[int, int | None] | None:
        raise NotImplementedError

    def _value(self, key: str, vtype: int, etype: int | None) -> Any:
        raise NotImplementedError

    def keys(self) -> list[str]:
        raise NotImplementedError

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    # ---- mapping-like
    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._types(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def array_len(self, key: str) -> int:
        """Elements of an array key (without reading them)."""
        return len(self[key])

    def type_of(self, key: str) -> str | None:
        """The key's type name ("u32", "arr[str]", ...), None when absent."""
        t = self._types(key)
        return None if t is None else type_name(*t)

    def get(self, key: str, default: Any = None) -> Any:
        """The value in its natural Python type (see the module doc); ``default`` when absent."""
        t = self._types(key)
        return default if t is None else self._value(key, *t)

    def __getitem__(self, key: str) -> Any:
        t = self._types(key)
        if t is None:
            raise KeyError(key)
        return self._value(key, *t)

    def items(self) -> Iterator[tuple[str, Any]]:
        for k in self.keys():
            yield k, self[k]

    # ---- typed accessors: absent -> default (or GGUFLoadError without one); wrong type -> GGUFLoadError
    def _typed(self, key: str, default: Any, expected: str, ok) -> Any:
        t = self._types(key)
        if t is None:
            if default is _MISSING:
                raise GGUFLoadError(f"{self.path}: missing key '{key}' (expected {expected})")
            return default
        if not ok(*t):
            raise GGUFLoadError(f"{self.path}: key '{key}' has type {type_name(*t)}, expected {expected}")
        return self._value(key, *t)

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        """An integer of any width (u8 .. u64, i8 .. i64), exactly."""
        return self._typed(key, default, "an integer", lambda v, e: v in INT_TYPES)

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        """An f32 / f64 (exactly, as a double); integers are accepted and converted."""
        v = self._typed(key, default, "a float", lambda v, e: v in FLOAT_TYPES or v in INT_TYPES)
        return v if v is default else float(v)

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        return self._typed(key, default, "bool", lambda v, e: v == T_BOOL)

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        return self._typed(key, default, "str", lambda v, e: v == T_STR)

    def get_str_list(self, key: str, default: Any = _MISSING) -> list[str]:
        return self._typed(key, default, "arr[str]", lambda v, e: v == T_ARR and e == T_STR)

    def get_array(self, key: str, default: Any = _MISSING) -> np.ndarray:
        """A numeric or bool array as one numpy array."""
        return self._typed(key, default, "a numeric array", lambda v, e: v == T_ARR and e in NUMPY_DTYPES)

    # ---- context manager (closing a borrowed source is the owner's business)
    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _refuse_non_regular(p: Path) -> None:
    """Stat first: a FIFO would block an open(), a directory is no file to parse."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise GGUFLoadError(f"{p}: no such file") from None
    except OSError as e:
        raise GGUFLoadError(f"{p}: cannot stat ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise GGUFLoadError(f"{p}: not a regular file ({kind}); expected a GGUF file")


def decode_strings(raw: np.ndarray, offs: np.ndarray) -> list[str]:
    """The strings raw[offs[i]:offs[i + 1]] (UTF-8, undecodable bytes kept as surrogates), decoded in
    one pass: joined with NUL bytes, decoded and split again, instead of one slice and decode per
    string (SmolLM2's 49k tokens: ~30 ms). A NUL inside a string gives a wrong count, and then each
    is decoded alone. The same strings either way: a NUL ends any unfinished UTF-8 sequence before it,
    as the end of the string does."""
    n = offs.size - 1
    if n <= 0:
        return []
    lengths = np.diff(offs)
    joined = np.zeros(int(lengths.sum()) + n - 1, np.uint8)
    joined[np.arange(joined.size - n + 1) + np.repeat(np.arange(n), lengths)] = raw[offs[0]:offs[-1]]
    parts = joined.tobytes().decode("utf-8", "surrogateescape").split("\0")
    if len(parts) == n:
        return parts
    o = offs.tolist()
    data = raw.tobytes()
    return [data[a:b].decode("utf-8", "surrogateescape") for a, b in zip(o, o[1:])]


class GGUFMeta(_MetaBase):
    """A GGUF file opened with libtinynn's ``tnn_gguf_load`` (ggml's reader); close() frees it."""

    def __init__(self, path: str | os.PathLike) -> None:
        from . import tinynn as tnn

        self._tnn = tnn
        self._g = None
        p = Path(path)
        self.path = str(p)
        _refuse_non_regular(p)
        try:
            self._g = tnn.tnn_gguf_load(os.fsencode(p))
        except tnn.TinyNNError as e:
            from .gguf_layout import explain

            where = explain(p)   # which record the walk fails at (ggml's messages often name none)
            raise GGUFLoadError(f"{p}: not a readable GGUF file ({e})" + (f"; {where}" if where else "")) from None
        g = self._g
        self._index = {tnn.tnn_gguf_key(g, i): i for i in range(tnn.tnn_gguf_n_kv(g))}
        self._type_cache: dict[int, tuple[int, int | None]] = {}
        self._tensors: dict[str, TensorInfo] | None = None

    # ---- life cycle
    def close(self) -> None:
        if self._g is not None:
            g, self._g = self._g, None
            self._tnn.tnn_gguf_free(g)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def detach(self):
        """Hand the ``tnn_gguf *`` over to the caller (e.g. the engine, which maps the weights from it
        and frees it); this object is closed afterwards. One parse then serves config, tokenizer and
        weights."""
        g = self.handle
        self._g = None
        return g

    @property
    def handle(self):
        """The live ``tnn_gguf *`` (owned by this object)."""
        if self._g is None:
            raise GGUFLoadError(f"{self.path}: GGUFMeta is closed")
        return self._g

    def __repr__(self) -> str:
        state = "closed" if self._g is None else f"{len(self._index)} keys"
        return f"GGUFMeta({self.path!r}, {state})"

    @property
    def version(self) -> int:
        return self._tnn.tnn_gguf_version(self.handle)

    # ---- primitives
    def keys(self) -> list[str]:
        return list(self._index)

    def array_len(self, key: str) -> int:
        t = self._types(key)
        if t is None:
            raise KeyError(key)
        if t[0] != T_ARR:
            raise GGUFLoadError(f"{self.path}: key '{key}' has type {type_name(*t)}, expected an array")
        return self._tnn.tnn_gguf_arr_n(self.handle, self._index[key])

    def _types(self, key: str) -> tuple[int, int | None] | None:
        i = self._index.get(key)
        if i is None:
            return None
        t = self._type_cache.get(i)
        if t is None:
            g, tnn = self.handle, self._tnn
            v = tnn.tnn_gguf_kv_type(g, i)
            t = (v, tnn.tnn_gguf_arr_type(g, i) if v == T_ARR else None)
            self._type_cache[i] = t
        return t

    def _value(self, key: str, vtype: int, etype: int | None) -> Any:
        tnn, g, i = self._tnn, self.handle, self._index[key]
        ffi = tnn.ffi
        try:
            if vtype in INT_TYPES:
                out = ffi.new("uint64_t *" if vtype == T_U64 else "int64_t *")
                (tnn.tnn_gguf_val_u64 if vtype == T_U64 else tnn.tnn_gguf_val_i64)(g, i, out)
                return int(out[0])
            if vtype in FLOAT_TYPES:
                out = ffi.new("double *")
                tnn.tnn_gguf_val_f64(g, i, out)
                return float(out[0])
            if vtype == T_BOOL:
                return bool(tnn.tnn_gguf_val_bool(g, i))
            if vtype == T_STR:
                return self._c_str(tnn.lib.tnn_gguf_val_str(g, i))
            if vtype == T_ARR and etype == T_STR:
                return self._str_array(i)
            if vtype == T_ARR and etype in NUMPY_DTYPES:
                n = tnn.tnn_gguf_arr_n(g, i)
                arr = np.empty(n, dtype=NUMPY_DTYPES[etype])
                tnn.tnn_gguf_arr_copy(g, i, ffi.from_buffer(arr) if n else ffi.NULL, arr.nbytes)
                return arr
        except tnn.TinyNNError as e:
            raise GGUFLoadError(f"{self.path}: key '{key}': {e}") from None
        raise GGUFLoadError(f"{self.path}: key '{key}' has unsupported type {type_name(vtype, etype)}")

    def _c_str(self, ptr) -> str:
        tnn = self._tnn
        if ptr == tnn.ffi.NULL:
            raise tnn.TinyNNError(tnn.last_error())
        return tnn.ffi.string(ptr).decode("utf-8", "surrogateescape")

    def _str_array(self, i: int) -> list[str]:
        """All strings of array ``i``: one C call copies their bytes, one pass decodes them."""
        tnn, g = self._tnn, self.handle
        ffi = tnn.ffi
        n = tnn.tnn_gguf_arr_n(g, i)
        nbytes = tnn.tnn_gguf_arr_str_nbytes(g, i)
        buf = bytearray(nbytes)
        offs = np.empty(n + 1, dtype=np.int64)
        tnn.tnn_gguf_arr_str_copy(g, i, ffi.from_buffer(buf) if nbytes else ffi.NULL, nbytes,
                                  ffi.from_buffer("int64_t[]", offs), n + 1)
        return decode_strings(np.frombuffer(buf, np.uint8), offs)

    # ---- tensors
    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """name -> TensorInfo(ggml type, shape (ne order), nbytes, file offset), in file order."""
        if self._tensors is None:
            tnn, g = self._tnn, self.handle
            out = {}
            for idx in range(tnn.tnn_gguf_n_tensors(g)):
                nd = tnn.tnn_gguf_tensor_ndim(g, idx)
                out[tnn.tnn_gguf_tensor_name(g, idx)] = TensorInfo(
                    tnn.tnn_gguf_tensor_type(g, idx), tuple(tnn.tnn_gguf_tensor_ne(g, idx, d) for d in range(nd)),
                    tnn.tnn_gguf_tensor_nbytes(g, idx), tnn.tnn_gguf_tensor_file_offset(g, idx))
            self._tensors = out
        return self._tensors


class GGUFReaderMeta(_MetaBase):
    """The same interface over an already open ``gguf.GGUFReader`` (borrowed: close() does nothing).
    The reader's pseudo-keys ``GGUF.version`` / ``GGUF.tensor_count`` / ``GGUF.kv_count`` are left out."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.path = str(getattr(getattr(reader, "data", None), "filename", None) or "<gguf.GGUFReader>")
        self._fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self._tensors: dict[str, TensorInfo] | None = None

    def keys(self) -> list[str]:
        return list(self._fields)

    def _types(self, key: str) -> tuple[int, int | None] | None:
        f = self._fields.get(key)
        if f is None:
            return None
        types = [int(t) for t in f.types]
        return (types[0], types[-1] if types[0] == T_ARR and len(types) > 1 else None)

    def _value(self, key: str, vtype: int, etype: int | None) -> Any:
        f = self._fields[key]
        parts = f.parts
        if vtype == T_STR:
            return bytes(parts[f.data[0]]).decode("utf-8", "surrogateescape")
        if vtype == T_ARR and etype == T_STR:
            return [bytes(parts[i]).decode("utf-8", "surrogateescape") for i in f.data]
        if vtype == T_ARR and etype in NUMPY_DTYPES:
            chunks = [np.asarray(parts[i]) for i in f.data]
            dtype = NUMPY_DTYPES[etype]
            return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)
        if vtype == T_ARR:
            raise GGUFLoadError(f"{self.path}: key '{key}' has unsupported type {type_name(vtype, etype)}")
        v = parts[f.data[0]][0].item()
        return bool(v) if vtype == T_BOOL else v

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            out = {}
            for t in self.reader.tensors:
                shape = [int(x) for x in t.shape]
                while len(shape) > 1 and shape[-1] == 1:
                    shape.pop()
                out[t.name] = TensorInfo(int(t.tensor_type), tuple(shape), int(t.n_bytes), int(t.data_offset))
            self._tensors = out
        return self._tensors


class _Borrowed:
    """Context manager yielding a meta source without closing it."""

    def __init__(self, meta: _MetaBase) -> None:
        self.meta = meta

    def __enter__(self) -> _MetaBase:
        return self.meta

    def __exit__(self, *exc) -> None:
        pass


def open_meta(src: Any):
    """A context manager yielding a meta source for ``src``: a path is opened (and closed on exit);
    a :class:`GGUFMeta` / :class:`GGUFReaderMeta` is used as is; a ``gguf.GGUFReader`` is wrapped."""
    if isinstance(src, _MetaBase):
        return _Borrowed(src)
    if isinstance(src, (str, os.PathLike)):
        return GGUFMeta(src)
    if hasattr(src, "fields") and hasattr(src, "tensors"):
        return _Borrowed(GGUFReaderMeta(src))
    raise TypeError(f"expected a path, a GGUFMeta or a gguf.GGUFReader, got {type(src).__name__}")
