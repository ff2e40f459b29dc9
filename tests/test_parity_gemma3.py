"""The real Gemma 3 270M (Q4_K_M, from its PyPI part packages) against llama.cpp.

Same oracle and bound as tests/test_parity_smollm2.py (measured: max |Δlogit| = 0). Gemma 3
exercises the sliding-window layers (window 512, 5 of every 6 layers) with their own rope base,
per-head QK-norm, sandwich norms, GELU, the sqrt(d_model) embedding scale, Q pre-scaling, and the
Q4_K weights that llama.cpp runs through ggml's repacked CPU kernels.
"""
from __future__ import annotations


import pytest

import toy_llm
from oracle import PARITY_TEXT, greedy_reference, report, ubatch_logits, ubatch_oracle

lc = pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")
BOUND = 1e-3


@pytest.fixture(scope="module")
def gemma3():
    from toy_llm.fetch import fetch

    return fetch("gemma3-270m")


@pytest.fixture(scope="module")
def tokens(gemma3):
    """48 teacher-forcing tokens, tokenized by llama.cpp itself (with Gemma's BOS)."""
    llm = ubatch_oracle(gemma3, n_ctx=64)
    try:
        return llm.tokenize(PARITY_TEXT.encode(), add_bos=True)[:48]
    finally:
        llm.close()


@pytest.mark.parametrize("fused", [False, True], ids=["per_head", "fused_one_position_per_graph"])
@pytest.mark.parametrize("kv_type,flash", [("f32", False), ("q8_0", True), ("f16", False)])
def test_gemma3_teacher_forced_logits(gemma3, tokens, kv_type, flash, fused):
    ref = ubatch_logits(gemma3, tokens, kv_type, flash, n_ctx=256)
    with toy_llm.load(gemma3, max_T=256, kv_type=kv_type, flash_attn=flash,
                      graph="fused" if fused else "per_head", n_batch=1) as m:
        assert m.tokenize(PARITY_TEXT)[:48] == tokens
        ours = m.eval(tokens)
    max_abs, agree = report(f"Gemma 3 270M Q4_K_M kv={kv_type}{' fused' if fused else ' per-head'}", ours, ref)
    assert agree == 1.0
    assert max_abs <= BOUND


def test_gemma3_greedy_32_tokens(gemma3):
    prompt = "The capital of France is"
    # both sides' defaults: llama.cpp n_batch = n_ubatch = 512, last logits of the prompt only
    ids, ref_text = greedy_reference(gemma3, prompt, 32, add_bos=True, n_ctx=256, n_batch=512, logits_all=False)
    with toy_llm.load(gemma3, max_T=256) as m:
        assert m.tokenize(prompt) == ids
        text = m.generate(prompt, max_new_tokens=32)
    print(f"\n[greedy] Gemma 3 270M: llama.cpp {ref_text!r}\n[greedy] Gemma 3 270M: toy_llm   {text!r}")
    assert text == ref_text


@pytest.mark.parametrize("kv_type,flash", [("f32", False), ("q8_0", True)])
def test_gemma3_batched_prefill(gemma3, tokens, kv_type, flash):
    """48 positions in one fused-heads graph against llama.cpp's one ubatch of 48."""
    ref = ubatch_logits(gemma3, tokens, kv_type, flash, 48, n_ctx=256)
    with toy_llm.load(gemma3, max_T=256, kv_type=kv_type, flash_attn=flash, n_batch=48) as m:
        ours = m.eval(tokens)
    max_abs, agree = report(f"Gemma 3 270M Q4_K_M kv={kv_type} batched prefill", ours, ref)
    assert agree == 1.0
    assert max_abs <= BOUND
