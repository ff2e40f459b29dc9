"""toy_llm.gguf_meta (ggml's GGUF reader through the tnn_gguf_* getters) against the ``gguf`` package's
GGUFReader, the independent reference: every key and tensor of synthetic and real files; load_config
unchanged; wrong types, non-regular files and malformed lengths end in a quick GGUFLoadError."""
from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from toy_llm import tinynn as tnn
from toy_llm.gguf_load import GGUFLoadError, load_config
from toy_llm.gguf_meta import GGUFMeta, GGUFReaderMeta, TensorInfo, decode_strings
from toy_llm.testing.synthetic import write_model
from toy_llm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
          "gemma3": REPO / "models" / "gemma-3-270m-q4_k_m.gguf"}
FAMILIES = ("llama", "llama_untied", "llama3_rope", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral", "qwen3moe",
            "olmoe", "granite")
TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "str", 9: "arr",
              10: "u64", 11: "i64", 12: "f64"}
DTYPES = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


# ------------------------------------------------------------------------------------ the reference

@functools.lru_cache(maxsize=None)
def reference(path: Path) -> tuple[dict, dict]:
    """{key: (type name, value)} and {tensor: TensorInfo} as gguf.GGUFReader reads them."""
    r = gguf.GGUFReader(str(path))
    kv = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):     # the reader's pseudo-keys for the header
            continue
        types = [int(t) for t in f.types]
        if types[0] == 9:
            tname = f"arr[{TYPE_NAMES[types[-1]]}]"
            if types[-1] == 8:
                value = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            else:
                value = np.array(f.contents(), dtype=DTYPES[types[-1]])
        else:
            tname, value = TYPE_NAMES[types[0]], f.contents()
        kv[name] = (tname, value)
    tensors = {}
    for t in r.tensors:
        shape = [int(x) for x in t.shape]
        while len(shape) > 1 and shape[-1] == 1:      # ggml_n_dims: trailing 1s are not dimensions
            shape.pop()
        tensors[t.name] = TensorInfo(int(t.tensor_type), tuple(shape), int(t.n_bytes), int(t.data_offset))
    return kv, tensors


def assert_same_as_reference(path: Path) -> None:
    kv, tensors = reference(path)
    with GGUFMeta(path) as m:
        assert list(m.keys()) == list(kv), "keys (and their order)"
        for key, (tname, want) in kv.items():
            assert m.type_of(key) == tname, key
            got = m.get(key)
            if isinstance(want, np.ndarray):
                assert isinstance(got, np.ndarray) and got.dtype == want.dtype, key
                np.testing.assert_array_equal(got, want, err_msg=key)
            else:
                assert type(got) is type(want) and got == want, (key, got, want)
        assert m.tensors == tensors
        assert list(m.tensors) == list(tensors), "tensor order"
        assert m.version == 3


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    for fam in FAMILIES:
        write_model(d / f"{fam}.gguf", fam)
    return d


@pytest.mark.parametrize("family", FAMILIES)
def test_synthetic_keys_and_tensors_match_gguf_reader(synth_dir, family):
    assert_same_as_reference(synth_dir / f"{family}.gguf")


def _write_all_types(path: Path) -> dict:
    """A file with every GGUF value type, scalar and array, at their extremes."""
    w = gguf.GGUFWriter(str(path), "llama")
    V = gguf.GGUFValueType
    vals = {
        "t.u8": (255, V.UINT8), "t.i8": (-128, V.INT8), "t.u16": (65535, V.UINT16), "t.i16": (-32768, V.INT16),
        "t.u32": (2**32 - 1, V.UINT32), "t.i32": (-2**31, V.INT32), "t.u64": (2**64 - 1, V.UINT64),
        "t.i64": (-2**63, V.INT64), "t.f32": (0.1, V.FLOAT32), "t.f64": (0.1, V.FLOAT64), "t.bool": (True, V.BOOL),
        "t.str": ("h\u00e9llo \U0001f999", V.STRING), "t.empty_str": ("", V.STRING),
    }
    for k, (v, t) in vals.items():
        w.add_key_value(k, v, t)
    for t in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64, V.FLOAT32, V.FLOAT64,
              V.BOOL):
        arr = [1, 0, 1] if t == V.BOOL else ([0.5, -1.25, 3e30] if t in (V.FLOAT32, V.FLOAT64) else [0, 1, 7])
        w.add_key_value(f"a.{t.name.lower()}", arr, V.ARRAY, sub_type=t)
    w.add_key_value("a.str", ["", "x", "\u00e9\u00e9", "<0x0A>"], V.ARRAY, sub_type=V.STRING)
    w.add_tensor("x", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("col", np.zeros((5, 1), np.float32))    # ne [1, 5]
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return vals


def test_every_value_type_matches_gguf_reader(tmp_path):
    path = tmp_path / "types.gguf"
    vals = _write_all_types(path)
    assert_same_as_reference(path)
    with GGUFMeta(path) as m:
        assert m.get("t.u64") == 2**64 - 1 and m.get("t.i64") == -2**63    # no loss at either end
        assert m.get_int("t.u8") == 255 and m.get_float("t.f32") == float(np.float32(0.1))
        assert m.get_float("t.f64") == 0.1 and m.get_float("t.i16") == -32768.0
        assert m.get_bool("t.bool") is True and m.get_str("t.str") == vals["t.str"][0]
        assert m.get_str_list("a.str") == ["", "x", "\u00e9\u00e9", "<0x0A>"]
        assert m.get_array("a.bool").dtype == np.bool_
        assert m.get("no.such.key", 42) == 42 and "no.such.key" not in m and "t.u8" in m
        assert m.tensors["col"].shape == (1, 5) and m.tensors["x"].shape == (4, 3)
        # the same interface over a GGUFReader gives the same values
        rm = GGUFReaderMeta(gguf.GGUFReader(str(path)))
        for key in m.keys():
            a, b = m.get(key), rm.get(key)
            assert m.type_of(key) == rm.type_of(key), key
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)
            else:
                assert a == b, key
        assert rm.tensors == m.tensors


def test_empty_arrays(tmp_path):
    """GGUFWriter refuses empty arrays: write one-element ones (no tensors, so nothing to realign) and cut
    the element out."""
    V = gguf.GGUFValueType
    path = tmp_path / "empty.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_key_value("a.empty_i32", [7], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("a.empty_str", ["x"], V.ARRAY, sub_type=V.STRING)
    w.add_uint32("after", 5)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
    data = bytearray(path.read_bytes())
    for key, n_elem_bytes in ((b"a.empty_i32", 4), (b"a.empty_str", 9)):
        at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 8     # the u64 count
        data[at:at + 8 + n_elem_bytes] = struct.pack("<Q", 0)
    path.write_bytes(bytes(data))
    r = gguf.GGUFReader(str(path))   # (it keeps no element type for an empty array)
    assert [k for k in r.fields if not k.startswith("GGUF.")] == ["general.architecture", "a.empty_i32",
                                                                   "a.empty_str", "after"]
    assert r.fields["a.empty_i32"].contents() == [] and r.fields["after"].contents() == 5
    with GGUFMeta(path) as m:
        assert m.keys() == ["general.architecture", "a.empty_i32", "a.empty_str", "after"]
        assert m.type_of("a.empty_i32") == "arr[i32]" and m.type_of("a.empty_str") == "arr[str]"
        a = m.get_array("a.empty_i32")
        assert a.shape == (0,) and a.dtype == np.int32
        assert m.get_str_list("a.empty_str") == [] and m.get_int("after") == 5 and m.tensors == {}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=6) | st.sampled_from([b"\xe2\x82", b"\xe2\x82\xac", b"\x80", b"\xf0\x9f",
                                                        b"a\x00b", b"\x00", b"\xc3", b"\xa9\xc3"]), max_size=12))
def test_decode_strings_equals_decoding_each(strings):
    """The one-pass decode of a string array (joined with NUL, decoded, split) gives what decoding
    each string alone gives, also for unfinished or stray UTF-8 sequences at the string boundaries and
    strings holding NUL bytes."""
    raw = np.frombuffer(b"".join(strings), np.uint8)
    offs = np.cumsum([0] + [len(b) for b in strings]).astype(np.int64)
    assert decode_strings(raw, offs) == [b.decode("utf-8", "surrogateescape") for b in strings]


@pytest.fixture(scope="module", params=sorted(MODELS))
def real_model(request):
    path = MODELS[request.param]
    if not path.exists():
        pytest.skip(f"{path} not fetched (make models)")
    return request.param, path


def test_real_model_keys_and_tensors_match_gguf_reader(real_model):
    assert_same_as_reference(real_model[1])


# ------------------------------------------------------------------------------------- load_config

# what load_config gave for the real models before it read through gguf_meta (the GGUFReader version)
REAL_CONFIGS = {
    "smollm2": dict(arch="llama", d_model=576, d_ff=1536, n_heads=9, n_kv=3, head_dim=64, n_layers=30, vocab=49152,
                    context_length=8192, rope_base=100000.0, rope_dim=64, rope_mode=0, rms_eps=9.999999747378752e-06,
                    weight_type=3, untied_output=False, qk_norm_kind=0, post_norms=False, swa_window=0,
                    swa_pattern=(), embed_scale=1.0, attn_scale=0.0, rope_base_swa=0.0, ffn_act="silu"),
    "gemma3": dict(arch="gemma3", d_model=640, d_ff=2048, n_heads=4, n_kv=1, head_dim=256, n_layers=18, vocab=262144,
                   context_length=32768, rope_base=1000000.0, rope_dim=256, rope_mode=2,
                   rms_eps=9.999999974752427e-07, weight_type=6, untied_output=False, qk_norm_kind=1, post_norms=True,
                   swa_window=512, swa_pattern=(True,) * 5 + (False,) + (True,) * 5 + (False,) + (True,) * 5 + (False,),
                   embed_scale=25.298221588134766, attn_scale=0.0625, rope_base_swa=10000.0, ffn_act="gelu"),
}


def test_load_config_real_models_unchanged(real_model):
    name, path = real_model
    cfg = load_config(path)
    for field, want in REAL_CONFIGS[name].items():
        assert getattr(cfg, field) == want, field
    assert cfg.rope_scaling.kind == "none" and cfg.rope_scaling.orig_max_pos == cfg.context_length
    assert cfg.path == str(path.resolve())
    _, tensors = reference(path)
    assert cfg.tensor_types == {n: t.type for n, t in tensors.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_load_config_same_through_gguf_reader(synth_dir, family):
    path = synth_dir / f"{family}.gguf"
    new, old = load_config(path), load_config(gguf.GGUFReader(str(path)))
    assert new == old and new.tensor_types == old.tensor_types
    with GGUFMeta(path) as m:      # an open GGUFMeta is used, not closed
        assert load_config(m) == new and m.get_str("general.architecture") == new.arch


def _rewrite(src: Path, dst: Path, edit: dict) -> Path:
    """Copy src to dst; ``edit`` maps key -> (value, GGUFValueType) replacing (or adding) a key."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), str(r.fields["general.architecture"].contents()))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name in edit:
            continue
        w.add_key_value(f.name, f.contents(), f.types[0],
                        sub_type=f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for key, (value, vtype) in edit.items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return dst


@pytest.mark.parametrize("key, value, vtype, found", [
    ("llama.block_count", "2", gguf.GGUFValueType.STRING, "str"),
    ("llama.embedding_length", 64.0, gguf.GGUFValueType.FLOAT32, "f32"),
    ("llama.attention.head_count", True, gguf.GGUFValueType.BOOL, "bool"),
    ("llama.rope.freq_base", "10000", gguf.GGUFValueType.STRING, "str"),
    ("llama.context_length", "long", gguf.GGUFValueType.STRING, "str"),
])
def test_wrong_typed_key_names_the_key(synth_dir, tmp_path, key, value, vtype, found):
    bad = _rewrite(synth_dir / "llama.gguf", tmp_path / "bad.gguf", {key: (value, vtype)})
    with pytest.raises(GGUFLoadError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "bad.gguf" in msg and f"'{key}'" in msg and f"type {found}" in msg and "expected" in msg, msg


def test_wrong_typed_arch_and_tokenizer_keys(synth_dir, tmp_path):
    V = gguf.GGUFValueType
    bad = _rewrite(synth_dir / "llama.gguf", tmp_path / "arch.gguf", {"general.architecture": (7, V.UINT32)})
    # (GGUFWriter writes its own general.architecture first; the edit adds a second, which ggml refuses)
    with pytest.raises(GGUFLoadError, match="arch.gguf"):
        load_config(bad)
    bad = _rewrite(synth_dir / "llama.gguf", tmp_path / "bos.gguf", {"tokenizer.ggml.bos_token_id": ("1", V.STRING)})
    with pytest.raises(GGUFLoadError, match=r"bos\.gguf.*'tokenizer\.ggml\.bos_token_id' has type str"):
        Tokenizer.from_gguf(bad)
    bad = _rewrite(synth_dir / "llama.gguf", tmp_path / "tok.gguf", {"tokenizer.ggml.model": (3, V.UINT32)})
    with pytest.raises(GGUFLoadError, match=r"'tokenizer\.ggml\.model' has type u32, expected str"):
        Tokenizer.from_gguf(bad)
    with GGUFMeta(synth_dir / "llama.gguf") as m:
        with pytest.raises(GGUFLoadError, match=r"'tokenizer\.ggml\.tokens' has type arr\[str\], expected an integer"):
            m.get_int("tokenizer.ggml.tokens")
        with pytest.raises(GGUFLoadError, match=r"missing key 'no\.such'"):
            m.get_int("no.such")
        with pytest.raises(GGUFLoadError, match=r"expected a numeric array"):
            m.get_array("tokenizer.ggml.merges")
        with pytest.raises(KeyError):
            m["no.such"]


# ------------------------------------------------------------------------------ tokenizer via meta

def test_tokenizer_from_meta_equals_from_path_and_reader(real_model):
    _, path = real_model
    by_path = Tokenizer.from_gguf(path)
    with GGUFMeta(path) as m:
        by_meta = Tokenizer.from_gguf(m)
    kv, _ = reference(path)
    assert by_path._texts == by_meta._texts == [t if t else f"[EMPTY_{i}]"
                                                for i, t in enumerate(kv["tokenizer.ggml.tokens"][1])]
    assert by_path._attrs == by_meta._attrs and by_path._scores == by_meta._scores
    assert by_path._special_cache == by_meta._special_cache and by_path.eog_ids == by_meta.eog_ids
    for text in ("Hello world", "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user ünïcödé 123 🦙"):
        assert by_path.encode(text, parse_special=True) == by_meta.encode(text, parse_special=True)


# ---------------------------------------------------------------------- refused quickly, never hang

def _quick(fn, limit: float = 1.0):
    """fn() must raise GGUFLoadError (or TinyNNError) within ``limit`` seconds; returns the message. A daemon
    thread, so a call that blocks (e.g. open() on a FIFO) fails the test instead of hanging it."""
    box: dict = {}

    def run():
        t = time.perf_counter()
        try:
            fn()
            box["err"] = None
        except (GGUFLoadError, tnn.TinyNNError) as e:
            box["err"] = e
        except BaseException as e:  # noqa: BLE001  (reported below)
            box["other"] = e
        box["s"] = time.perf_counter() - t

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(limit + 10)
    assert not th.is_alive(), "the call blocked"
    assert "other" not in box, f"raised {box.get('other')!r}, not GGUFLoadError"
    assert box["err"] is not None, "no error raised"
    assert box["s"] < limit, f"took {box['s']:.2f} s"
    return str(box["err"])


def test_fifo_and_directory_refused_quickly(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    d = tmp_path / "dir.gguf"
    d.mkdir()
    for p, kind in ((fifo, "FIFO"), (d, "directory")):
        for fn in (lambda: GGUFMeta(p), lambda: load_config(p), lambda: Tokenizer.from_gguf(p)):
            msg = _quick(fn)
            assert str(p) in msg and "not a regular file" in msg and kind in msg, msg
        # the shim itself refuses them too (it opens with O_NONBLOCK and checks before parsing)
        msg = _quick(lambda: tnn.tnn_gguf_load(str(p)))
        assert "not a regular file" in msg and kind in msg, msg
    assert "no such file" in _quick(lambda: GGUFMeta(tmp_path / "nope.gguf"))


def _patched(src: Path, dst: Path, key: str, after_key: int, fmt: str, value) -> Path:
    """dst = src with ``struct.pack(fmt, value)`` written ``after_key`` bytes after key's name."""
    data = bytearray(src.read_bytes())
    name = key.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + after_key
    data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    dst.write_bytes(bytes(data))
    return dst


# (key, bytes after the key name, format, value): for an array the layout after the name is
# u32 type (9) | u32 element type | u64 count | elements
MALFORMED = {
    "string_array_2^40": ("tokenizer.ggml.tokens", 8, "<Q", 2**40),
    "string_array_2^63-1": ("tokenizer.ggml.tokens", 8, "<Q", 2**63 - 1),
    "int_array_2^63-1": ("tokenizer.ggml.token_type", 8, "<Q", 2**63 - 1),
    "int_array_2^64-1": ("tokenizer.ggml.token_type", 8, "<Q", 2**64 - 1),
    "int_array_2^31": ("tokenizer.ggml.token_type", 8, "<Q", 2**31),
    "scalar_became_array": ("llama.block_count", 0, "<I", 9),
    "nested_array": ("tokenizer.ggml.token_type", 4, "<I", 9),
    "unknown_type": ("llama.block_count", 0, "<I", 77),
    "string_len_2^62": ("general.name", 4, "<Q", 2**62),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_lengths_fail_fast(synth_dir, tmp_path, case):
    key, after, fmt, value = MALFORMED[case]
    bad = _patched(synth_dir / "llama.gguf", tmp_path / f"{case}.gguf", key, after, fmt, value)
    for fn in (lambda: GGUFMeta(bad), lambda: load_config(bad), lambda: Tokenizer.from_gguf(bad)):
        msg = _quick(fn)
        assert str(bad) in msg and "not a valid GGUF" in msg, msg


def test_malformed_header_counts_fail_fast(synth_dir, tmp_path):
    src = (synth_dir / "llama.gguf").read_bytes()
    for name, at, value in (("n_tensors", 8, 2**62), ("n_kv", 16, 2**62), ("n_kv_max", 16, 2**63 - 1)):
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(src[:at] + struct.pack("<Q", value) + src[at + 8:])
        msg = _quick(lambda: GGUFMeta(bad))
        assert "not a valid GGUF" in msg, msg


# ------------------------------------------------------------------------------ the C getters

CHILD = r'''
import json, sys
import numpy as np
from toy_llm.tinynn import *
from toy_llm import tinynn as T

def expect(fn, *args, want=()):
    try:
        r = fn(*args)
    except TinyNNError as e:
        msg = str(e)
        assert fn.__name__ in msg, (fn.__name__, msg)
        for w in want:
            assert w in msg, (fn.__name__, msg, w)
        return
    raise SystemExit(f"{fn.__name__}{args!r} returned {r!r} instead of raising")

g = tnn_gguf_load(sys.argv[1])
n = tnn_gguf_n_kv(g)
k = {tnn_gguf_key(g, i): i for i in range(n)}
i64, u64, f64 = T.ffi.new("int64_t *"), T.ffi.new("uint64_t *"), T.ffi.new("double *")
assert tnn_gguf_find_key(g, "no.such") == -1 and tnn_gguf_find_key(g, "t.u8") == k["t.u8"]
expect(tnn_gguf_find_key, None, "x", want=["NULL"])
expect(tnn_gguf_find_key, g, None, want=["NULL"])
for bad in (-1, n, 2**40):
    expect(tnn_gguf_key, g, bad, want=["out of range"])
    expect(tnn_gguf_kv_type, g, bad, want=["out of range"])
    expect(tnn_gguf_val_i64, g, bad, i64, want=["out of range"])
expect(tnn_gguf_val_i64, g, k["t.str"], i64, want=["'t.str'", "str", "integer"])
expect(tnn_gguf_val_i64, g, k["t.u64"], i64, want=["does not fit int64"])
tnn_gguf_val_u64(g, k["t.u64"], u64); assert u64[0] == 2**64 - 1
expect(tnn_gguf_val_u64, g, k["t.i8"], u64, want=["negative"])
expect(tnn_gguf_val_i64, g, k["t.u8"], None, want=["NULL"])
expect(tnn_gguf_val_f64, g, k["t.u8"], f64, want=["u8", "float"])
expect(tnn_gguf_val_bool, g, k["t.u8"], want=["u8", "bool"])
expect(tnn_gguf_val_str, g, k["a.str"], want=["array", "str"])
expect(tnn_gguf_arr_n, g, k["t.u8"], want=["u8", "array"])
expect(tnn_gguf_arr_type, g, k["t.str"], want=["str", "array"])
buf = np.zeros(16, np.uint8)
expect(tnn_gguf_arr_copy, g, k["a.int32"], T.ffi.from_buffer(buf), 11, want=["12 bytes", "11"])
expect(tnn_gguf_arr_copy, g, k["a.int32"], T.ffi.NULL, 12, want=["NULL"])
expect(tnn_gguf_arr_copy, g, k["a.str"], T.ffi.from_buffer(buf), 16, want=["array of str"])
expect(tnn_gguf_arr_copy, g, k["t.u8"], T.ffi.from_buffer(buf), 1, want=["u8", "array"])
assert tnn_gguf_arr_copy(g, k["a.int32"], T.ffi.from_buffer(buf), 12) == 12
assert buf[:12].view(np.int32).tolist() == [0, 1, 7]
expect(tnn_gguf_arr_str, g, k["a.str"], 4, want=["element 4", "out of range"])
expect(tnn_gguf_arr_str, g, k["a.str"], -1, want=["out of range"])
expect(tnn_gguf_arr_str, g, k["a.int32"], 0, want=["array of i32"])
assert tnn_gguf_arr_str(g, k["a.str"], 3) == "<0x0A>"
nb = tnn_gguf_arr_str_nbytes(g, k["a.str"]); assert nb == 1 + 4 + 6, nb
offs = np.zeros(5, np.int64); sbuf = np.zeros(nb, np.uint8)
expect(tnn_gguf_arr_str_copy, g, k["a.str"], T.ffi.from_buffer(sbuf), nb, T.ffi.from_buffer("int64_t[]", offs), 4,
       want=["5 entries"])
expect(tnn_gguf_arr_str_copy, g, k["a.str"], T.ffi.from_buffer(sbuf), nb - 1, T.ffi.from_buffer("int64_t[]", offs), 5,
       want=["too small"])
expect(tnn_gguf_arr_str_copy, g, k["a.str"], T.ffi.from_buffer(sbuf), nb, T.ffi.NULL, 5, want=["NULL"])
expect(tnn_gguf_arr_str_nbytes, g, k["a.uint8"], want=["array of u8"])
expect(tnn_gguf_tensor_ndim, g, 99, want=["out of range"])
expect(tnn_gguf_tensor_ne, g, 0, 4, want=["dim 4"])
expect(tnn_gguf_tensor_ne, g, 0, -1, want=["dim -1"])
assert tnn_gguf_tensor_ndim(g, 0) == 2 and [tnn_gguf_tensor_ne(g, 0, d) for d in range(4)] == [4, 3, 1, 1]
for fn in (tnn_gguf_n_kv, tnn_gguf_version):
    expect(fn, None, want=["NULL"])
tnn_gguf_free(g)
print("OK")
'''


def test_c_getters_validate_everything(tmp_path):
    """Wrong index, type, buffer size or NULL: a TinyNNError naming the function (never a ggml abort). In a
    child process, so an abort fails the test instead of killing pytest."""
    path = tmp_path / "types.gguf"
    _write_all_types(path)
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120,
                       cwd=str(REPO), env=dict(os.environ, GGML_NO_BACKTRACE="1"))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])


def test_closed_meta_raises(synth_dir):
    m = GGUFMeta(synth_dir / "llama.gguf")
    m.close()
    m.close()    # idempotent
    with pytest.raises(GGUFLoadError, match="closed"):
        m.get_str("general.architecture")


def test_info_cli(synth_dir, capsys):
    from toy_llm.cli import main

    assert main(["info", str(synth_dir / "gemma3.gguf")]) == 0
    out = capsys.readouterr().out
    assert "arch         gemma3   name: toy-synthetic-gemma3" in out and "tensor types F32:" in out
