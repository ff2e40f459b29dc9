"""A fuzz target for the GGUF loader: structural mutations of small valid GGUFs, each run through
``toy_llm.load`` + ``eval`` in a forked child under a time and address-space limit.

Every mutated file must end in a correct load, or in a :class:`~toy_llm.gguf_meta.GGUFLoadError`
(or the shim's ``TinyNNError``) whose message names the file and a key, a tensor or the header
field at fault. Anything else is a failure: another exception type, a message that names neither,
a signal, a hang (``--timeout``, default 10 s) or running out of the address space (2 GB)::

    python -m toy_llm.testing.gguf_fuzz --n 5000 --seed 0 [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

prints a table of outcomes per mutation kind and exits non-zero on any failure. The mutations
(:func:`mutations`) are enumerated from the file's own layout (:mod:`toy_llm.gguf_layout`): value
types, values and array lengths of each key (2^31, 2^32, 2^63-1, 2^64-1, ...), element types,
string lengths, counts, tensor dims / types / offsets, transposed and reshaped tensors, renamed,
dropped and duplicated records, truncation at every section boundary, and random byte flips;
``--n`` draws that many with a seeded generator. :func:`mutation_strategy` draws them with
hypothesis (tests/test_gguf_fuzz.py), and :func:`fuzz_one` takes raw bytes, as an atheris
``TestOneInput`` (atheris is not a dependency)::

    import atheris, sys
    from toy_llm.testing.gguf_fuzz import fuzz_one
    atheris.Setup(sys.argv, fuzz_one); atheris.Fuzz()

Base files are tiny synthetic models (:func:`write_base_models`: llama, qwen3, gemma2, mixtral with
d_model 64, ~0.4 MB each). A large model given with ``--model`` gets header-only mutations applied
in place to one working copy (patched, run, restored), so no file is copied per mutation.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..gguf_layout import SCALAR_FORMATS, T_ARR, T_STR, Layout, assemble, encode_kv, encode_tensor_info, parse
from ..gguf_layout import TYPE_NAMES as GGUF_TYPE_NAMES

BASE_FAMILIES = ("llama", "qwen3", "gemma2", "mixtral")
TINY_DIMS = dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, context_length=64)
AS_LIMIT = 2 << 30          # bytes of address space a child may map
TIMEOUT_S = 10.0
HUGE = (2**31, 2**32, 2**63 - 1, 2**64 - 1)
INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, GGML_Q8_K, GGML_I8, GGML_I32, GGML_F64 = 0, 1, 2, 8, 15, 24, 26, 28
MAX_MSG = 4000


def write_base_models(out_dir: str | os.PathLike, families=BASE_FAMILIES) -> list[Path]:
    """Tiny synthetic GGUFs (F32, 2 layers, d_model 64, 512 tokens) to mutate."""
    from .synthetic import family_config, write_model

    out = []
    for fam in families:
        cfg = family_config(fam)
        cfg.update(TINY_DIMS)
        if cfg["n_experts"]:
            cfg.update(n_experts=4, d_ff_exp=32)
        out.append(write_model(Path(out_dir) / f"{fam}.gguf", fam, config=cfg))
    return out


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------

@dataclass
class Mutation:
    """One edit of a base file: either in-place ``patches`` [(offset, bytes)] and/or a ``truncate``
    length (header-only: fit for a large base), or a whole ``rebuilt`` file."""

    kind: str
    target: str                 # the key / tensor / header field aimed at ("" for none)
    detail: str
    patches: list[tuple[int, bytes]] = field(default_factory=list)
    truncate: int | None = None
    rebuilt: Callable[[], bytes] | bytes | None = None   # a thunk (built on use) or the bytes

    @property
    def in_place(self) -> bool:
        return self.rebuilt is None

    def apply(self, base: bytes) -> bytes:
        if self.rebuilt is not None:
            return self.rebuilt() if callable(self.rebuilt) else self.rebuilt
        b = bytearray(base)
        for off, data in self.patches:
            b[off:off + len(data)] = data
        return bytes(b[:self.truncate]) if self.truncate is not None else bytes(b)

    def label(self) -> str:
        return f"{self.kind}[{self.target}] {self.detail}"


def _u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v & (2**64 - 1))


def _replaced(records: list, i: int, rec: bytes | None) -> list:
    """A copy of ``records`` with record i replaced by ``rec`` (None: deleted)."""
    out = list(records)
    if rec is None:
        del out[i]
    else:
        out[i] = rec
    return out

class _Rebuild:
    """The base as records, to edit and reassemble (offsets of the data section kept)."""

    def __init__(self, buf: bytes, lay: Layout):
        self.buf, self.lay = buf, lay
        self.kvs = [buf[k.start:k.end] for k in lay.kvs]
        self.infos = [buf[t.start:t.end] for t in lay.tensors]
        self.data = buf[lay.data_start:]

    def build(self, kvs=None, infos=None, **kw):
        """A thunk making the file (mutations are enumerated by the thousand: build on use)."""
        kvs, infos = (self.kvs if kvs is None else kvs), (self.infos if infos is None else infos)
        return lambda: assemble(kvs, infos, self.data, version=self.lay.version, alignment=self.lay.alignment, **kw)

    def with_kv(self, i: int, rec: bytes | None):
        return self.build(kvs=_replaced(self.kvs, i, rec))

    def with_info(self, i: int, rec: bytes | None):
        return self.build(infos=_replaced(self.infos, i, rec))


def _kv_alternatives(key: str, vtype: int, value, etype, n) -> Iterator[tuple[str, int, object, int | None]]:
    """(detail, vtype, value, etype) replacements for one key/value."""
    if vtype in INT_TYPES:
        v = int(value)
        same_in_u16 = 2 if v < 2**16 else 10   # the same value in another integer width: must load
        for nv, t in ((0, 4), (1, 4), (-1, 5), (-2**31, 5), (2**31 - 1, 4), (2**32 - 1, 4), (2**63 - 1, 10),
                      (2**64 - 1, 10), (v + 1, 4 if v + 1 < 2**32 else 10), (2 * v, 10), (v, 11), (v, same_in_u16)):
            yield f"= {nv} ({GGUF_TYPE_NAMES[t]})", t, nv, None
        yield f"= \"{v}\" (str)", T_STR, str(v), None
        yield "= 2.5 (f32)", 6, 2.5, None
        yield f"= {v}.0 (f64)", 12, float(v), None
        yield "= true (bool)", 7, True, None
        yield f"= [{v}] (arr[u32])", T_ARR, [v & 0xFFFFFFFF], 4
        yield "= [] (arr[i32])", T_ARR, [], 5
    elif vtype in (6, 12):
        for nv in (0.0, -1.0, float("nan"), float("inf"), 1e30):
            yield f"= {nv}", vtype, nv, None
        yield "= 1 (u32)", 4, 1, None
        yield "= \"1.0\" (str)", T_STR, "1.0", None
    elif vtype == 7:
        yield "= 1 (u8)", 0, 1, None
        yield "= \"true\" (str)", T_STR, "true", None
    elif vtype == T_STR:
        for nv in ("", "llama", "gemma2", "qwen3", "mixtral", "gpt2", "no-such-thing", "x" * 300, "\udcff\udcfe"):
            if nv != value:
                yield f"= {nv[:20]!r}", T_STR, nv, None
        yield "= 1 (u32)", 4, 1, None
        yield f"= [{str(value)[:10]!r}] (arr[str])", T_ARR, [value], T_STR
    elif vtype == T_ARR:
        yield "= \"x\" (str)", T_STR, "x", None
        yield "= 7 (u32)", 4, 7, None
        yield "= [] (empty)", T_ARR, [], etype
        if etype == T_STR:
            yield f"= {n} x i32 0", T_ARR, [0] * n, 5
        elif etype in SCALAR_FORMATS:
            yield f"= {n} x str", T_ARR, ["1"] * n, T_STR


def _array_edits(key: str, etype: int, items: list) -> Iterator[tuple[str, list, int]]:
    """(detail, new items, etype) for an array's contents."""
    n = len(items)
    if n:
        yield f"n-1 = {n - 1}", items[:-1], etype
        yield "1 element", items[:1], etype
        yield f"n+1 = {n + 1}", items + items[-1:], etype
    if etype == T_STR and n > 3:
        yield "element 3 empty", items[:3] + [""] + items[4:], etype
        yield "element 3 = element 2", items[:3] + [items[2]] + items[4:], etype
        yield "element 3 bad utf-8", items[:3] + ["\udcff\udcfe"] + items[4:], etype
        if "merges" in key:
            yield "merge 0 without a space", ["abc"] + items[1:], etype
            yield "merge 0 of unknown tokens", ["\u4e00\u4e01 \u4e02"] + items[1:], etype
            yield "merge 0 = ' '", [" "] + items[1:], etype
    if etype in INT_TYPES and n > 3:
        for v in (-1, 7, 2**31 - 1 if etype in (4, 5, 10, 11) else 127):
            fmt = SCALAR_FORMATS[etype]
            try:
                struct.pack(fmt, v)
            except struct.error:
                continue
            yield f"element 3 = {v}", items[:3] + [v] + items[4:], etype
    if etype in (6, 12) and n > 3:
        for v in (float("nan"), float("inf"), -1e30):
            yield f"element 3 = {v}", items[:3] + [v] + items[4:], etype


def _read_array(buf: bytes, k) -> list:
    """The items of array record ``k`` (small files only)."""
    pos = k.n_at + 8
    if k.etype == T_STR:
        out = []
        for _ in range(k.n):
            ln = struct.unpack_from("<Q", buf, pos)[0]
            out.append(buf[pos + 8:pos + 8 + ln].decode("utf-8", "surrogateescape"))
            pos += 8 + ln
        return out
    fmt = SCALAR_FORMATS[k.etype]
    return list(struct.unpack_from(f"<{k.n}{fmt[1]}", buf, pos))


SPECIAL_ID_KEYS = ("bos", "eos", "unknown", "padding", "eot", "eom", "seperator", "mask")


def mutations(buf: bytes, *, header_only: bool = False, seed: int = 0, n_random: int = 64) -> list[Mutation]:
    """Every targeted mutation of the GGUF in ``buf``, plus ``n_random`` random byte flips.
    ``header_only``: only in-place edits (patches / truncation inside the header), for large bases."""
    lay = parse(buf)
    out: list[Mutation] = []
    add = out.append
    rng = np.random.default_rng(seed)

    # ---- header fields (in place)
    add(Mutation("header", "magic", "GGUF -> GGUG", [(3, b"G")]))
    for v in (0, 1, 2, 4, 2**32 - 1):
        add(Mutation("header", "version", f"= {v}", [(4, _u32(v))]))
    for name, at, n in (("tensor count", 8, lay.n_tensors), ("key count", 16, lay.n_kv)):
        for v in (0, n - 1, n + 1, 2 * n) + HUGE:
            add(Mutation("header", name, f"= {v}", [(at, _u64(v))]))

    # ---- key records, in place: value type, element type, lengths
    for k in lay.kvs:
        for v in (T_ARR, T_STR, 13, 2**32 - 1, 0, 6, 7, 10):
            if v != k.vtype:
                add(Mutation("raw_vtype", k.key, f"value type {k.vtype} -> {v}", [(k.type_at, _u32(v))]))
        for v in (0, 1) + HUGE:
            add(Mutation("raw_key_len", k.key, f"key length = {v}", [(k.start, _u64(v))]))
        if k.vtype == T_STR:
            ln = len(str(k.value).encode("utf-8", "surrogateescape"))
            for v in (ln + 1, ln + 1000) + HUGE:
                add(Mutation("raw_str_len", k.key, f"string length = {v}", [(k.value_at, _u64(v))]))
        if k.vtype == T_ARR:
            for v in (T_ARR, T_STR, 13, 2**32 - 1, 0, 12):
                if v != k.etype:
                    add(Mutation("raw_etype", k.key, f"element type {k.etype} -> {v}", [(k.value_at, _u32(v))]))
            for v in (0, k.n - 1, k.n + 1) + HUGE:
                add(Mutation("raw_arr_len", k.key, f"array length {k.n} -> {v}", [(k.n_at, _u64(v))]))
            if k.etype == T_STR and k.str_len_ats:
                for j in (0, len(k.str_len_ats) // 2, len(k.str_len_ats) - 1):
                    for v in (2**32, 2**64 - 1, 1000):
                        add(Mutation("raw_str_len", k.key, f"string {j} length = {v}",
                                     [(k.str_len_ats[j], _u64(v))]))
        # same-width value edits in place (a large base gets these too)
        if k.vtype in (4, 5, 10, 11):
            width = 4 if k.vtype in (4, 5) else 8
            n_vocab = next((r.n for r in lay.kvs if r.key == "tokenizer.ggml.tokens"), 0)
            for v in (0, 1, 3, 2**31 - 1, 2**32 - 1, int(k.value) + 1, n_vocab, 2**63 - 1 if width == 8 else 2**31):
                b = struct.pack("<I" if width == 4 else "<Q", v & (2**(8 * width) - 1))
                add(Mutation("kv_value_inplace", k.key, f"= {v}", [(k.value_at, b)]))
            other = {4: 5, 5: 4, 10: 11, 11: 10}[k.vtype]
            add(Mutation("kv_value_inplace", k.key, f"type {k.vtype} -> {other}, value -1",
                         [(k.type_at, _u32(other)), (k.value_at, b"\xff" * width)]))
    # ---- tensor records, in place
    for t in lay.tensors:
        if t.ndim >= 2 and t.ne[0] != t.ne[1]:
            add(Mutation("tensor_shape_inplace", t.name, f"{list(t.ne)} transposed",
                         [(t.ne_at, struct.pack("<qq", t.ne[1], t.ne[0]))]))
        if t.type == GGML_F32:
            add(Mutation("tensor_type_inplace", t.name, "F32 -> I32 (same size)", [(t.type_at, _u32(GGML_I32))]))
        for v in (0, 5, 2**32 - 1):
            add(Mutation("raw_tensor_ndim", t.name, f"n_dims {t.ndim} -> {v}", [(t.ndim_at, _u32(v))]))
        for d in range(t.ndim):
            for v in (0, -1, 2**62, 2**63 - 1, 2**32 + 1, t.ne[d] + 1, t.ne[d] * 2):
                add(Mutation("raw_tensor_ne", t.name, f"ne[{d}] {t.ne[d]} -> {v}", [(t.ne_at + 8 * d, _u64(v))]))
        for v in (GGML_F16, GGML_Q4_0, 4, 5, GGML_Q8_K, GGML_I8, GGML_I32, GGML_F64, 39, 40, 99, 2**32 - 1):
            if v != t.type:
                add(Mutation("raw_tensor_type", t.name, f"type {t.type} -> {v}", [(t.type_at, _u32(v))]))
        for v in (t.offset + 1, t.offset + 4, t.offset + 32, t.offset - 32, 0, 2**63, 2**64 - 1,
                  lay.size - lay.data_start):
            if v != t.offset and v >= 0:
                add(Mutation("raw_tensor_offset", t.name, f"offset {t.offset} -> {v}", [(t.offset_at, _u64(v))]))
    # ---- truncation at section boundaries (header only when asked)
    cuts = {4, 8, 16, 24, lay.tensor_info_end, lay.data_start}
    for k in lay.kvs:
        cuts |= {k.start, k.type_at, k.value_at, k.end - 1}
    for t in lay.tensors:
        cuts |= {t.start, t.ne_at, t.offset_at, t.end - 1}
    if not header_only:
        for t in lay.tensors:
            cuts |= {lay.data_start + t.offset, lay.data_start + t.offset + 7}
        cuts |= {lay.size - 1, lay.size - 4096}
    for c in sorted(cuts):
        for d in (-1, 0, 1):
            if 0 <= c + d < lay.size and (not header_only or c + d <= lay.data_start):
                add(Mutation("truncate", "", f"at byte {c + d} of {lay.size}", truncate=c + d))
    # ---- random byte flips in the header
    for _ in range(n_random):
        k = int(rng.integers(1, 9))
        pos = rng.integers(0, lay.tensor_info_end, size=k)
        patches = [(int(p), bytes([int(rng.integers(0, 256))])) for p in pos]
        add(Mutation("byte_flip", "", f"{k} bytes at {sorted(int(p) for p in pos)}", patches))
    if header_only:
        return out

    # ---- rebuilt files: whole records replaced (the layout stays walkable)
    rb = _Rebuild(buf, lay)
    arch = next((k.value for k in lay.kvs if k.key == "general.architecture"), "llama")
    for i, k in enumerate(lay.kvs):
        for detail, vt, val, et in _kv_alternatives(k.key, k.vtype, k.value, k.etype, k.n or 0):
            try:
                rec = encode_kv(k.key, vt, val, et)
            except (struct.error, OverflowError):
                continue
            add(Mutation("kv_value" if vt == k.vtype else "kv_retype", k.key, detail, rebuilt=rb.with_kv(i, rec)))
        add(Mutation("kv_delete", k.key, "deleted", rebuilt=rb.with_kv(i, None)))
        add(Mutation("kv_duplicate", k.key, "twice", rebuilt=rb.build(kvs=rb.kvs + [rb.kvs[i]])))
        if k.vtype == T_ARR and k.etype is not None and (k.etype == T_STR or k.etype in SCALAR_FORMATS):
            items = _read_array(buf, k)
            for detail, new, et in _array_edits(k.key, k.etype, items):
                add(Mutation("arr_edit", k.key, detail, rebuilt=rb.with_kv(i, encode_kv(k.key, T_ARR, new, et))))
    n_vocab = next((k.n for k in lay.kvs if k.key == "tokenizer.ggml.tokens"), 512)
    for name in SPECIAL_ID_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        for v, t in ((n_vocab, 4), (n_vocab + 1, 4), (2**32 - 1, 4), (-1, 5), (2**63 - 1, 10), (-5, 11)):
            rec = encode_kv(key, t, v)
            j = next((i for i, k in enumerate(lay.kvs) if k.key == key), None)
            data = rb.with_kv(j, rec) if j is not None else rb.build(kvs=rb.kvs + [rec])
            add(Mutation("special_id", key, f"= {v}", rebuilt=data))
    for v, t in ((0, 4), (3, 4), (16, 4), (64, 4), (2**31, 4), (32, 10), ("32", T_STR)):
        rec = encode_kv("general.alignment", t, v)
        add(Mutation("alignment", "general.alignment", f"= {v!r} ({t})", rebuilt=rb.build(kvs=rb.kvs + [rec])))
    for extra_key, t, v in ((f"{arch}.attention.key_length", 4, 0), (f"{arch}.attention.key_length", 4, 17),
                            (f"{arch}.attention.key_length", 4, 2**31), (f"{arch}.rope.dimension_count", 4, 0),
                            (f"{arch}.rope.dimension_count", 4, 15), (f"{arch}.rope.dimension_count", 4, 2**20),
                            (f"{arch}.expert_count", 4, 2**31), (f"{arch}.expert_used_count", 4, 99),
                            (f"{arch}.attention.sliding_window", 4, 2**32 - 1),
                            (f"{arch}.attention.sliding_window_pattern", 4, 0),
                            (f"{arch}.rope.scaling.type", T_STR, "yarn"), (f"{arch}.rope.scaling.factor", 6, 0.0),
                            (f"{arch}.rope.scaling.factor", 6, -1.0), (f"{arch}.rope.scaling.type", T_STR, "linear")):
        rec = encode_kv(extra_key, t, v)
        j = next((i for i, k in enumerate(lay.kvs) if k.key == extra_key), None)
        data = rb.with_kv(j, rec) if j is not None else rb.build(kvs=rb.kvs + [rec])
        add(Mutation("kv_extra", extra_key, f"= {v!r}", rebuilt=data))
    for i, t in enumerate(lay.tensors):
        ne = list(t.ne)
        shapes = []
        if len(ne) >= 2 and ne[0] != ne[1]:
            shapes.append(("transposed", [ne[1], ne[0]] + ne[2:]))
        if len(ne) >= 2 and ne[1] % 2 == 0:
            shapes.append(("ne0*2, ne1/2", [ne[0] * 2, ne[1] // 2] + ne[2:]))
        if ne[0] % 2 == 0:
            shapes.append(("split ne0 into 2 rows", [ne[0] // 2, 2 * (ne[1] if len(ne) > 1 else 1)] + ne[2:]))
        shapes.append(("flattened to 1-D", [int(np.prod(ne))]))
        if len(ne) < 4:
            shapes.append(("trailing 1 added", ne + [1]))
        if len(ne) == 2 and ne[1] % 2 == 0:
            shapes.append(("3-D", [ne[0], ne[1] // 2, 2]))
        shapes.append(("5-D", ne + [1] * (5 - len(ne))))
        shapes.append(("0-D", []))
        for detail, new in shapes:
            add(Mutation("tensor_shape", t.name, f"{list(ne)} -> {detail} {new}",
                         rebuilt=rb.with_info(i, encode_tensor_info(t.name, new, t.type, t.offset))))
        for typ in (GGML_I32, GGML_F16, GGML_I8):
            if typ != t.type:
                add(Mutation("tensor_type", t.name, f"type {t.type} -> {typ}",
                             rebuilt=rb.with_info(i, encode_tensor_info(t.name, t.ne, typ, t.offset))))
        for new_name, detail in ((t.name + ".x", "renamed"), ("", "empty name"), ("n" * 64, "64-char name"),
                                 (lay.tensors[(i + 1) % len(lay.tensors)].name, "name of the next tensor")):
            add(Mutation("tensor_name", t.name, detail,
                         rebuilt=rb.with_info(i, encode_tensor_info(new_name, t.ne, t.type, t.offset))))
        add(Mutation("tensor_delete", t.name, "record dropped", rebuilt=rb.with_info(i, None)))
    # an extra tensor: a layer beyond block_count, and an unknown one (data appended, offsets valid)
    last = lay.tensors[-1]
    end = last.offset + (-(-int(np.prod(last.ne)) * 4 // 32) * 32 if last.type == GGML_F32 else 0)
    if last.type == GGML_F32:
        for extra in ("blk.9.attn_norm.weight", "zzz.unused.weight"):
            info = encode_tensor_info(extra, [64], GGML_F32, end)
            data = (lambda info=info: assemble(rb.kvs, rb.infos + [info], rb.data[:end] + b"\0" * 256,
                                               version=lay.version, alignment=lay.alignment))
            add(Mutation("tensor_extra", extra, "appended", rebuilt=data))
    # random byte flips anywhere (data too)
    for _ in range(n_random // 4):
        pos = int(rng.integers(lay.data_start, lay.size))
        add(Mutation("data_flip", "", f"byte {pos}", [(pos, bytes([int(rng.integers(0, 256))]))]))
    return out


# ---------------------------------------------------------------------------------------------
# running one file: a forked child under limits
# ---------------------------------------------------------------------------------------------

OK, NAMED, UNNAMED, OTHER_EXC, SIGNAL, HANG, ADDRESS_SPACE = ("ok", "error", "error-unnamed", "other-exception",
                                                              "signal", "hang", "address-space")
FAILURES = (UNNAMED, OTHER_EXC, SIGNAL, HANG, ADDRESS_SPACE)


@dataclass
class Outcome:
    kind: str                  # one of OK .. ADDRESS_SPACE
    exc_type: str = ""
    message: str = ""
    seconds: float = 0.0
    names_target: bool = False  # the message names the mutation's own target

    @property
    def failed(self) -> bool:
        return self.kind in FAILURES


def check_file(path: str) -> tuple[str, str, str]:
    """Load ``path`` and evaluate three tokens, in this process: ("ok" | "exc", type, message)."""
    import toy_llm

    try:   # $TNN_FUZZ_LOADER: "mmap" (default) or "copy", the load() path under test
        m = toy_llm.load(path, max_T=64, n_threads=1, loader=os.environ.get("TNN_FUZZ_LOADER", "mmap"))
        try:
            v, n = m.config.vocab, min(3, m.cache.max_T)   # (a context of 1 or 2 is a valid file)
            logits = m.eval([(1 + i) % v for i in range(n)])
            if logits.shape != (n, v):
                return "exc", "AssertionError", f"logits of shape {logits.shape}, expected ({n}, {v})"
        finally:
            m.close()
        return "ok", "", ""
    except BaseException as e:   # noqa: BLE001  (the parent classifies every kind)
        names = ",".join(c.__name__ for c in type(e).__mro__)
        return "exc", names, str(e)[:MAX_MSG]


# a quoted or numbered key / tensor, a header field, a dotted key name ("tokenizer.ggml.model"), or
# what is wrong with the file as a whole (empty, not a regular file)
_NAMES_RECORD = re.compile(r"\b(key|tensor)s?\b[^'\"]{0,40}['\"#]|\b(magic|version|tensor count|key count)\b"
                           r"|is empty\b|not a regular file|no such file"
                           r"|\b[a-z0-9_]+(\.[a-z0-9_]+){2,}\b", re.I)


def classify(path: str, status: str, exc_type: str, msg: str, target: str = "") -> Outcome:
    if status == "ok":
        return Outcome(OK)
    types = exc_type.split(",")
    if "MemoryError" in types:
        return Outcome(ADDRESS_SPACE, types[0], msg)
    if "GGUFLoadError" not in types and "TinyNNError" not in types:
        return Outcome(OTHER_EXC, types[0], msg)
    named = (path in msg or os.path.basename(path) in msg) and bool(_NAMES_RECORD.search(msg))
    return Outcome(NAMED if named else UNNAMED, types[0], msg, names_target=bool(target) and target in msg)


def address_space_limit() -> int:
    """RLIMIT_AS for the children: $TNN_FUZZ_AS_LIMIT (bytes, 0 = none), else 2 GB; none under
    AddressSanitizer, whose shadow memory reserves terabytes of address space."""
    env = os.environ.get("TNN_FUZZ_AS_LIMIT")
    if env is not None:
        return int(env)
    if "asan" in os.environ.get("LD_PRELOAD", "") or "libasan" in Path("/proc/self/maps").read_text():
        return 0
    return AS_LIMIT


def run_in_child(path: str, timeout: float = TIMEOUT_S, as_limit: int | None = None, target: str = "") -> Outcome:
    """:func:`check_file` in a forked child with RLIMIT_AS and a time limit; the outcome classified."""
    as_limit = address_space_limit() if as_limit is None else as_limit
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:   # child
        try:
            os.close(r)
            if as_limit:
                resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)   # kills the child even inside C code
            signal.alarm(int(timeout) + 1)
            res = check_file(path)
            os.write(w, json.dumps(res).encode()[:60000])
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline, killed = [], t0 + timeout, False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        ready, _, _ = select.select([r], [], [], left)
        if ready:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
    os.close(r)
    _, st = os.waitpid(pid, 0)
    dt = time.perf_counter() - t0
    if killed or (os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGALRM):
        return Outcome(HANG, "", f"no result after {timeout} s", dt)
    if os.WIFSIGNALED(st):
        return Outcome(SIGNAL, signal.Signals(os.WTERMSIG(st)).name, "", dt)
    try:
        status, exc_type, msg = json.loads(b"".join(chunks).decode())
    except ValueError:
        return Outcome(SIGNAL, "no result", f"child exited with {os.WEXITSTATUS(st)} and no result", dt)
    out = classify(path, status, exc_type, msg, target)
    out.seconds = dt
    return out


def fuzz_one(data: bytes) -> None:
    """atheris-style target: ``data`` as a GGUF file, loaded and evaluated in this process. Returns on a
    correct load or a GGUFLoadError / TinyNNError naming the file and a record; raises otherwise."""
    with tempfile.NamedTemporaryFile(suffix=".gguf", delete=False) as f:
        f.write(data)
        path = f.name
    try:
        status, exc_type, msg = check_file(path)
        out = classify(path, status, exc_type, msg)
        if out.failed:
            raise AssertionError(f"{out.kind}: {out.exc_type}: {out.message}")
    finally:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------
# campaigns
# ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    results: list[tuple[str, Mutation, Outcome]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[tuple[str, Mutation, Outcome]]:
        return [r for r in self.results if r[2].failed]

    def counts(self) -> Counter:
        return Counter(o.kind for _, _, o in self.results)

    def table(self) -> str:
        by_kind: dict[str, Counter] = defaultdict(Counter)
        for _, m, o in self.results:
            by_kind[m.kind][o.kind] += 1
            if o.kind in (NAMED, UNNAMED) and m.target:
                by_kind[m.kind]["names-target"] += o.names_target
        cols = [OK, NAMED, UNNAMED, OTHER_EXC, SIGNAL, HANG, ADDRESS_SPACE]
        head = f"{'mutation':<18}{'files':>7}" + "".join(f"{c:>16}" for c in cols) + f"{'names target':>14}"
        lines = [head, "-" * len(head)]
        tot = Counter()
        for kind in sorted(by_kind):
            c = by_kind[kind]
            n = sum(c[k] for k in cols)
            tot.update(c)
            lines.append(f"{kind:<18}{n:>7}" + "".join(f"{c[k]:>16}" for k in cols) + f"{c['names-target']:>14}")
        n = sum(tot[k] for k in cols)
        lines.append("-" * len(head))
        lines.append(f"{'total':<18}{n:>7}" + "".join(f"{tot[k]:>16}" for k in cols) + f"{tot['names-target']:>14}")
        lines.append(f"{n} files in {self.seconds:.1f} s ({1000 * self.seconds / max(n, 1):.1f} ms each); "
                     f"{len(self.failures)} failures")
        return "\n".join(lines)


def warm_up(path: str) -> None:
    """Import and initialise everything in the parent once, so each child only does the work."""
    status, exc, msg = check_file(path)
    if status != "ok":
        raise RuntimeError(f"base file {path} does not load: {exc}: {msg}")


def run_mutations(base_path: str, muts: list[Mutation], work_dir: str, timeout: float = TIMEOUT_S,
                  report: Report | None = None, progress: bool = False) -> Report:
    """Each mutation of ``base_path`` written to ``work_dir`` and run in a child. In-place mutations
    of a large base patch one working copy and restore it afterwards."""
    report = report or Report()
    base = Path(base_path).read_bytes() if os.path.getsize(base_path) < (64 << 20) else None
    work = Path(work_dir) / ("mut-" + Path(base_path).name)
    copy_made = False
    t0 = time.perf_counter()
    for i, m in enumerate(muts):
        if base is not None:
            work.write_bytes(m.apply(base))
        else:   # large base: header-only edits on one copy
            if not m.in_place:
                continue
            if m.truncate is not None and m.truncate <= (16 << 20):   # a short file of its own
                with open(base_path, "rb") as f:
                    b = bytearray(f.read(m.truncate))
                for off, data in m.patches:
                    b[off:off + len(data)] = data
                short = work.with_suffix(".short.gguf")
                short.write_bytes(bytes(b))
                out = run_in_child(str(short), timeout=timeout, target=m.target)
                short.unlink()
                report.results.append((Path(base_path).name, m, out))
                continue
            else:
                if not copy_made:
                    shutil.copyfile(base_path, work)
                    copy_made = True
                with open(base_path, "rb") as src, open(work, "r+b") as f:
                    saved = [(off, (src.seek(off), src.read(len(d)))[1]) for off, d in m.patches]
                    for off, d in m.patches:
                        f.seek(off)
                        f.write(d)
        out = run_in_child(str(work), timeout=timeout, target=m.target)
        if base is None:
            with open(work, "r+b") as f:
                for off, d in saved:
                    f.seek(off)
                    f.write(d)
        report.results.append((Path(base_path).name, m, out))
        if progress and (i + 1) % 200 == 0:
            print(f"  {Path(base_path).name}: {i + 1}/{len(muts)}", file=sys.stderr)
    report.seconds += time.perf_counter() - t0
    try:
        work.unlink()
    except FileNotFoundError:
        pass
    return report


def campaign(n: int, seed: int = 0, model: str | None = None, n_model: int = 100, timeout: float = TIMEOUT_S,
             work_dir: str | None = None, progress: bool = False) -> Report:
    """``n`` mutations drawn (seeded) from the tiny base models' enumerations (each targeted mutation
    once before any repeats; repeats get fresh random flips), plus ``n_model`` header mutations of
    ``model`` when given."""
    if work_dir is None and os.access("/dev/shm", os.W_OK):
        work_dir = "/dev/shm"   # thousands of files written and read once: keep them off the disk
    tmp = tempfile.mkdtemp(prefix="gguf-fuzz-", dir=work_dir)
    try:
        bases = write_base_models(tmp)
        warm_up(str(bases[0]))
        rng = np.random.default_rng(seed)
        per_base: list[list[Mutation]] = []
        for i, b in enumerate(bases):
            per_base.append(mutations(b.read_bytes(), seed=seed * 100 + i))
        pool = [(bi, m) for bi, ms in enumerate(per_base) for m in ms]
        order = rng.permutation(len(pool))
        picked = [pool[j] for j in order[:n]]
        extra_round = 0
        while len(picked) < n:   # more than the enumeration: fresh random flips
            extra_round += 1
            for bi, b in enumerate(bases):
                flips = [m for m in mutations(b.read_bytes(), seed=seed * 100 + bi + 7919 * extra_round,
                                              n_random=256) if m.kind in ("byte_flip", "data_flip")]
                picked += [(bi, m) for m in flips]
            picked = picked[:n]
        report = Report()
        for bi, b in enumerate(bases):
            muts = [m for j, m in picked if j == bi]
            run_mutations(str(b), muts, tmp, timeout=timeout, report=report, progress=progress)
        if model:
            with open(model, "rb") as f:
                head = f.read(16 << 20)
            lay_muts = stratified(mutations_of_large(head, seed), n_model, rng)
            run_mutations(model, lay_muts, tmp, timeout=timeout, report=report, progress=progress)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stratified(muts: list[Mutation], n: int, rng) -> list[Mutation]:
    """``n`` of ``muts``, taken round-robin over the mutation kinds (each kind shuffled)."""
    by_kind: dict[str, list[Mutation]] = defaultdict(list)
    for m in muts:
        by_kind[m.kind].append(m)
    queues = []
    for kind in sorted(by_kind):
        ms = by_kind[kind]
        queues.append([ms[j] for j in rng.permutation(len(ms))])
    out: list[Mutation] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def mutations_of_large(head: bytes, seed: int) -> list[Mutation]:
    """Header-only mutations of a large file, from its first bytes (which hold the whole header)."""
    return mutations(head, header_only=True, seed=seed)


# ---------------------------------------------------------------------------------------------
# hypothesis
# ---------------------------------------------------------------------------------------------

def mutation_strategy(buf: bytes, seed: int = 0):
    """A hypothesis strategy of Mutations of ``buf``: a targeted one, optionally followed by up to 8
    random byte writes in the header, or random byte writes alone."""
    from hypothesis import strategies as st

    lay = parse(buf)
    targeted = [m for m in mutations(buf, seed=seed, n_random=0)]
    flips = st.lists(st.tuples(st.integers(0, lay.tensor_info_end - 1), st.binary(min_size=1, max_size=8)),
                     min_size=0, max_size=8)

    @st.composite
    def strat(draw):
        m = draw(st.sampled_from(targeted))
        extra = draw(flips)
        if not extra:
            return m
        data = bytearray(m.apply(buf))
        for off, b in extra:
            if off < len(data):
                data[off:off + len(b)] = b[:len(data) - off]
        return Mutation(m.kind + "+flips", m.target, f"{m.detail} + {len(extra)} writes", rebuilt=bytes(data))

    return strat()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m toy_llm.testing.gguf_fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=int(os.environ.get("TNN_FUZZ_N", "2000")),
                    help="mutated tiny-model files (default: $TNN_FUZZ_N or 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="also mutate this (large) GGUF's header in place")
    ap.add_argument("--n-model", type=int, default=100, help="header mutations of --model (default 100)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S)
    ap.add_argument("--show", type=int, default=20, help="failures to print")
    ap.add_argument("--dump", default=None, help="write every result as JSON lines to this file")
    args = ap.parse_args(argv)
    rep = campaign(args.n, args.seed, args.model, args.n_model, args.timeout, progress=True)
    print(rep.table())
    if args.dump:
        with open(args.dump, "w") as f:
            for base, m, o in rep.results:
                f.write(json.dumps(dict(base=base, kind=m.kind, target=m.target, detail=m.detail, outcome=o.kind,
                                        exc=o.exc_type, msg=o.message[:600], names_target=o.names_target)) + "\n")
    for base, m, o in rep.failures[:args.show]:
        print(f"FAIL {o.kind:<16} {base}: {m.label()}\n     {o.exc_type}: {o.message[:300]}")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
