"""Where each field of a GGUF file lies: a bounded walk over the header, and a writer for one.

ggml's reader (``tnn_gguf_load``) decides whether a file is valid; this module is for *saying where*
a file it refused goes wrong (:func:`explain`, used by :class:`~toy_llm.gguf_meta.GGUFMeta` to name
the key or tensor record), and for tools that edit headers field by field (the loader fuzzer,
``toy_llm.testing.gguf_fuzz``). The walk does bounded work on any input: every claimed count and
length is checked against the bytes left before it is used, so nothing loops or allocates in
proportion to a length the file does not contain.

GGUF v2/v3 layout (little-endian): ``"GGUF"``, u32 version, u64 n_tensors, u64 n_kv; n_kv records
(str key, u32 value type, value); n_tensors records (str name, u32 n_dims, n_dims x u64 ne, u32 ggml
type, u64 offset from the data section); padding to ``general.alignment`` (32); the data section.
A str is a u64 length and that many bytes; an array a u32 element type, a u64 count, the elements.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["GGUFLayoutError", "KVRecord", "TensorRecord", "Layout", "parse", "explain", "encode_str",
           "encode_kv", "encode_tensor_info", "assemble", "SCALAR_FORMATS", "T_STR", "T_ARR"]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
T_STR, T_ARR = 8, 9
# value type -> struct format of one scalar
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                  12: "<d"}
TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "str",
              9: "arr", 10: "u64", 11: "i64", 12: "f64"}
MAX_DIMS = 4
MAX_NAME = 64    # GGML_MAX_NAME, with the terminator


class GGUFLayoutError(ValueError):
    """The header cannot be walked; ``offset`` is the byte where it goes wrong, ``record`` names the
    key or tensor record (``"key #3 'llama.block_count'"``) or the header field."""

    def __init__(self, msg: str, offset: int, record: str):
        super().__init__(f"{record} at byte {offset}: {msg}")
        self.offset, self.record = offset, record


@dataclass
class KVRecord:
    index: int
    key: str
    start: int              # the key's length field
    type_at: int            # the u32 value type
    vtype: int
    value_at: int           # the value (for arrays: the u32 element type)
    end: int
    etype: int | None = None
    n: int | None = None    # array count
    n_at: int | None = None
    value: object = None    # scalar / str value (arrays: None)
    str_len_ats: list[int] = field(default_factory=list)   # length fields of a str value / str array elements


@dataclass
class TensorRecord:
    index: int
    name: str
    start: int
    ndim_at: int
    ndim: int
    ne_at: int
    ne: tuple[int, ...]
    type_at: int
    type: int
    offset_at: int
    offset: int
    end: int


@dataclass
class Layout:
    size: int
    version: int
    n_tensors: int
    n_kv: int
    kvs: list[KVRecord]
    tensors: list[TensorRecord]
    tensor_info_end: int
    alignment: int
    data_start: int

    def kv(self, key: str) -> KVRecord | None:
        for r in self.kvs:
            if r.key == key:
                return r
        return None


class _Reader:
    def __init__(self, buf, record: str = "header"):
        self.buf, self.pos, self.size, self.record = buf, 0, len(buf), record

    def fail(self, msg: str, at: int | None = None):
        raise GGUFLayoutError(msg, self.pos if at is None else at, self.record)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} left in the file ({self.size} bytes)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> tuple[str, int]:
        at = self.pos
        n = self.scalar("<Q", f"the length of {what}")
        if n > self.size - self.pos:
            self.fail(f"{what} claims {n} bytes, only {self.size - self.pos} left in the file", at)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "surrogateescape")
        self.pos += n
        return s, at


def parse(buf) -> Layout:
    """The layout of a GGUF in ``buf`` (bytes, mmap, memoryview); GGUFLayoutError where it cannot be walked."""
    r = _Reader(buf)
    r.need(4, "the magic")
    if bytes(buf[:4]) != GGUF_MAGIC:
        r.fail(f"magic is {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r}")
    r.pos = 4
    version = r.scalar("<I", "the version")
    if version not in (2, 3):
        r.fail(f"version {version}, expected 2 or 3", 4)
    n_tensors = r.scalar("<Q", "the tensor count")
    n_kv = r.scalar("<Q", "the key count")
    # every key record takes >= 8 + 4 + 1 bytes, every tensor record >= 8 + 4 + 4 + 8
    if n_kv > (r.size - r.pos) // 13:
        r.fail(f"key count {n_kv} cannot fit in the {r.size - r.pos} bytes left", 16)
    if n_tensors > (r.size - r.pos) // 24:
        r.fail(f"tensor count {n_tensors} cannot fit in the {r.size - r.pos} bytes left", 8)
    kvs: list[KVRecord] = []
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        start = r.pos
        r.record = f"key #{i}"
        key, _ = r.string("the key")
        r.record = f"key #{i} '{key}'"
        type_at = r.pos
        vtype = r.scalar("<I", "the value type")
        rec = KVRecord(i, key, start, type_at, vtype, r.pos, 0)
        if vtype in SCALAR_FORMATS:
            rec.value = r.scalar(SCALAR_FORMATS[vtype], f"a {TYPE_NAMES[vtype]} value")
        elif vtype == T_STR:
            rec.value, at = r.string("the str value")
            rec.str_len_ats.append(at)
        elif vtype == T_ARR:
            rec.etype = r.scalar("<I", "the array element type")
            rec.n_at = r.pos
            rec.n = r.scalar("<Q", "the array length")
            if rec.etype in SCALAR_FORMATS:
                nbytes = struct.calcsize(SCALAR_FORMATS[rec.etype])
                if rec.n > (r.size - r.pos) // nbytes:
                    r.fail(f"array of {rec.n} x {TYPE_NAMES[rec.etype]} needs {rec.n * nbytes} bytes, only "
                           f"{r.size - r.pos} left in the file", rec.n_at)
                r.pos += rec.n * nbytes
            elif rec.etype == T_STR:
                if rec.n > (r.size - r.pos) // 8:
                    r.fail(f"array of {rec.n} strings needs at least {rec.n * 8} bytes, only {r.size - r.pos} "
                           f"left in the file", rec.n_at)
                buf, size, pos, ats = r.buf, r.size, r.pos, rec.str_len_ats
                unpack = struct.Struct("<Q").unpack_from
                for j in range(rec.n):   # (the hot loop of a 262k-token vocabulary: lengths only)
                    if size - pos < 8:
                        r.pos = pos
                        r.fail(f"the length of string {j} needs 8 bytes, only {size - pos} left in the file")
                    ln = unpack(buf, pos)[0]
                    if ln > size - pos - 8:
                        r.pos = pos
                        r.fail(f"string {j} claims {ln} bytes, only {size - pos - 8} left in the file")
                    ats.append(pos)
                    pos += 8 + ln
                r.pos = pos
            else:
                r.fail(f"array element type {rec.etype} is not a GGUF scalar or str type"
                       + (" (nested arrays are not allowed)" if rec.etype == T_ARR else ""), rec.value_at)
        else:
            r.fail(f"value type {vtype} is not a GGUF type (0..12)", type_at)
        rec.end = r.pos
        if key == "general.alignment" and vtype == 4:
            if rec.value == 0 or rec.value & (rec.value - 1):
                r.fail(f"alignment {rec.value} is not a power of 2", rec.value_at)
            alignment = rec.value
        kvs.append(rec)
    tensors: list[TensorRecord] = []
    for i in range(n_tensors):
        start = r.pos
        r.record = f"tensor #{i}"
        name, name_at = r.string("the tensor name")
        r.record = f"tensor #{i} '{name[:80]}'"
        if len(name.encode("utf-8", "surrogateescape")) >= MAX_NAME:
            r.fail(f"name of {len(name.encode('utf-8', 'surrogateescape'))} bytes, at most {MAX_NAME - 1}", name_at)
        ndim_at = r.pos
        ndim = r.scalar("<I", "the dimension count")
        if ndim > MAX_DIMS:
            r.fail(f"{ndim} dimensions, at most {MAX_DIMS}", ndim_at)
        ne_at = r.pos
        ne = tuple(r.scalar("<q", f"dimension {d}") for d in range(ndim))
        type_at = r.pos
        typ = r.scalar("<I", "the ggml type")
        offset_at = r.pos
        off = r.scalar("<Q", "the data offset")
        tensors.append(TensorRecord(i, name, start, ndim_at, ndim, ne_at, ne, type_at, typ, offset_at, off, r.pos))
    info_end = r.pos
    data_start = -(-info_end // alignment) * alignment
    if data_start > r.size:
        r.record = f"the data section (after tensor #{n_tensors - 1} '{tensors[-1].name}')" if tensors else \
            "the data section"
        r.fail(f"starts at byte {data_start} (alignment {alignment}), past the end of the file ({r.size} bytes)",
               info_end)
    return Layout(len(buf), version, n_tensors, n_kv, kvs, tensors, info_end, alignment, data_start)


def explain(path) -> str | None:
    """Where the header of the file at ``path`` cannot be walked ("key #3 'x' at byte 120: ..."), or
    None when it walks cleanly (the fault is then in what ggml checks beyond the layout)."""
    import mmap

    try:
        with open(path, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                parse(buf)
    except GGUFLayoutError as e:
        return str(e)
    except (OSError, ValueError):
        return None
    return None


# ---------------------------------------------------------------- writing

def encode_str(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _encode_value(vtype: int, value, etype: int | None = None) -> bytes:
    if vtype in SCALAR_FORMATS:
        return struct.pack(SCALAR_FORMATS[vtype], value)
    if vtype == T_STR:
        return encode_str(value)
    if vtype == T_ARR:
        items = list(value)
        body = b"".join(encode_str(v) if etype == T_STR else struct.pack(SCALAR_FORMATS[etype], v) for v in items)
        return struct.pack("<IQ", etype, len(items)) + body
    raise ValueError(f"unknown GGUF value type {vtype}")


def encode_kv(key: str, vtype: int, value, etype: int | None = None) -> bytes:
    """One key/value record."""
    return encode_str(key) + struct.pack("<I", vtype) + _encode_value(vtype, value, etype)


def encode_tensor_info(name: str, ne, ggml_type: int, offset: int) -> bytes:
    ne = list(ne)
    return encode_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *[d & (2**64 - 1) for d in ne],
                                          ggml_type, offset)


def assemble(kv_records: list[bytes], tensor_infos: list[bytes], data: bytes, version: int = 3,
             alignment: int = DEFAULT_ALIGNMENT, n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    """A GGUF from encoded records and the data section (padded to ``alignment`` before it)."""
    head = GGUF_MAGIC + struct.pack("<IQQ", version, len(tensor_infos) if n_tensors is None else n_tensors,
                                    len(kv_records) if n_kv is None else n_kv)
    body = head + b"".join(kv_records) + b"".join(tensor_infos)
    pad = (-len(body)) % alignment
    return body + b"\0" * pad + data
