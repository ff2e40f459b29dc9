"""The parity oracle: llama-cpp-python 0.3.36, built from the same sdist as our ggml.

Helpers shared by the parity tests. Every expected number in those tests comes
from here (llama.cpp running the same GGUF on the same tokens), never from our
own engine.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

GGML_TYPE_F32, GGML_TYPE_Q8_0 = 0, 8
KV_GGML_TYPE = {"f32": GGML_TYPE_F32, "f16": 1, "q8_0": GGML_TYPE_Q8_0}

# Text for teacher forcing: varied English prose so the 128 positions exercise many tokens.
PARITY_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden screw press into a system that could produce books far "
    "faster than any scribe. Within fifty years, presses were operating in more than two hundred cities across "
    "Europe, and millions of volumes had been printed. Scholars argue about how much the new technology caused "
    "the Reformation, the scientific revolution and the rise of literacy, but few doubt that it changed how "
    "ideas travelled. Today we face a similar question about language models: what happens when text itself "
    "becomes cheap to produce, and how should we check that the machines computing it are correct? "
    "One answer is to compare every number against a trusted reference, position by position."
)


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")


def ubatch_oracle(path, kv_type: str = "f16", flash_attn: bool = False, n_batch: int = 1, n_ctx: int = 512,
                  logits_all: bool = True):
    """llama.cpp on ``path`` evaluating ubatches of ``n_batch`` positions (n_batch = n_ubatch), with
    the KV type given (default: F16, llama.cpp's own default, as toy_llm.load's), and
    logits for every position (``logits_all=False``: only each eval's last, llama.cpp's default).
    n_batch=1 is one position per graph, as our decode graphs compute."""
    lc = llama_cpp()
    return lc.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all, verbose=False,
                    n_threads=os.cpu_count(), type_k=KV_GGML_TYPE[kv_type], type_v=KV_GGML_TYPE[kv_type],
                    flash_attn=flash_attn)


def ubatch_logits(path, tokens, kv_type: str = "f16", flash_attn: bool = False, n_batch: int = 1,
                  n_ctx: int = 512, last_only: bool = False) -> np.ndarray:
    """llama.cpp's logits [len(tokens), vocab], evaluated in ubatches of ``n_batch`` positions; with
    ``last_only``, [1, vocab] of the last position computed without logits_all (llama.cpp then
    finishes the last layer for that position alone)."""
    llm = ubatch_oracle(path, kv_type, flash_attn, n_batch, n_ctx, logits_all=not last_only)
    try:
        if last_only:
            llm.eval(list(tokens))
            return last_logits(llm)[None]
        return oracle_logits(llm, tokens)
    finally:
        llm.close()


def greedy_reference(path, prompt: str, n: int, add_bos: bool = False, **oracle_kw) -> tuple[list[int], str]:
    """llama.cpp's tokens for ``prompt`` and its greedy continuation of them as text (n tokens at most);
    ``oracle_kw`` as for ubatch_oracle."""
    llm = ubatch_oracle(path, **oracle_kw)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=add_bos)
        return ids, oracle_greedy_text(llm, ids, n)
    finally:
        llm.close()


@contextlib.contextmanager
def oracle(path, kv_type: str = "f16", flash_attn: bool = False, n_ctx: int = 512):
    """A llama.cpp context on ``path`` with logits for every position (whole-prompt ubatches)."""
    llm = ubatch_oracle(path, kv_type, flash_attn, n_batch=n_ctx, n_ctx=n_ctx)
    try:
        yield llm
    finally:
        llm.close()


def oracle_logits(llm, tokens) -> np.ndarray:
    """llama.cpp's logits [len(tokens), vocab] from one fresh teacher-forced pass."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def last_logits(llm) -> np.ndarray:
    """llama.cpp's logits of the last position it evaluated (whether or not it keeps all of them)."""
    if llm._logits_all:
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    # llama-cpp-python keeps no logits without logits_all; the context still holds the last ones
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32)


def oracle_greedy(llm, prompt_tokens, n: int) -> list[int]:
    """llama.cpp's greedy continuation: argmax of its own logits, fed back one token at a time."""
    llm.reset()
    llm.eval(list(prompt_tokens))
    out = []
    for _ in range(n):
        tok = int(np.argmax(last_logits(llm)))
        if tok == llm.token_eos():
            break
        out.append(tok)
        llm.eval([tok])
    return out


def oracle_greedy_text(llm, prompt_tokens, n: int) -> str:
    """llama.cpp's greedy continuation as text, detokenized by llama.cpp itself."""
    return llm.detokenize(oracle_greedy(llm, prompt_tokens, n)).decode("utf-8", "replace")


def report(label: str, ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Print max |Δlogit| and argmax agreement; return (max_abs, agreement fraction)."""
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max())
    agree = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    worst = int(diff.max(axis=-1).argmax())
    print(f"\n[parity] {label}: positions={len(ref)} max|Δlogit|={max_abs:.3g} (worst at position {worst}) "
          f"mean|Δ|={diff.mean():.3g} argmax agreement={agree * 100:.1f}%")
    return max_abs, agree
