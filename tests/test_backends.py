"""The engine on an accelerator backend (CUDA, Metal) against llama.cpp on the CPU.

Runs only where such a backend is compiled in (``make CUDA=1``, or macOS) *and* a device is
present; elsewhere every test here is skipped with the reason. ``scripts/device_check.sh`` runs it
on a GPU machine with cases written ahead of time by ``scripts/device_bundle.sh`` (the folder named
by ``TOY_LLM_BACKEND_CASES``); without that variable the cases are made here with the oracle.

The reference is llama-cpp-python 0.3.36 on the CPU, fed one token per ubatch, the same numbers
that tests/test_parity_families.py matches bit for bit on the CPU. A GPU runs other kernels
(cuBLAS, Q8_1-quantized activations in every quantized matmul, its own flash attention), so the
logits cannot be bit-identical; the bounds are the size of difference llama.cpp shows between its
*own* CPU kernel paths on these models (batched vs token-by-token prefill: ~1e-5 for float
weights, up to 0.24 with 98% argmax agreement for quantized ones, 1.0 on SmolLM2 Q4_1):
  float weights (F32, F16):  max |Δlogit| <= 0.05 and argmax agreement >= 95%
  quantized weights:         max |Δlogit| <= 1.0  and argmax agreement >= 90%
A wrong kernel, mask, rope or scale moves logits by several units on these models (std ~2.7).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import toy_llm
from toy_llm import tinynn as tnn
from toy_llm.engine.kv_cache import BACKEND_KINDS

FLOAT_BOUND, FLOAT_AGREE = 0.05, 0.95
QUANT_BOUND, QUANT_AGREE = 1.0, 0.90


def live_accelerators() -> list[str]:
    """Backends compiled in whose device answers (a session really runs there)."""
    live = []
    for name in ("cuda", "metal"):
        kind = BACKEND_KINDS[name]
        if not tnn.tnn_have_backend(kind):
            continue
        s = tnn.tnn_session_new(kind)
        try:
            if tnn.tnn_session_backend_kind(s) == kind:
                live.append(name)
        finally:
            tnn.tnn_session_free(s)
    return live


BACKENDS = live_accelerators()
needs_accelerator = pytest.mark.skipif(not BACKENDS, reason="no accelerator backend compiled in with a device present "
                                                     "(build with `make CUDA=1` on a GPU machine)")


@pytest.fixture(scope="session")
def cases(tmp_path_factory):
    src = os.environ.get("TOY_LLM_BACKEND_CASES")
    import backend_cases

    if src:
        return {c["name"]: c for c in backend_cases.load_cases(src)}
    pytest.importorskip("llama_cpp", reason="cases need the llama-cpp-python oracle or TOY_LLM_BACKEND_CASES")
    dst = backend_cases.build_cases(tmp_path_factory.mktemp("backend-cases"))
    return {c["name"]: c for c in backend_cases.load_cases(dst)}


def _case_names():
    import backend_cases

    return [backend_cases.case_name(*c) for c in backend_cases.CASES]


def _report(label, ours, ref):
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    agree = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    print(f"\n[backend] {label}: positions={len(ref)} max|Δlogit|={diff.max():.3g} "
          f"mean|Δlogit|={diff.mean():.3g} argmax agreement={agree:.1%}")
    return float(diff.max()), agree


@needs_accelerator
@pytest.mark.parametrize("graph", ["per_head", "fused_one_position_per_graph", "fused_batched"])
@pytest.mark.parametrize("backend", BACKENDS or ["none"])
@pytest.mark.parametrize("name", _case_names())
def test_backend_logits_close_to_llama_cpp(cases, backend, name, graph):
    c = cases[name]
    ref = np.load(c["logits"])
    with toy_llm.load(c["gguf"], max_T=256, backend=backend, kv_type=c["kv_type"], flash_attn=c["flash"],
                      graph="per_head" if graph == "per_head" else "fused",
                      n_batch=64 if graph == "fused_batched" else 1) as m:
        assert tnn.tnn_session_backend_kind(m.cache.sess) == BACKEND_KINDS[backend]
        ours = m.eval(c["tokens"])
        m.reset()
        greedy = []
        logits = m.eval(c["greedy_prompt"])[-1]
        for _ in range(len(c["greedy"])):
            tok = int(np.argmax(logits))
            greedy.append(tok)
            logits = m.eval([tok])[-1]
    label = f"{backend} {name} {graph}"
    max_abs, agree = _report(label, ours, ref)
    same = next((i for i, (a, b) in enumerate(zip(greedy, c["greedy"])) if a != b), len(c["greedy"]))
    print(f"[backend] {label}: greedy {same}/{len(c['greedy'])} tokens as llama.cpp (CPU)")
    bound, want = (FLOAT_BOUND, FLOAT_AGREE) if c["wtype"] in ("F32", "F16") else (QUANT_BOUND, QUANT_AGREE)
    assert agree >= want, f"argmax agreement {agree:.1%} < {want:.0%}"
    assert max_abs <= bound, f"max |Δlogit| {max_abs:.3g} > {bound}"


@needs_accelerator
@pytest.mark.parametrize("backend", BACKENDS or ["none"])
def test_backend_session_reuse_and_reset(cases, backend):
    """Two models on the device one after the other, and reset(): no state leaks between them."""
    c = cases["llama-Q4_K-kv_f32"]
    with toy_llm.load(c["gguf"], max_T=128, backend=backend) as m:
        first = m.eval(c["tokens"][:12])
        m.reset()
        again = m.eval(c["tokens"][:12])
    np.testing.assert_array_equal(first, again)
    with toy_llm.load(c["gguf"], max_T=128, backend=backend) as m:
        np.testing.assert_array_equal(m.eval(c["tokens"][:12]), first)


def test_carried_cases_rebuild_their_f32_files(tmp_path):
    """What scripts/device_bundle.sh carries (F32 files left out) loads back to the very files
    llama.cpp's numbers were computed on; a changed file is refused, not silently compared."""
    pytest.importorskip("llama_cpp", reason="cases are computed by the llama-cpp-python oracle")
    import backend_cases

    from toy_llm.gguf_load import load_config

    backend_cases.build_cases(tmp_path, cases=[("llama", "F32", "f32", False)])
    (tmp_path / "llama.F32.gguf").unlink()
    (c,) = backend_cases.load_cases(tmp_path)
    assert c["gguf"].exists() and len(c["tokens"]) == backend_cases.N_POS
    assert np.load(c["logits"]).shape == (backend_cases.N_POS, load_config(c["gguf"]).vocab)
    with open(c["gguf"], "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(RuntimeError, match="sha256 differs"):
        backend_cases.load_cases(tmp_path)
