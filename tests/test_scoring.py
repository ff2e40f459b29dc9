"""toy_llm.scoring against llama.cpp: per-token log-probabilities and llama-perplexity's perplexity.

The reference is llama.cpp's own logits (llama-cpp-python 0.3.36, n_batch = n_ubatch = 512, F32 KV,
no flash attention: toy_llm.load()'s defaults), fed to llama-perplexity's method written out here
in float64 numpy, independently of toy_llm/scoring.py: tokenize the whole text with llama.cpp
(add_special), n_chunk = n_tokens // n_ctx chunks, each from an empty KV cache with its first token
replaced by BOS when the vocab adds BOS, the logits of positions n_ctx/2 .. n_ctx-2 scored against
the next token, nll and nll^2 summed over all scored tokens, and the final estimate
PPL = exp(<nll>) +/- sqrt((<nll^2> - <nll>^2) / (count - 1)) * PPL.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import toy_llm
from toy_llm.scoring import PerplexityResult, perplexity, score
from oracle import PARITY_TEXT, oracle_logits, ubatch_oracle

lc = pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")

N_CTX = 64
# ~243 tokens (SmolLM2 and Gemma 3 alike): 3 chunks of 64 and an unused remainder, varied prose so no
# chunk is a copy of another (small, so the test stays quick on 2 shared cores).
PPL_TEXT = PARITY_TEXT + "\n\n" + (
    "Rivers shape the land they cross. Over thousands of years a river carves valleys, deposits silt "
    "on its floodplain and builds deltas where it meets the sea. Early farming villages grew along the "
    "Nile, the Tigris, the Indus and the Yellow River because the annual floods renewed the soil, and "
    "the need to share water and predict the seasons encouraged calendars, writing and government. "
    "Even now, most of the world's great cities stand on a river or a coast."
)
SCORE_TEXTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
               "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5"]



@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request):
    """(label, our model, llama.cpp) on the same GGUF; llama.cpp with our defaults' settings."""
    from toy_llm.fetch import fetch

    path = fetch("smollm2" if request.param == "smollm2" else "gemma3-270m")
    m = toy_llm.load(path, max_T=128)
    llm = ubatch_oracle(path, n_batch=512, n_ctx=N_CTX)   # F16 KV, no flash attention: both sides' defaults
    try:
        yield request.param, m, llm
    finally:
        llm.close()
        m.close()


def ref_log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def llama_perplexity_reference(llm, text: str, n_ctx: int) -> dict:
    """llama-perplexity's perplexity() (tools/perplexity/perplexity.cpp) on llama.cpp's logits, in float64."""
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)   # common_tokenize(ctx, prompt, true)
    assert len(tokens) >= 2 * n_ctx
    add_bos = llm._model.add_bos_token()
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    running, per_chunk = [], []
    for i in range(n_chunk):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        logp = ref_log_softmax(oracle_logits(llm, chunk))
        v = -logp[np.arange(first, n_ctx - 1), chunk[first + 1:n_ctx]]
        assert len(v) == n_ctx - first - 1
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += n_ctx - first - 1
        running.append(math.exp(nll / count))
        per_chunk.append(math.exp(float(v.mean())))
    nll2 /= count
    nll /= count
    ppl = math.exp(nll)
    nll2 -= nll * nll
    err = math.sqrt(nll2 / (count - 1))
    return dict(tokens=tokens, ppl=ppl, nll=nll, nll_stderr=err, ppl_stderr=err * ppl, n_chunks=n_chunk,
                count=count, running=running, per_chunk=per_chunk)


def test_perplexity_matches_llama_cpp(pair):
    label, m, llm = pair
    ref = llama_perplexity_reference(llm, PPL_TEXT, N_CTX)
    assert m.tokenize(PPL_TEXT) == ref["tokens"]
    r = perplexity(m, PPL_TEXT, n_ctx=N_CTX)
    d = abs(r.ppl - ref["ppl"])
    print(f"\n[perplexity] {label} n_ctx={N_CTX} chunks={r.n_chunks} scored={r.n_tokens_scored}: "
          f"ours={r.ppl:.6f} +/- {r.ppl_stderr:.5f}  llama.cpp={ref['ppl']:.6f} +/- {ref['ppl_stderr']:.5f}  "
          f"|Δ|={d:.3g}  per chunk ours={[round(x, 4) for x in r.chunk_ppl]}")
    assert isinstance(r, PerplexityResult)
    assert r.n_chunks == ref["n_chunks"] == 3
    assert r.n_tokens_scored == ref["count"] == 3 * (N_CTX - N_CTX // 2 - 1)
    assert r.n_tokens == len(ref["tokens"]) and r.n_ctx == N_CTX
    assert d < 5e-5
    assert f"{r.ppl:.4f}" == f"{ref['ppl']:.4f}"          # what llama-perplexity prints
    assert abs(r.nll - ref["nll"]) < 1e-9
    assert abs(r.nll_stderr - ref["nll_stderr"]) < 1e-9
    assert abs(r.ppl_stderr - ref["ppl_stderr"]) < 1e-6
    np.testing.assert_allclose(r.running_ppl, ref["running"], rtol=1e-9)
    np.testing.assert_allclose(r.chunk_ppl, ref["per_chunk"], rtol=1e-9)
    assert m.n_past == 0


def test_score_matches_llama_cpp_log_softmax(pair):
    label, m, llm = pair
    got = score(m, SCORE_TEXTS)
    assert len(got) == len(SCORE_TEXTS)
    worst = 0.0
    for text, lp in zip(SCORE_TEXTS, got):
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert m.tokenize(text) == ids
        want = ref_log_softmax(oracle_logits(llm, ids))[np.arange(len(ids) - 1), ids[1:]]
        assert lp.dtype == np.float64 and lp.shape == (len(ids) - 1,)
        worst = max(worst, float(np.abs(lp - want).max()))
    print(f"\n[score] {label}: {[len(x) for x in got]} tokens scored, max |Δlogprob| vs llama.cpp = {worst:.3g}")
    assert worst < 1e-6
    assert m.n_past == 0


@pytest.fixture(scope="module")
def smol():
    from toy_llm.fetch import fetch

    with toy_llm.load(fetch("smollm2"), max_T=256) as m:
        yield m


def test_score_inputs(smol):
    """Token ids are taken as given, add_bos overrides the GGUF's setting for text, a single str is a
    one-text list, and texts of 0 or 1 tokens give empty arrays."""
    text = SCORE_TEXTS[0]
    ids = smol.tokenize(text, add_bos=True)
    assert ids[0] == smol.tokenizer.bos_id and smol.tokenize(text) == ids[1:]   # SmolLM2 adds no BOS
    with_bos, = score(smol, [ids])
    assert with_bos.shape == (len(ids) - 1,)
    np.testing.assert_array_equal(score(smol, text, add_bos=True)[0], with_bos)
    a, b = score(smol, [[ids[1]], []])
    assert a.shape == b.shape == (0,) and a.dtype == np.float64
    assert np.all(with_bos <= 0) and smol.n_past == 0


def test_perplexity_too_short_text_raises(smol, tmp_path):
    n = len(smol.tokenize(PARITY_TEXT))
    assert n < 2 * 128
    with pytest.raises(ValueError, match=rf"at least 256 tokens .* context of 128.* only {n} tokens"):
        perplexity(smol, PARITY_TEXT, n_ctx=128)
    f = tmp_path / "short.txt"
    f.write_text(PARITY_TEXT + "\n", encoding="utf-8")   # -f drops one trailing newline
    with pytest.raises(ValueError, match=rf"only {n} tokens"):
        perplexity(smol, f, n_ctx=128)
    with pytest.raises(ValueError, match=rf"only {n} tokens"):
        perplexity(smol, str(f), n_ctx=128)


def test_perplexity_n_ctx_beyond_context_raises(smol):
    with pytest.raises(ValueError, match=r"n_ctx=512 exceeds the model's context of 256"):
        perplexity(smol, PPL_TEXT * 2, n_ctx=512)
    with pytest.raises(ValueError, match=r"more than the context"):
        score(smol, [list(range(300))])


def test_perplexity_reads_files_like_text(smol, tmp_path):
    """A path (Path or str) is read as UTF-8 bytes as they are (\\r\\n kept) with one trailing newline
    dropped, as llama-perplexity -f reads it."""
    text = "Tea or coffee?\r\nCaf\u00e9 au lait \u2014 s'il vous pla\u00eet.\r\nThe kettle sings; the cups wait on the table."
    f = tmp_path / "text.txt"
    f.write_bytes((text + "\n").encode("utf-8"))
    n = len(smol.tokenize(text))
    assert n != len(smol.tokenize(text.replace("\r\n", "\n"))) and n != len(smol.tokenize(text + "\n"))
    n_ctx = n // 2
    a = perplexity(smol, text, n_ctx=n_ctx)
    assert a.n_tokens == n and a.n_chunks == 2 and a.n_tokens_scored == 2 * (n_ctx - n_ctx // 2 - 1)
    assert len(a.chunk_ppl) == len(a.running_ppl) == 2 and a.running_ppl[-1] == pytest.approx(a.ppl)
    assert perplexity(smol, f, n_ctx=n_ctx) == a
    assert perplexity(smol, str(f), n_ctx=n_ctx, progress=True) == a   # a tqdm bar over the 2 chunks
    with pytest.raises(ValueError, match=rf"only {n} tokens"):
        perplexity(smol, f, n_ctx=n_ctx + 1)
    with pytest.raises(FileNotFoundError):
        perplexity(smol, tmp_path / "missing.txt", n_ctx=n_ctx)
