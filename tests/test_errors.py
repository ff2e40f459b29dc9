"""Every libtinynn error path raises TinyNNError with a useful message, and never crashes the process.

ggml aborts (or segfaults) on inputs it does not accept, so each case runs in a child
Python: a crash fails the test instead of killing pytest. The child calls ``expect``
for each call that must fail; ``expect`` prints the TinyNNError message, and the parent
checks the child exited 0 and that every message is non-empty and names the function
(and, where given, the offending argument or reason).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

PRELUDE = textwrap.dedent('''
    import json
    import sys
    import numpy as np
    from toy_llm import tinynn as T
    from toy_llm.tinynn import *

    def expect(fn, *args, want=()):
        """fn(*args) must raise TinyNNError whose message names fn and contains every string in want."""
        try:
            r = fn(*args)
        except TinyNNError as e:
            msg = str(e)
            print("TNNERR " + json.dumps([getattr(fn, "__name__", str(fn)), msg, list(want)]))
            return msg
        raise SystemExit(f"{getattr(fn, '__name__', fn)}{args!r} returned {r!r} instead of raising TinyNNError")

    s = tnn_session_new(0)
''')


def run_child(code: str, timeout: float = 120.0, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort must not spend seconds in gdb
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO), input=stdin)


def check_child(code: str) -> list[str]:
    """Run code in a child; assert it exited 0 and every expected error had a good message. Returns messages."""
    r = run_child(code)
    assert r.returncode == 0, (f"child exited with {r.returncode} (negative = killed by that signal: a crash)\n"
                               f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
    msgs = []
    for line in r.stdout.splitlines():
        if not line.startswith("TNNERR "):
            continue
        fn, msg, want = json.loads(line[len("TNNERR "):])
        assert msg.strip(), f"{fn}: empty error message"
        if fn.startswith("tnn_"):
            assert fn in msg, f"{fn}: message does not name the function: {msg!r}"
        for w in want:
            assert w.lower() in msg.lower(), f"{fn}: message {msg!r} does not mention {w!r}"
        msgs.append(msg)
    assert msgs, f"the child reported no errors\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return msgs


# ------------------------------------------------------------------------------------------ cases
# Each: code run after the prelude (a fresh CPU session `s` exists). Keep every case independent.

CASES: dict[str, str] = {}

CASES["null_session"] = '''
expect(tnn_reset_for_rebuild, None, want=["NULL"])
expect(tnn_finalize_weights, None, want=["NULL"])
expect(tnn_input_1d_i32, None, 4, want=["NULL"])
expect(tnn_input_2d_persistent_typed, None, 2, 32, GGML_TYPE_F32, want=["NULL"])
expect(tnn_compute, None, want=["NULL"])
expect(tnn_session_free, None, want=["NULL"])
'''

CASES["freed_session"] = '''
dead = tnn_session_new(0)
tnn_finalize_weights(dead); tnn_reset_for_rebuild(dead)
x = tnn_input_1d_f32(dead, 8)
tnn_session_free(dead)
expect(tnn_reset_for_rebuild, dead, want=["not a live session"])
expect(tnn_silu, dead, x, want=["not a live session"])
expect(tnn_compute, dead, want=["not a live session"])
expect(tnn_session_free, dead, want=["not a live session"])   # double free
'''

CASES["null_tensor"] = '''
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
x = tnn_input_2d_f32(s, 2, 32)
expect(tnn_matmul, s, None, x, want=["'w'", "NULL"])
expect(tnn_matmul, s, x, None, want=["'x'", "NULL"])
expect(tnn_add, s, x, None, want=["'b'", "NULL"])
expect(tnn_realize, s, None, want=["NULL"])
expect(tnn_get_rows, s, None, tnn_input_1d_i32(s, 1), want=["'table'"])
expect(tnn_tensor_ne, None, 0, want=["NULL"])
expect(tnn_tensor_set_f32, s, None, T.ffi.NULL, 0, want=["NULL"])
'''

CASES["tensor_from_other_session"] = '''
other = tnn_session_new(0)
w_other = tnn_input_2d_f32_persistent(other, 4, 32)
tnn_finalize_weights(other); tnn_reset_for_rebuild(other)
x_other = tnn_input_2d_f32(other, 2, 32)
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
x = tnn_input_2d_f32(s, 2, 32)
expect(tnn_matmul, s, w_other, x, want=["'w'", "does not belong"])
expect(tnn_add, s, x, x_other, want=["'b'", "does not belong"])
expect(tnn_realize, s, x_other, want=["does not belong"])
expect(tnn_tensor_set_f32, s, w_other, T.ffi.new("float[128]"), 128, want=["does not belong"])
'''

CASES["stale_tensor_after_rebuild"] = '''
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
x = tnn_input_2d_f32(s, 2, 32)
y = tnn_silu(s, x)
tnn_realize(s, y)
tnn_reset_for_rebuild(s)
expect(tnn_silu, s, y, want=["stale"])
expect(tnn_add, s, x, x, want=["'a'", "stale"])
expect(tnn_realize, s, y, want=["stale"])
'''

CASES["matmul_inner_dims"] = '''
w = tnn_input_2d_f32_persistent(s, 4, 64)
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
expect(tnn_matmul, s, w, tnn_input_2d_f32(s, 3, 32), want=["w.ne0 must equal x.ne0"])
expect(tnn_matmul, s, w, tnn_input_4d(s, GGML_TYPE_I32, 64, 3, 1, 1), want=["'x'"])   # x must be F32
'''

CASES["add_not_broadcastable"] = '''
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
a = tnn_input_2d_f32(s, 3, 6)
expect(tnn_add, s, a, tnn_input_2d_f32(s, 3, 4), want=["broadcast"])
expect(tnn_mul, s, a, tnn_input_2d_f32(s, 2, 6), want=["broadcast"])
expect(tnn_add, s, tnn_input_2d_f32(s, 1, 6), a, want=["broadcast"])     # a smaller than b
'''

CASES["reshape_element_count"] = '''
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
a = tnn_input_2d_f32(s, 4, 8)
expect(tnn_reshape_2d, s, a, 5, 6, want=["cannot reshape", "32 elements"])
expect(tnn_reshape_3d, s, a, 2, 2, 9, want=["cannot reshape"])
expect(tnn_reshape_2d, s, a, 0, 32, want=["positive"])
expect(tnn_reshape_3d, s, a, 2**62 + 8, 4, 1, want=["cannot reshape"])   # 2^64 + 32 wraps to 32
'''

CASES["view_past_end"] = '''
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
a = tnn_input_2d_f32(s, 4, 8)     # 128 bytes
expect(tnn_view_1d, s, a, 33, 0, want=["past the end"])
expect(tnn_view_1d, s, a, 4, 120, want=["past the end"])
expect(tnn_view_2d, s, a, 8, 5, 32, 0, want=["past the end"])
expect(tnn_view_2d, s, a, 8, 2, 32, 72, want=["past the end"])
expect(tnn_view_1d, s, a, 4, -4, want=["offset"])
expect(tnn_view_1d, s, a, 4, 2**63 - 8, want=["past the end"])            # offset + bytes overflows int64
expect(tnn_view_2d, s, a, 4, 2**33 + 1, 2**31, 0, want=["past the end"])  # (ne1-1)*nb1 wraps to 0
expect(tnn_view_3d, s, a, 4, 2, 2**33 + 1, 16, 2**31, 0, want=["past the end"])
# overlapping rows whose strided extent fits but whose dense size (ggml's own check) does not
expect(tnn_view_2d, s, a, 8, 10, 4, 0, want=["past the end"])
q = tnn_input_4d(s, GGML_TYPE_Q8_0, 64, 2, 1, 1)
expect(tnn_view_1d, s, q, 16, 0, want=["whole blocks"])
'''

CASES["concat_mismatch"] = '''
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
a = tnn_input_2d_f32(s, 3, 8)
expect(tnn_concat, s, a, tnn_input_2d_f32(s, 4, 7), 0, want=["every dim but the concat dim"])
expect(tnn_concat, s, a, tnn_input_2d_f32(s, 4, 7), 1, want=["every dim but the concat dim"])
expect(tnn_concat, s, a, a, 4, want=["dim"])
expect(tnn_concat, s, a, tnn_input_4d(s, GGML_TYPE_F16, 8, 3, 1, 1), 1, want=["float type"])
'''

CASES["rope_errors"] = '''
ff = tnn_rope_freq_factors_alloc(s, 8)
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
x = tnn_input_4d(s, GGML_TYPE_F32, 64, 2, 3, 1)
pos = tnn_input_1d_i32(s, 3)
args = (10000.0, 1.0, 0.0, 1.0, 32.0, 1.0)
expect(tnn_rope_ext, s, x, pos, 64, *args, None, 1, 0, want=["mode"])
expect(tnn_rope_ext, s, x, pos, 64, *args, None, 8, 0, want=["mode"])
expect(tnn_rope_ext, s, x, tnn_input_1d_i32(s, 4), 64, *args, None, ROPE_NORMAL, 0, want=["pos"])
expect(tnn_rope_ext, s, x, pos, 63, *args, None, ROPE_NEOX, 0, want=["n_dims"])
expect(tnn_rope_ext, s, x, pos, 66, *args, None, ROPE_NEOX, 0, want=["n_dims"])
expect(tnn_rope_ext, s, x, pos, 64, 0.0, 1.0, 0.0, 1.0, 32.0, 1.0, None, ROPE_NEOX, 0, want=["freq_base"])
expect(tnn_rope_ext, s, x, pos, 64, *args, ff, ROPE_NEOX, 0, want=["freq_factors"])    # 4 < 64/2 factors
expect(tnn_rope_ext, s, x, tnn_input_1d_f32(s, 3), 64, *args, None, ROPE_NEOX, 0, want=["'pos'"])
expect(tnn_rope_freq_factors_alloc, s, 7, want=["even"])
# a permuted input: rows not contiguous (ggml-cpu asserts nb0 == sizeof(float) and aborts)
expect(tnn_rope_ext, s, tnn_permute(s, x, 1, 0, 2, 3), pos, 2, *args, None, ROPE_NORMAL, 0, want=["contiguous"])
'''

CASES["flash_attn_errors"] = '''
k = tnn_input_3d_persistent_typed(s, 32, 16, 2, GGML_TYPE_F16)
v = tnn_input_3d_persistent_typed(s, 32, 16, 2, GGML_TYPE_F16)
v8 = tnn_input_3d_persistent_typed(s, 32, 8, 2, GGML_TYPE_F16)
kq6 = tnn_input_3d_persistent_typed(s, 256, 16, 2, GGML_TYPE_Q6_K)
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
q = tnn_input_4d(s, GGML_TYPE_F32, 64, 3, 4, 1)
q32 = tnn_input_4d(s, GGML_TYPE_F32, 32, 3, 4, 1)
expect(tnn_flash_attn_ext, s, q, k, v, None, 0.125, 0.0, 0.0, want=["q.ne0 == k.ne0"])
expect(tnn_flash_attn_ext, s, q32, k, v8, None, 0.125, 0.0, 0.0, want=["same n_kv"])
expect(tnn_flash_attn_ext, s, tnn_input_4d(s, GGML_TYPE_F32, 32, 3, 3, 1), k, v, None, 0.125, 0.0, 0.0,
       want=["multiple of kv heads"])
expect(tnn_flash_attn_ext, s, q32, k, v, tnn_input_4d(s, GGML_TYPE_F32, 16, 3, 1, 1), 0.125, 0.0, 0.0,
       want=["mask"])
expect(tnn_flash_attn_ext, s, q32, k, v, None, 0.125, 0.0, -1.0, want=["logit_softcap"])
expect(tnn_flash_attn_ext, s, q32, k, v, None, 0.125, 8.0, 0.0, want=["needs a mask"])
expect(tnn_flash_attn_ext, s, tnn_input_4d(s, GGML_TYPE_F32, 256, 3, 4, 1), kq6, kq6, None, 1.0, 0.0, 0.0,
       want=["k and v must be"])
'''

CASES["top_k_errors"] = '''
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
a = tnn_input_2d_f32(s, 3, 8)
expect(tnn_top_k, s, a, 9, want=["k must be in 1..", "8"])
expect(tnn_top_k, s, a, 0, want=["k must be"])
expect(tnn_top_k, s, tnn_input_1d_i32(s, 8), 2, want=["'a'"])
'''

CASES["unknown_types"] = '''
x = np.ones((2, 32), np.float32)
for bad in (4, 5, 31, 999, -1, 43):
    expect(tnn_input_2d_persistent_typed, s, 2, 32, bad, want=[str(bad)])
    expect(tnn_input_3d_persistent_typed, s, 32, 2, 1, bad, want=[str(bad)])
    expect(tnn_row_size, bad, 32, want=[str(bad)])
    expect(tnn_type_block_size, bad, want=[str(bad)])
    expect(tnn_quantize, bad, T.ffi.from_buffer("float[]", x), T.ffi.new("char[4096]"), 2, 32, 4096, want=[str(bad)])
    expect(tnn_dequantize, bad, T.ffi.new("char[4096]"), T.ffi.new("float[64]"), 64, 4096, want=[str(bad)])
    assert tnn_type_name(bad) == "" if bad in (999, -1, 43) else tnn_type_name(bad)  # removed ids: "DEPRECATED"...
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
expect(tnn_input_4d, s, 999, 32, 1, 1, 1, want=["999"])
expect(tnn_cast, s, tnn_input_1d_f32(s, 32), -1, want=["-1"])
# valid types the quantizer has no code for (activation-only Q8_1/Q8_K used to abort in ggml_quantize_chunk)
for t in (GGML_TYPE_Q8_1, 15, GGML_TYPE_I32):
    expect(tnn_quantize, t, T.ffi.from_buffer("float[]", np.ones(256, np.float32)), T.ffi.new("char[4096]"), 1, 256,
           4096, want=["cannot quantize"])
expect(tnn_row_size, GGML_TYPE_Q4_0, 33, want=["whole number"])
'''

CASES["alloc_after_finalize"] = '''
w = tnn_input_2d_f32_persistent(s, 2, 32)
expect(tnn_input_2d_persistent_typed, s, 2, 33, GGML_TYPE_Q4_0, want=["block size"])
expect(tnn_input_2d_f32_persistent, s, 0, 32, want=["positive"])
tnn_finalize_weights(s)
expect(tnn_input_2d_f32_persistent, s, 2, 32, want=["before tnn_finalize_weights"])
expect(tnn_input_3d_persistent_typed, s, 32, 2, 2, GGML_TYPE_Q8_0, want=["before tnn_finalize_weights"])
expect(tnn_rope_freq_factors_alloc, s, 64, want=["before tnn_finalize_weights"])
expect(tnn_finalize_weights, s, want=["already finalized"])
'''

CASES["huge_shapes_overflow"] = '''
expect(tnn_input_2d_f32_persistent, s, 2**62, 4, want=["too large"])
expect(tnn_input_3d_persistent_typed, s, 2**40, 2**40, 2**10, GGML_TYPE_F32, want=["too large"])
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
expect(tnn_input_4d, s, GGML_TYPE_F32, 2**40, 2**40, 1, 1, want=["too large"])
expect(tnn_input_4d, s, GGML_TYPE_F32, 2**62, 4, 1, 1, want=["too large"])
'''

CASES["upload_wrong_size_and_before_finalize"] = '''
w = tnn_input_2d_f32_persistent(s, 2, 32)
q = tnn_input_2d_persistent_typed(s, 2, 32, GGML_TYPE_Q8_0)
expect(upload, s, w, np.ones((2, 32), np.float32), want=["no memory yet"])   # before finalize
tnn_finalize_weights(s)
expect(upload, s, w, np.ones((2, 31), np.float32), want=["248 bytes", "256 bytes"])
expect(upload, s, w, np.ones((3, 32), np.float32), want=["bytes"])
expect(upload, s, q, np.zeros(67, np.uint8), want=["67 bytes", "68 bytes"])
expect(tnn_tensor_set_i32, s, w, T.ffi.new("int32_t[64]"), 64, want=["f32", "not i32"])
expect(tnn_tensor_get_f32, s, w, T.ffi.NULL, 64, want=["NULL"])
'''

CASES["persistent_views"] = '''
k = tnn_input_3d_persistent_typed(s, 64, 8, 2, GGML_TYPE_Q8_0)     # 2 heads x 8 positions of 64
row = tnn_row_size(GGML_TYPE_Q8_0, 64)
h1 = tnn_view_2d_persistent(s, k, 64, 8, row, 8 * row)                # head 1: fine
other = tnn_session_new(0)
expect(tnn_view_2d_persistent, s, tnn_input_2d_f32_persistent(other, 2, 32), 32, 2, 128, 0, want=["persistent"])
expect(tnn_view_2d_persistent, s, None, 64, 8, row, 0, want=["persistent"])
expect(tnn_view_2d_persistent, s, k, 64, 9, row, 8 * row, want=["past the end"])
expect(tnn_view_2d_persistent, s, k, 64, 8, row, 3, want=["multiples", "block"])
expect(tnn_view_2d_persistent, s, k, 48, 8, row, 0, want=["whole blocks"])
expect(tnn_view_2d_persistent, s, k, 64, 8, -row, 0, want=["positive"])
tnn_reset_for_rebuild(s)
x = tnn_input_2d_f32(s, 2, 64)
expect(tnn_view_2d_persistent, s, x, 64, 1, 256, 0, want=["persistent"])       # a compute tensor
tnn_finalize_weights(s)
expect(tnn_view_2d_persistent, s, k, 64, 8, row, 0, want=["before tnn_finalize_weights"])
# the view is the parent's memory: bytes written through the parent read back through the view
data = np.arange(2 * 8 * row, dtype=np.uint8).reshape(16, row)
T.upload(s, k, data)
assert (T.download(s, h1, raw=True).view(np.uint8).reshape(8, row) == data[8:]).all()
tnn_session_free(other)
'''

CASES["persistent_views_of_weights"] = '''
buf = np.zeros(64 * 1024 + 64, np.uint8)
mem = buf[(-buf.ctypes.data) % 64:][:64 * 1024]                    # a 64-byte-aligned "mapping"
base = T.ffi.cast("void *", mem.ctypes.data)
repacking = tnn_session_set_weight_repack(s, 1) == 1
tnn_session_attach_weight_mmap(s, base, mem.nbytes)
row = tnn_row_size(GGML_TYPE_Q4_0, 256)                              # 144 bytes
mem[:64 * row] = quantize(GGML_TYPE_Q4_0, np.ones((64, 256), np.float32))
w = tnn_input_2d_weight_mmap(s, 64, 256, GGML_TYPE_Q4_0, 0)         # repacked where ggml does that
mem[16384:16384 + 256] = np.arange(64, dtype=np.float32).view(np.uint8)
bias = tnn_input_1d_persistent_mmap(s, 64, GGML_TYPE_F32, 16384)
b1 = tnn_view_2d_persistent(s, bias, 16, 1, 64, 64)                 # head 1's piece of the bias: fine
other = tnn_session_new(0)
tnn_session_attach_weight_mmap(other, base, mem.nbytes)
expect(tnn_view_2d_persistent, s, tnn_input_1d_persistent_mmap(other, 64, GGML_TYPE_F32, 16384), 16, 1, 64, 0,
       want=["persistent", "this session"])
expect(tnn_view_2d_persistent, s, tnn_input_2d_f32_persistent(other, 16, 32), 32, 8, 128, 0, want=["this session"])
expect(tnn_view_2d_persistent, s, bias, 16, 1, 64, 200, want=["past the end"])
expect(tnn_view_2d_persistent, s, bias, 16, 1, 64, 2, want=["multiples"])
if repacking and tnn_tensor_is_repacked(s, w) == 1:
    expect(tnn_view_2d_persistent, s, w, 256, 4, row, 0, want=["Q4_0", "repacked", "multiple of 16 rows"])
    expect(tnn_view_2d_persistent, s, w, 256, 16, row, 4 * row, want=["Q4_0", "start at a multiple of 16 rows"])
    expect(tnn_view_2d_persistent, s, w, 128, 16, row, 0, want=["Q4_0", "every column"])
    expect(tnn_view_2d_persistent, s, w, 256, 16, 2 * row, 0, want=["Q4_0", "every column"])
    v = tnn_view_2d_persistent(s, w, 256, 16, row, 16 * row)           # rows [16, 32): fine
    assert tnn_tensor_is_repacked(s, v) == 1
else:
    v = None
    print("no CPU_REPACK for Q4_0 on this CPU: repacked-view cases not run", file=sys.stderr)
tnn_finalize_weights(s)
expect(tnn_view_2d_persistent, s, w, 256, 16, row, 0, want=["before tnn_finalize_weights"])
expect(tnn_view_2d_persistent, s, bias, 16, 1, 64, 0, want=["before tnn_finalize_weights"])
assert (T.download(s, b1).ravel() == np.arange(16, 32)).all()       # the view reads the mapping
if v is not None:
    expect(T.download, s, v, want=["cannot be read back"])
tnn_session_free(other)
'''

CASES["compute_before_realize"] = '''
expect(tnn_compute, s, want=["realize"])
tnn_finalize_weights(s)
expect(tnn_input_1d_f32, s, 4, want=["tnn_reset_for_rebuild"])     # no graph yet
tnn_reset_for_rebuild(s)
x = tnn_input_1d_f32(s, 4)
y = tnn_silu(s, x)
expect(tnn_compute, s, want=["realize"])
expect(upload, s, x, np.ones(4, np.float32), want=["no memory yet"])
tnn_realize(s, y)
expect(tnn_realize, s, y, want=["already realized"])
expect(tnn_add_to_graph, s, y, want=["already realized"])
'''

CASES["realize_before_finalize"] = '''
tnn_reset_for_rebuild(s)
y = tnn_silu(s, tnn_input_1d_f32(s, 4))
expect(tnn_realize, s, y, want=["tnn_finalize_weights"])
'''

CASES["get_rows_out_of_range_at_compute"] = '''
table = tnn_input_2d_f32_persistent(s, 5, 32)
experts = tnn_input_3d_persistent_typed(s, 32, 4, 3, GGML_TYPE_F32)
tnn_finalize_weights(s)
def rows(ids_values, via=None):
    tnn_reset_for_rebuild(s)
    ids = tnn_input_1d_i32(s, len(ids_values))
    src = ids
    if via == "view":
        src = tnn_view_1d(s, ids, len(ids_values) - 1, 4)
    elif via == "cpy":
        src = tnn_cpy(s, ids, tnn_input_1d_i32(s, len(ids_values)))
    elif via == "reshape":
        src = tnn_reshape_2d(s, ids, len(ids_values), 1)
    y = tnn_get_rows(s, table, src)
    tnn_realize(s, y)
    upload(s, ids, np.array(ids_values, np.int32))
    return tnn_compute
for vals in ([0, 5], [-1, 2], [2**31 - 1]):
    expect(rows(vals), s, want=["out of range", "[0, 5)"])
for via in ("view", "cpy", "reshape"):   # ids reaching get_rows through views/copies are checked too
    expect(rows([1, 4, 77], via), s, want=["out of range"])
rows([0, 4, 2]); tnn_compute(s)          # in range: fine
# mul_mat_id: an expert id past n_experts (ggml-cpu has only a debug assert there: memory corruption)
tnn_reset_for_rebuild(s)
b = tnn_input_4d(s, GGML_TYPE_F32, 32, 1, 2, 1)
ids = tnn_input_4d(s, GGML_TYPE_I32, 1, 2, 1, 1)
tnn_realize(s, tnn_mul_mat_id(s, experts, b, ids))
upload(s, b, np.ones(64, np.float32)); upload(s, ids, np.array([2, 3], np.int32))
expect(tnn_compute, s, want=["expert index 3", "[0, 3)"])
# ... or ids from a top_k over more router logits than there are experts
tnn_reset_for_rebuild(s)
logits = tnn_input_2d_f32(s, 2, 8)
tnn_realize(s, tnn_mul_mat_id(s, experts, tnn_input_4d(s, GGML_TYPE_F32, 32, 1, 2, 1), tnn_top_k(s, logits, 1)))
expect(tnn_compute, s, want=["top_k", "8 values"])
'''

CASES["set_rows_shapes_and_rows_out_of_range"] = '''
cache = tnn_input_3d_persistent_typed(s, 64, 8, 2, GGML_TYPE_Q8_0)   # [d, max_T, heads]
tnn_finalize_weights(s)
tnn_reset_for_rebuild(s)
src = tnn_input_4d(s, GGML_TYPE_F32, 64, 1, 2, 1)
ids = tnn_input_1d_i32(s, 1)
expect(tnn_set_rows, s, cache, src, tnn_input_1d_f32(s, 1), want=["ids"])                        # F32 ids
expect(tnn_set_rows, s, cache, tnn_input_4d(s, GGML_TYPE_F32, 32, 1, 2, 1), ids, want=["need"])  # row length
expect(tnn_set_rows, s, cache, tnn_input_4d(s, GGML_TYPE_F32, 64, 1, 3, 1), ids, want=["need"])  # heads
expect(tnn_set_rows, s, cache, tnn_input_4d(s, GGML_TYPE_F32, 64, 2, 2, 1), ids, want=["need"])  # 2 rows, 1 id
expect(tnn_set_rows, s, cache, tnn_input_4d(s, GGML_TYPE_I32, 64, 1, 2, 1), ids, want=["F32 or F16"])
expect(tnn_set_rows, s, tnn_permute(s, tnn_input_2d_f32(s, 64, 8), 1, 0, 2, 3), tnn_input_2d_f32(s, 1, 64), ids,
       want=["contiguous rows"])   # a transposed view as the destination
def write(row):
    tnn_reset_for_rebuild(s)
    src = tnn_input_4d(s, GGML_TYPE_F32, 64, 1, 2, 1)
    ids = tnn_input_1d_i32(s, 1)
    tnn_realize(s, tnn_set_rows(s, cache, src, ids))
    upload(s, src, np.ones(128, np.float32)); upload(s, ids, np.array([row], np.int32))
    return tnn_compute
for row in (8, -1, 2**31 - 1):   # past max_T: ggml would write outside the cache
    expect(write(row), s, want=["destination row", "out of range", "[0, 8)"])
write(7)(s)                       # the last row: fine
'''

CASES["layout_ops_reject_non_contiguous"] = '''
w8 = tnn_input_2d_persistent_typed(s, 2, 32, 24)       # I8
f64 = tnn_input_2d_persistent_typed(s, 2, 32, 28)      # F64
q81 = tnn_input_2d_persistent_typed(s, 2, 32, GGML_TYPE_Q8_1)
tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
x = tnn_input_4d(s, GGML_TYPE_F32, 4, 3, 2, 1)
p = tnn_permute(s, x, 1, 0, 2, 3)     # rows not contiguous
p2 = tnn_permute(s, x, 0, 2, 1, 3)    # rows contiguous, but not stacked densely
expect(tnn_add, s, p, p, want=["contiguous rows"])
expect(tnn_mul, s, p, x, want=["broadcast"])
expect(tnn_scale, s, p2, 2.0, want=["contiguous"])
expect(tnn_silu, s, p, want=["contiguous rows"])
expect(tnn_softmax, s, p, want=["contiguous"])
expect(tnn_matmul, s, tnn_transpose(s, x), p, want=["contiguous rows"])
# types without CPU kernels: used to segfault or abort at compute
xs = tnn_input_2d_f32(s, 3, 32)
for w in (w8, f64, q81):
    expect(tnn_matmul, s, w, xs, want=["'w'"])
    expect(tnn_get_rows, s, w, tnn_input_1d_i32(s, 1), want=["table"])
    expect(tnn_cpy, s, w, tnn_input_2d_f32(s, 2, 32), want=["'src'"])
    expect(tnn_cpy, s, tnn_input_2d_f32(s, 2, 32), w, want=["'dst'"])
expect(tnn_permute, s, x, 0, 0, 1, 2, want=["permutation"])
expect(tnn_cast, s, x, GGML_TYPE_Q8_0, want=["F32, F16 and BF16"])
expect(tnn_cpy, s, x, tnn_input_1d_f32(s, 5), want=["same number of elements"])
'''


def _tiny_gguf(path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_bool("test.flag", True)
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.ones((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_errors(tmp_path):
    tiny = tmp_path / "tiny.gguf"
    _tiny_gguf(tiny)
    data = tiny.read_bytes()
    (tmp_path / "trunc_data.gguf").write_bytes(data[:-200])    # header intact, tensor bytes cut short
    (tmp_path / "trunc_header.gguf").write_bytes(data[:40])    # cut inside the KV header
    (tmp_path / "not.gguf").write_text("this is not a gguf file\n" * 20)
    (tmp_path / "empty.gguf").write_bytes(b"")
    model = MODEL if MODEL.exists() else tiny
    check_child(f'''
        expect(tnn_gguf_load, {str(tmp_path / "missing.gguf")!r}, want=["cannot open"])
        expect(tnn_gguf_load, {str(tmp_path / "not.gguf")!r}, want=["not a valid GGUF"])
        expect(tnn_gguf_load, {str(tmp_path / "empty.gguf")!r}, want=["empty"])
        expect(tnn_gguf_load, {str(tmp_path / "trunc_data.gguf")!r}, want=["truncated"])
        expect(tnn_gguf_load, {str(tmp_path / "trunc_header.gguf")!r}, want=["not a valid GGUF"])
        expect(tnn_gguf_load, None, want=["NULL"])
        g = tnn_gguf_load({str(model)!r})
        n = tnn_gguf_n_tensors(g)
        expect(tnn_gguf_tensor_file_offset, g, -1, want=["index -1", "out of range"])
        expect(tnn_gguf_tensor_file_offset, g, n, want=["out of range"])
        expect(tnn_gguf_tensor_name, g, n + 5, want=["out of range"])
        expect(tnn_gguf_tensor_type, g, -7, want=["out of range"])
        expect(tnn_gguf_n_tensors, None, want=["NULL"])
        expect(tnn_gguf_free, None, want=["NULL"])
        assert tnn_gguf_find_index(g, "no.such.tensor") == -1
        base, size = tnn_gguf_mmap_base(g), tnn_gguf_mmap_size(g)
        expect(tnn_input_1d_persistent_mmap, s, 32, GGML_TYPE_F32, 0, want=["no weight mapping"])
        expect(tnn_session_attach_weight_mmap, s, None, size, want=["NULL"])
        tnn_session_attach_weight_mmap(s, base, size)
        expect(tnn_session_attach_weight_mmap, s, base, size, want=["already attached"])
        off = tnn_gguf_tensor_file_offset(g, 0)
        expect(tnn_input_1d_persistent_mmap, s, 32, GGML_TYPE_F32, size + 64, want=["outside", "mapping"])
        expect(tnn_input_1d_persistent_mmap, s, 32, GGML_TYPE_F32, size - 64, want=["outside"])  # crosses the end
        expect(tnn_input_2d_persistent_mmap, s, 2**40, 2**30, GGML_TYPE_F32, 0, want=[])       # huge
        expect(tnn_input_1d_persistent_mmap, s, 32, GGML_TYPE_F32, -64, want=["outside"])
        expect(tnn_input_1d_persistent_mmap, s, 32, GGML_TYPE_F32, 2, want=["aligned"])
        expect(tnn_input_1d_persistent_mmap, s, 32, 999, 0, want=["999"])
        t = tnn_input_1d_persistent_mmap(s, 32, GGML_TYPE_F32, off)   # a valid one: first 128 bytes of tensor 0
        tnn_finalize_weights(s)
        expect(tnn_input_1d_persistent_mmap, s, 32, GGML_TYPE_F32, off, want=["before tnn_finalize_weights"])
        tnn_session_free(s)
        tnn_gguf_free(g)
    ''')


@pytest.mark.parametrize("case", list(CASES))
def test_error_case(case):
    check_child(CASES[case])


# ------------------------------------------------------------------------------------------ fuzz

FUZZ_CHILD = r'''
prog = json.loads(sys.stdin.read())
rng = np.random.default_rng(prog["seed"])


def c_int(v):  # C `int` parameters: cffi itself rejects Python ints outside int32 (OverflowError)
    return max(-2**31, min(2**31 - 1, v))


OPS = {
    "matmul": lambda a, b, i: tnn_matmul(s, a, b),
    "add": lambda a, b, i: tnn_add(s, a, b),
    "mul": lambda a, b, i: tnn_mul(s, a, b),
    "view_1d": lambda a, b, i: tnn_view_1d(s, a, i[0], i[1]),
    "view_2d": lambda a, b, i: tnn_view_2d(s, a, i[0], i[1], i[2], i[3]),
    "view_3d": lambda a, b, i: tnn_view_3d(s, a, i[0], i[1], i[2], i[3], i[4], i[5]),
    "reshape_2d": lambda a, b, i: tnn_reshape_2d(s, a, i[0], i[1]),
    "reshape_3d": lambda a, b, i: tnn_reshape_3d(s, a, i[0], i[1], i[2]),
    "permute": lambda a, b, i: tnn_permute(s, a, *[abs(v) % 4 for v in i[:4]]),
    "transpose": lambda a, b, i: tnn_transpose(s, a),
    "cont": lambda a, b, i: tnn_cont(s, a),
    "scale": lambda a, b, i: tnn_scale(s, a, 0.5),
    "silu": lambda a, b, i: tnn_silu(s, a),
    "softmax": lambda a, b, i: tnn_softmax(s, a),
    "rms_norm": lambda a, b, i: tnn_rms_norm(s, a, b if i[0] % 2 else None, 1e-5),
    "sum_rows": lambda a, b, i: tnn_sum_rows(s, a),
    "concat": lambda a, b, i: tnn_concat(s, a, b, c_int(i[0])),
    "cpy": lambda a, b, i: tnn_cpy(s, a, b),
    "get_rows": lambda a, b, i: tnn_get_rows(s, a, b),
    "top_k": lambda a, b, i: tnn_top_k(s, a, c_int(i[0])),
    "mul_mat_id": lambda a, b, i: tnn_mul_mat_id(s, a, b, tnn_top_k(s, b, c_int(i[0]))),
    "rope": lambda a, b, i: tnn_rope_ext(s, a, b, c_int(i[0]), 10000.0, 1.0, float(i[1] % 2), 1.0, 32.0, 1.0, None,
                                         c_int(i[2]), c_int(i[3])),
    "flash_attn": lambda a, b, i: tnn_flash_attn_ext(s, a, b, b, None, 0.125, 0.0, float(i[0] % 3)),
    "softmax_ext": lambda a, b, i: tnn_softmax_ext(s, a, b, 0.5, 0.0),
}
weights = []
for rows, cols, ty in prog["weights"]:
    try:
        weights.append(tnn_input_2d_persistent_typed(s, rows, cols, ty))
    except TinyNNError as e:
        assert str(e)
tnn_finalize_weights(s)
n_ok = n_err = 0
for graph in prog["graphs"]:
    tnn_reset_for_rebuild(s)
    pool, inputs, built = list(weights), [], []
    for ne, ty in graph["inputs"]:
        try:
            t = tnn_input_4d(s, ty, *ne)
            pool.append(t); inputs.append(t)
        except TinyNNError as e:
            assert str(e); n_err += 1
    for op, ia, ib, ints in graph["ops"]:
        if not pool:
            break
        try:
            r = OPS[op](pool[ia % len(pool)], pool[ib % len(pool)], ints)
            pool.append(r); built.append(r); n_ok += 1
        except TinyNNError as e:
            assert str(e), f"{op}: empty message"; n_err += 1
    if not built:
        continue
    try:   # compute everything that was built: many ggml asserts fire only at compute time
        for r in built[:-1]:
            tnn_add_to_graph(s, r)
        tnn_realize(s, built[-1])
        for t in inputs:
            ty, nb = tnn_tensor_type(t), tnn_tensor_nbytes(t)
            if ty == GGML_TYPE_I32:
                upload(s, t, rng.integers(0, 3, nb // 4).astype(np.int32))
            elif ty == GGML_TYPE_F32:
                upload(s, t, rng.standard_normal(nb // 4).astype(np.float32))
            else:
                upload(s, t, rng.integers(0, 60, nb).astype(np.uint8))   # small positive fp16 / scales
        tnn_compute(s)
        for r in built:
            download(s, r) if tnn_tensor_is_allocated(r) == 1 and tnn_tensor_type(r) in (0, 26) else None
        n_ok += 1
    except TinyNNError as e:
        assert str(e); n_err += 1
print("TNNERR " + json.dumps(["fuzz", f"ok={n_ok} err={n_err}", []]))
'''

# mostly sizes/strides/offsets that can fit (so ops succeed and the graphs compute), some invalid, some huge
weird_ints = st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]), st.integers(-3, 70),
                       st.sampled_from([2**31, 2**32 + 1, 2**33 + 1, 2**40, 2**62, 2**62 + 8, -2**62, 2**63 - 1,
                                        -2**63]))
small_dim = st.one_of(st.sampled_from([1, 2, 4, 32, 64]), st.integers(1, 9), st.sampled_from([0, -1]))
types_ = st.sampled_from([0, 0, 0, 1, 26, 8, 12, 30, 9, 24, 28, 4, 999])
op_names = st.sampled_from(["matmul", "add", "mul", "view_1d", "view_2d", "view_3d", "reshape_2d", "reshape_3d",
                            "permute", "transpose", "cont", "scale", "silu", "softmax", "rms_norm", "sum_rows",
                            "concat", "cpy", "get_rows", "top_k", "mul_mat_id", "rope", "flash_attn",
                            "softmax_ext"])
program = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "weights": st.lists(st.tuples(small_dim, st.sampled_from([32, 64, 256, 7]), types_), max_size=3),
    "graphs": st.lists(st.fixed_dictionaries({
        "inputs": st.lists(st.tuples(st.tuples(small_dim, small_dim, st.integers(1, 3), st.integers(1, 2)),
                                     st.sampled_from([0, 0, 0, 0, 1, 26, 8])), min_size=1, max_size=4),
        "ops": st.lists(st.tuples(op_names, st.integers(0, 20), st.integers(0, 20), st.lists(weird_ints, min_size=6,
                                                                                             max_size=6)),
                        min_size=1, max_size=12),
    }), min_size=1, max_size=3),
})


@settings(max_examples=int(40 * float(os.environ.get("TNN_TEST_EXAMPLES", "1"))), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prog=program)
def test_fuzz_never_crashes(prog):
    """Random, mostly invalid, shapes and ints into matmul/add/views/reshapes/...: every call succeeds or raises
    TinyNNError, and whatever was built realizes and computes (or raises) without crashing the child."""
    r = run_child(FUZZ_CHILD, stdin=json.dumps(prog))
    assert r.returncode == 0, (f"child exited with {r.returncode} on program\n{json.dumps(prog)}\n"
                               f"--- stderr\n{r.stderr[-3000:]}")


# Under `make asan` the freed compute context sits in ASan's quarantine, the rebuilt one lands elsewhere and the
# stale handle is refused: the gap needs glibc to hand the same address back, so there it may pass.
_UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")


@pytest.mark.xfail(strict=not _UNDER_ASAN, reason="known gap: a stale compute handle whose address the rebuilt "
                   "context reuses for a new tensor is indistinguishable from it (no generation stamp); silently "
                   "aliases, no crash")
def test_stale_tensor_aliasing_a_new_one():
    check_child('''
        tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
        y = tnn_silu(s, tnn_input_2d_f32(s, 2, 32))
        tnn_reset_for_rebuild(s)
        y2 = tnn_silu(s, tnn_input_2d_f32(s, 3, 8))   # same slots in the new context
        expect(tnn_silu, s, y, want=["stale"])
    ''')
