"""The GGUF loader against bad files (issue #11): a hand-made corpus, a seeded mutation campaign,
hypothesis-drawn mutations, and the gguf handle's liveness checks in the shim.

Each file goes through toy_llm.load + eval in a forked child (toy_llm.testing.gguf_fuzz) with a
10 s limit and a 2 GB address-space limit; it must load correctly or raise a GGUFLoadError /
TinyNNError naming the file and a key, a tensor or the header field. Sizes:

* ``-k corpus``: tests/gguf_corpus/*.gguf (regenerate with tests/gguf_corpus/make_corpus.py), each
  with hand-written expected message parts; runnable alone, e.g. under ``make asan``.
* ``-k campaign``: TNN_FUZZ_N mutated tiny synthetic files (default 2000, about 1-2 minutes on
  2 cores) + TNN_FUZZ_MODEL_N (default 30) header mutations of SmolLM2 when present. The full size:
  ``make fuzz FUZZ_N=20000``.
* ``-k hypothesis``: TNN_FUZZ_HYP (default 100) hypothesis-drawn mutations.
* ``-k copy_loader``: TNN_FUZZ_COPY_N (default 300) mutations through ``load(loader="copy")``.

TNN_FUZZ_AS_LIMIT (bytes, 0 = none) overrides the address-space limit; it is off by itself under
AddressSanitizer (whose shadow memory reserves terabytes of address space).
"""
from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest

from toy_llm.testing import gguf_fuzz as gf

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "gguf_corpus"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def _warm():
    gf.warm_up(str(CORPUS / "valid.gguf"))   # import everything before the children fork


def _run(path, target=""):
    return gf.run_in_child(str(path), target=target)


# ------------------------------------------------------------------------------------------ corpus

@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus(name):
    expect = MANIFEST[name]
    out = _run(CORPUS / f"{name}.gguf")
    if expect.get("ok"):
        assert out.kind == gf.OK, f"{out.kind}: {out.exc_type}: {out.message}"
        return
    assert out.kind == gf.NAMED, f"{name}: {out.kind}: {out.exc_type}: {out.message}"
    assert out.exc_type in ("GGUFLoadError", "MissingTensorError", "TinyNNError"), out.exc_type
    missing = [s for s in expect["error"] if s not in out.message]
    assert not missing, f"{name}: message lacks {missing}: {out.message}"


def test_corpus_covers_each_category():
    cats = {e["category"] for e in MANIFEST.values()}
    assert {"hang", "type", "divide", "token id", "shape", "dims", "offset", "truncation", "header",
            "control"} <= cats


def test_corpus_non_regular_files_refused(tmp_path):
    """A FIFO (whose open would block), a directory, a device and a socket: refused up front."""
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.gguf"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    try:
        for path, word in ((fifo, "FIFO"), (tmp_path, "directory"), (Path("/dev/null"), "device"),
                           (sock_path, "socket"), (empty, "empty"), (tmp_path / "nope.gguf", "no such file")):
            out = _run(path)
            assert out.kind == gf.NAMED and out.exc_type == "GGUFLoadError", (path, out)
            assert word in out.message and str(path) in out.message, out.message
            assert out.seconds < 5
    finally:
        s.close()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_corpus_failed_loads_leak_nothing():
    """Every error path frees its session, mapping and gguf handle: after failing loads of every
    corpus file in this process, no fd is left open and no corpus file stays mapped."""
    import toy_llm
    from toy_llm.gguf_meta import GGUFLoadError
    from toy_llm.tinynn import TinyNNError

    def fds():
        return len(os.listdir("/proc/self/fd"))

    def mapped():
        return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(CORPUS) in line]

    before = fds()
    # (in this process: the hang cases are bounded now, the children above showed it)
    for name, expect in sorted(MANIFEST.items()):
        if expect.get("ok"):
            continue
        with pytest.raises((GGUFLoadError, TinyNNError)):
            m = toy_llm.load(CORPUS / f"{name}.gguf", max_T=16, n_threads=1)
            try:
                m.eval([1, 2, 3])
            finally:
                m.close()
    assert fds() == before
    assert mapped() == []


# ------------------------------------------------------------------------------------------ gguf handles

def _valid_handle():
    from toy_llm import tinynn as tnn

    return tnn, tnn.tnn_gguf_load(str(CORPUS / "valid.gguf"))


def test_corpus_gguf_free_twice_is_an_error():
    tnn, g = _valid_handle()
    assert tnn.tnn_gguf_free(g) == 0
    with pytest.raises(tnn.TinyNNError, match="not a live gguf handle"):
        tnn.tnn_gguf_free(g)


def test_corpus_gguf_getters_on_a_freed_handle_are_errors():
    tnn, g = _valid_handle()
    tnn.tnn_gguf_free(g)
    for call in (lambda: tnn.tnn_gguf_n_tensors(g), lambda: tnn.tnn_gguf_n_kv(g),
                 lambda: tnn.tnn_gguf_find_index(g, b"token_embd.weight"), lambda: tnn.tnn_gguf_tensor_name(g, 0),
                 lambda: tnn.tnn_gguf_tensor_ne(g, 0, 0), lambda: tnn.tnn_gguf_find_key(g, b"general.architecture"),
                 lambda: tnn.tnn_gguf_kv_type(g, 0), lambda: tnn.tnn_gguf_mmap_size(g),
                 lambda: tnn.tnn_gguf_version(g), lambda: tnn.tnn_gguf_mmap_base(g)):
        with pytest.raises(tnn.TinyNNError, match="not a live gguf handle"):
            call()


def test_corpus_gguf_made_up_handle_is_an_error():
    from toy_llm import tinynn as tnn

    fake = tnn.ffi.cast("tnn_gguf *", tnn.ffi.new("char[256]"))
    with pytest.raises(tnn.TinyNNError, match="not a live gguf handle"):
        tnn.tnn_gguf_n_tensors(fake)


@pytest.mark.parametrize("graph", ["fused", "per_head"])
def test_corpus_gguf_free_under_a_live_session_is_refused(graph):
    """The mapping a live session's weights point into cannot be unmapped under it: the free is
    refused (the handle stays live, evals go on); Engine.close frees the session, then the mapping."""
    import toy_llm
    from toy_llm import tinynn as tnn

    m = toy_llm.load(CORPUS / "valid.gguf", max_T=16, n_threads=1, graph=graph)
    g = m.cache.engine.gguf
    before = m.eval([1, 2, 3])
    with pytest.raises(tnn.TinyNNError, match="still has weights in this file's mapping"):
        tnn.tnn_gguf_free(g)
    assert tnn.tnn_gguf_n_tensors(g) > 0          # still live
    m.reset()
    np.testing.assert_array_equal(m.eval([1, 2, 3]), before)
    m.close()
    with pytest.raises(tnn.TinyNNError, match="not a live gguf handle"):
        tnn.tnn_gguf_n_tensors(g)                  # close freed it
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if "valid.gguf" in line]


def test_corpus_gguf_free_after_session_free_works():
    from toy_llm import tinynn as tnn

    g = tnn.tnn_gguf_load(str(CORPUS / "valid.gguf"))
    s = tnn.tnn_session_new(0)
    tnn.tnn_session_attach_weight_mmap(s, tnn.tnn_gguf_mmap_base(g), tnn.tnn_gguf_mmap_size(g))
    with pytest.raises(tnn.TinyNNError, match="still has weights"):
        tnn.tnn_gguf_free(g)
    tnn.tnn_session_free(s)
    assert tnn.tnn_gguf_free(g) == 0


# ------------------------------------------------------------------------------------------ campaign

def test_fuzz_campaign(capsys):
    n = int(os.environ.get("TNN_FUZZ_N", "2000"))
    n_model = int(os.environ.get("TNN_FUZZ_MODEL_N", "30")) if SMOLLM2.exists() else 0
    rep = gf.campaign(n, seed=int(os.environ.get("TNN_FUZZ_SEED", "0")), model=str(SMOLLM2) if n_model else None,
                      n_model=n_model)
    with capsys.disabled():
        print("\n" + rep.table())
    assert len(rep.results) == n + n_model
    fails = "\n".join(f"{o.kind} {b}: {m.label()}: {o.exc_type}: {o.message[:300]}" for b, m, o in rep.failures[:20])
    assert not rep.failures, fails
    kinds = {m.kind for _, m, _ in rep.results}
    assert {"truncate", "raw_arr_len", "raw_vtype", "kv_retype", "tensor_shape", "special_id"} <= kinds or n < 500
    # every kind of outcome a file can rightly have occurs: the campaign is not all one thing
    assert rep.counts()[gf.OK] > 0 and rep.counts()[gf.NAMED] > 0


def test_fuzz_campaign_copy_loader(monkeypatch):
    """The same mutations through load(loader="copy") (weights copied into the session's buffer):
    TNN_FUZZ_COPY_N files (default 300)."""
    monkeypatch.setenv("TNN_FUZZ_LOADER", "copy")   # read by the forked children
    rep = gf.campaign(int(os.environ.get("TNN_FUZZ_COPY_N", "300")), seed=17)
    fails = "\n".join(f"{o.kind} {b}: {m.label()}: {o.exc_type}: {o.message[:300]}" for b, m, o in rep.failures[:20])
    assert not rep.failures, fails


# ------------------------------------------------------------------------------------------ hypothesis

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return gf.write_base_models(tmp_path_factory.mktemp("fuzz-base"), families=("llama",))[0]


def test_fuzz_hypothesis(tiny_llama, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings

    buf = tiny_llama.read_bytes()
    work = tmp_path_factory.mktemp("hyp") / "m.gguf"
    n = int(os.environ.get("TNN_FUZZ_HYP", "100"))

    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(gf.mutation_strategy(buf))
    def run(mut):
        work.write_bytes(mut.apply(buf))
        out = gf.run_in_child(str(work), target=mut.target)
        assert not out.failed, f"{mut.label()}: {out.kind}: {out.exc_type}: {out.message[:400]}"

    run()


def test_fuzz_one_entry_point(tiny_llama):
    """The atheris-style entry: returns on a valid file and on a named error; raises on a failure."""
    buf = tiny_llama.read_bytes()
    gf.fuzz_one(buf)
    gf.fuzz_one(buf[:1000])
    gf.fuzz_one(b"")
    gf.fuzz_one(b"GGUF" + b"\xff" * 60)


def test_classify_counts_unnamed_and_foreign_errors_as_failures():
    """The classifier the campaign trusts: a raw exception, or a GGUFLoadError naming neither file
    nor record, is a failure."""
    p = "/tmp/x/m.gguf"
    assert gf.classify(p, "exc", "ZeroDivisionError,ArithmeticError,Exception", "division by zero").failed
    assert gf.classify(p, "exc", "MemoryError,Exception", "").kind == gf.ADDRESS_SPACE
    assert gf.classify(p, "exc", "GGUFLoadError,ValueError", "bad file").kind == gf.UNNAMED
    assert gf.classify(p, "exc", "GGUFLoadError,ValueError", f"{p}: something odd").kind == gf.UNNAMED
    assert gf.classify(p, "exc", "GGUFLoadError,ValueError", f"{p}: key 'llama.block_count' is 0").kind == gf.NAMED
    assert gf.classify(p, "ok", "", "").kind == gf.OK
