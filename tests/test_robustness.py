"""API misuse raises a Python exception, never a crash or a hang (issue: robustness).

Shim one-liners that used to segfault run in a child process (test_errors.check_child), so a
crash fails the test instead of killing pytest. Model-level misuse runs on both graphs against a
tiny synthetic llama (and SmolLM2 where the real model matters), in process.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

import toy_llm
from toy_llm import tinynn as tnn
from toy_llm.engine import SmolLM2KVFFICache
from toy_llm.testing import synthetic

from test_errors import MODEL, check_child

GRAPHS = ("fused", "per_head")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return synthetic.write_model(tmp_path_factory.mktemp("robust") / "llama.gguf", "llama")


def load(path, graph, **kw):
    kw.setdefault("max_T", 32)
    kw.setdefault("n_threads", 1)
    return toy_llm.load(path, graph=graph, **kw)


# ------------------------------------------------------------------ shim: handles of freed sessions

DEAD_TENSOR = '''
d = tnn_session_new(0)
t = tnn_input_2d_f32_persistent(d, 2, 32)
tnn_session_free(d)
'''


@pytest.mark.parametrize("call", ["tnn_tensor_ne(t, 0)", "tnn_tensor_type(t)", "tnn_set_name(t, 'x')",
                                  "tnn_set_output(t)", "tnn_tensor_nbytes(t)", "tnn_tensor_name(t)",
                                  "tnn_tensor_is_allocated(t)", "tnn_set_param(t)"])
def test_tensor_of_a_freed_session(call):
    """Each used to read freed memory (SIGSEGV); now the handle is refused: it lies in no live session."""
    fn, args = call.split("(", 1)
    check_child(DEAD_TENSOR + f"expect({fn}, {args[:-1]}, want=['no live session'])\n")


def test_small_realize_after_a_failed_large_one():
    """A failed allocation leaves the session usable: the next, small graph realizes and computes."""
    check_child('''
        tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
        x = tnn_input_2d_f32(s, 1 << 20, 1 << 16)   # 256 GiB of F32
        expect(tnn_realize, s, tnn_silu(s, x))
        tnn_reset_for_rebuild(s)
        x = tnn_input_1d_f32(s, 8)
        y = tnn_silu(s, x)
        tnn_realize(s, y)
        upload(s, x, np.arange(8, dtype=np.float32))
        tnn_compute(s)
        got = download(s, y)
        want = np.arange(8) / (1 + np.exp(-np.arange(8.0)))
        assert np.allclose(got, want, rtol=1e-5), got
        print("TNNERR " + json.dumps(["ok", "small graph computed after the failed one", []]))
    ''')


def test_sizes_that_overflow_and_misaligned_views():
    check_child('''
        expect(tnn_row_size, GGML_TYPE_F32, 2**62, want=["overflow"])
        src = T.ffi.new("float[32]"); dst = T.ffi.new("char[64]")
        # bare pointers: past the binding's host-buffer check, so the shim's own size arithmetic is tested
        rc = T.lib.tnn_quantize(GGML_TYPE_Q8_0, T.ffi.cast("float *", src), T.ffi.cast("void *", dst), 2**62, 32,
                                2**62)
        assert rc < 0 and "overflow" in last_error(), (rc, last_error())
        print("TNNERR " + json.dumps(["tnn_quantize", last_error(), ["overflow"]]))
        w = tnn_input_2d_f32_persistent(s, 4, 32)
        expect(tnn_view_2d_persistent, s, w, 8, 2, 128, 1, want=["misaligned"])
        tnn_finalize_weights(s); tnn_reset_for_rebuild(s)
        x = tnn_input_2d_f32(s, 4, 32)
        expect(tnn_view_1d, s, x, 8, 2, want=["misaligned"])
        expect(tnn_view_2d, s, x, 8, 2, 6, 0, want=["misaligned"])
        q = tnn_input_4d(s, GGML_TYPE_Q8_0, 64, 4, 1, 1)
        expect(tnn_view_1d, s, q, 32, 17, want=["misaligned", "block"])   # inside a 34-byte block
    ''')


def test_host_buffer_smaller_than_the_count():
    """A count past the end of a cffi array is refused before the shim reads or writes past it."""
    check_child('''
        w = tnn_input_2d_f32_persistent(s, 4, 32)
        tnn_finalize_weights(s)
        small = T.ffi.new("float[4]")
        expect(tnn_tensor_set_f32, s, w, small, 128, want=["holds 16"])
        expect(tnn_tensor_get_f32, s, w, small, 128, want=["holds 16"])
        expect(tnn_upload_from_float_array, s, w, small, 128, want=["holds 16"])
        expect(tnn_dequantize, GGML_TYPE_F32, T.ffi.new("char[8]"), T.ffi.new("float[64]"), 64, 256,
               want=["holds 8"])
    ''')


# ------------------------------------------------------------------ model lifetime

@pytest.mark.parametrize("graph", GRAPHS)
def test_use_after_close(llama, graph):
    m = load(llama, graph)
    m.eval([1, 2, 3])
    embed, sess = m.cache.t_token_embed, m.cache.sess
    m.close()
    m.close()   # twice: a no-op
    for call in (lambda: m.eval([1]), lambda: m.generate("a", max_new_tokens=2), lambda: m.score(["a b"]),
                 lambda: m.run_with_cache([1, 2]), lambda: m.set_control_vector(np.zeros((1, 1)))):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    with pytest.raises(RuntimeError, match="closed|not realized"):
        m.cache.step(1, 0)
    # handles saved before close: refused by the shim (their session is gone), no crash
    with pytest.raises(tnn.TinyNNError, match="no live session"):
        tnn.tnn_tensor_ne(embed, 0)
    with pytest.raises(tnn.TinyNNError, match="not a live session|no live session"):
        tnn.download(sess, embed)
    with pytest.raises(tnn.TinyNNError, match="not a live session"):
        tnn.tnn_tensor_get_raw(sess, embed, tnn.ffi.new("char[16]"), 16)
    assert m.cache.t_token_embed is None and m.cache.sess is None


def test_eval_before_realize():
    c = SmolLM2KVFFICache()
    with pytest.raises(RuntimeError, match="not realized"):
        c.step(1, 0)
    with pytest.raises(RuntimeError, match="not realized"):
        c.build_decode_step(0)


def test_tensor_of_another_session_in_a_builder(llama):
    a, b = load(llama, "fused"), load(llama, "fused")
    try:
        e = b.cache.engine
        tnn.tnn_reset_for_rebuild(e.sess)
        with pytest.raises(tnn.TinyNNError, match="does not belong"):
            tnn.tnn_get_rows(e.sess, a.cache.t_token_embed, tnn.tnn_input_1d_i32(e.sess, 1))
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("graph", GRAPHS)
def test_bad_token_ids(llama, graph):
    m = load(llama, graph)
    vocab = m.config.vocab
    try:
        for bad, exc, what in (([vocab], ValueError, "outside the vocabulary"), ([-1], ValueError, "outside"),
                               ([2**31], ValueError, "outside"), ([2**70], ValueError, "outside"),
                               ([1.5, 2.7], TypeError, "must be ints"), ([True], TypeError, "must be ints"),
                               (np.array([1.0, 2.0]), TypeError, "float64"), (["1"], TypeError, "must be ints"),
                               ("hello", TypeError, "sequence of token ids"), (7, TypeError, "sequence"),
                               ([], ValueError, "no tokens")):
            with pytest.raises(exc, match=what):
                m.eval(bad)
            assert m.n_past == 0, f"{bad!r} advanced the context"
        with pytest.raises(ValueError, match="outside"):
            m.eval([1, 2, vocab + 5])   # checked before any token is evaluated
        assert m.n_past == 0
        with pytest.raises(TypeError, match="must be ints"):
            m.generate([1, 2.5])
        with pytest.raises(ValueError, match="outside"):
            m.cache.step(vocab, 0)
        with pytest.raises(TypeError):
            m.cache.step(1, 0.5)
        m.eval(np.array([1, 2], np.int32))   # integer arrays and numpy ints are fine
        m.eval([np.int64(3)])
        assert m.n_past == 3
    finally:
        m.close()


@pytest.mark.parametrize("graph", GRAPHS)
def test_positions_and_the_end_of_the_context(llama, graph):
    m = load(llama, graph, max_T=12)
    try:
        with pytest.raises(ValueError, match="outside the cache"):
            m.cache.step(1, 12)
        with pytest.raises(ValueError, match="outside the cache"):
            m.cache.step(1, -1)
        with pytest.raises(ValueError, match="context full"):
            m.eval(list(range(1, 14)))
        with pytest.raises(ValueError, match="more than the context"):
            m.generate(list(range(1, 14)), max_new_tokens=4)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = m.generate([1, 2, 3, 4], max_new_tokens=100)
        assert isinstance(out, str)
        if m.last_stats["stopped"] == "context":
            assert m.n_past == 12 and any("end of the context" in str(x.message) for x in w)
        else:   # the synthetic model may end at an end-of-generation token first
            assert m.last_stats["stopped"] == "eog"
    finally:
        m.close()


@pytest.mark.parametrize("kw, what", [
    ({"max_T": 0}, "max_T"), ({"max_T": -5}, "max_T"), ({"max_T": 8.5}, "max_T"), ({"max_T": "64"}, "max_T"),
    ({"n_threads": 0}, "n_threads"), ({"n_threads": -1}, "n_threads"), ({"n_threads": 1.5}, "n_threads"),
    ({"backend": "tpu"}, "backend"), ({"kv_type": "q4_0"}, "kv_type"), ({"loader": "zip"}, "loader"),
    ({"n_batch": 0}, "n_batch"), ({"graph": "dense"}, "graph"), ({"weight_type": -2}, "weight_type"),
])
def test_load_refuses_bad_arguments(llama, kw, what):
    with pytest.raises(ValueError, match=what):
        toy_llm.load(llama, **kw)


def test_load_refuses_bad_files(tmp_path):
    from toy_llm.gguf_meta import GGUFLoadError

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n" * 100)
    for path, what in ((tmp_path, "directory"), (empty, "empty"), (text, "notes.gguf"),
                       (tmp_path / "missing.gguf", "missing.gguf")):
        with pytest.raises((GGUFLoadError, FileNotFoundError), match=what):
            toy_llm.load(path)


# ------------------------------------------------------------------ threads

@pytest.mark.parametrize("graph", GRAPHS)
def test_two_threads_are_serialised(llama, graph):
    """The fused graph used to segfault and the per-head one to raise spuriously: calls from two
    threads now wait for each other (Model and Engine hold a lock), so every call completes with
    the logits it would have had alone, and close waits for a running eval."""
    ref = load(llama, graph, max_T=64)
    want = ref.eval(list(range(1, 9)))
    ref.close()

    m = load(llama, graph, max_T=64)
    errors, results = [], {}

    def worker(k):
        try:
            for _ in range(5):
                with m.lock:            # one whole sequence per thread turn, to compare with want
                    m.reset()
                    results.setdefault(k, []).append(m.eval(list(range(1, 9))))
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)

    def racer():
        try:
            for _ in range(20):
                m.cache.step(5, 40)      # the seed face from another thread, unsynchronised by the caller
        except BaseException as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)] + [threading.Thread(target=racer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for runs in results.values():
        for got in runs:
            np.testing.assert_array_equal(got, want)

    # close from another thread while this one evaluates: it waits, then later calls raise
    long = list(range(1, 60))
    closer = threading.Thread(target=m.close)
    with m.lock:
        m.reset()
        closer.start()
        out = m.eval(long)    # the session is still alive while we hold the lock
    closer.join(timeout=60)
    assert out.shape == (len(long), m.config.vocab) and np.isfinite(out).all()
    with pytest.raises(RuntimeError, match="closed"):
        m.eval([1])


def test_two_threads_on_smollm2_fused():
    """The original crash: m.eval from two threads at once on the fused graph of the real model."""
    m = toy_llm.load(MODEL, max_T=256, n_threads=1)
    errors = []

    def worker():
        try:
            for _ in range(3):
                m.eval([1, 2, 3, 4])
        except BaseException as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    m.close()
    assert not errors, errors
    assert m.n_past == 24
