"""The real Gemma 3 270M (Q4_K_M, from its PyPI part packages) against llama.cpp.

Same oracle and bound as tests/test_parity_smollm2.py (measured: max |Δlogit| = 0). Gemma 3
exercises the sliding-window layers (window 512, 5 of every 6 layers) with their own rope base,
per-head QK-norm, sandwich norms, GELU, the sqrt(d_model) embedding scale, Q pre-scaling, and the
Q4_K weights that llama.cpp runs through ggml's repacked CPU kernels.
"""
from __future__ import annotations


import pytest

import toy_llm
from oracle import PARITY_TEXT, oracle_greedy_text, oracle_logits, report, ubatch_oracle

lc = pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")
BOUND = 1e-3


@pytest.fixture(scope="module")
def gemma3():
    from toy_llm.fetch import fetch

    return fetch("gemma3-270m")


@pytest.mark.parametrize("fused", [False, True], ids=["per_head", "fused_heads"])
@pytest.mark.parametrize("kv_type,flash", [("f32", False), ("q8_0", True)])
def test_gemma3_teacher_forced_logits(gemma3, kv_type, flash, fused):
    llm = ubatch_oracle(gemma3, kv_type, flash, n_ctx=256)
    try:
        tokens = llm.tokenize(PARITY_TEXT.encode(), add_bos=True)[:48]
        ref = oracle_logits(llm, tokens)
    finally:
        llm.close()
    with toy_llm.load(gemma3, max_T=256, kv_type=kv_type, flash_attn=flash, fused_heads=fused) as m:
        assert m.tokenize(PARITY_TEXT)[:48] == tokens
        ours = m.eval(tokens)
    max_abs, agree = report(f"Gemma 3 270M Q4_K_M kv={kv_type}{' fused-heads' if fused else ''}", ours, ref)
    assert agree == 1.0
    assert max_abs <= BOUND


def test_gemma3_greedy_32_tokens(gemma3):
    prompt = "The capital of France is"
    llm = ubatch_oracle(gemma3, n_ctx=256)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=True)
        ref_text = oracle_greedy_text(llm, ids, 32)
    finally:
        llm.close()
    with toy_llm.load(gemma3, max_T=256) as m:
        assert m.tokenize(prompt) == ids
        text = m.generate(prompt, max_new_tokens=32)
    print(f"\n[greedy] Gemma 3 270M: llama.cpp {ref_text!r}\n[greedy] Gemma 3 270M: toy_llm   {text!r}")
    assert text == ref_text


@pytest.mark.parametrize("kv_type,flash", [("f32", False), ("q8_0", True)])
def test_gemma3_batched_prefill(gemma3, kv_type, flash):
    """48 positions in one fused-heads graph against llama.cpp's one ubatch of 48."""
    llm = ubatch_oracle(gemma3, kv_type, flash, 48, n_ctx=256)
    try:
        tokens = llm.tokenize(PARITY_TEXT.encode(), add_bos=True)[:48]
        ref = oracle_logits(llm, tokens)
    finally:
        llm.close()
    with toy_llm.load(gemma3, max_T=256, kv_type=kv_type, flash_attn=flash, fused_heads=True, n_batch=48) as m:
        ours = m.eval(tokens)
    max_abs, agree = report(f"Gemma 3 270M Q4_K_M kv={kv_type} batched prefill", ours, ref)
    assert agree == 1.0
    assert max_abs <= BOUND
