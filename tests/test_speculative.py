"""Prompt-lookup speculative decoding: the drafts are llama-cpp-python's, greedy output is that of
plain decoding, and with temperature the emitted tokens keep the sampler's distribution."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import toy_llm
import toy_llm.generate as gen
from toy_llm.sampling import Sampler, SamplerConfig
from toy_llm.testing import synthetic

from test_errors import MODEL

llama_spec = pytest.importorskip("llama_cpp.llama_speculative")


@settings(max_examples=300, deadline=None)
@given(history=st.lists(st.integers(0, 5), min_size=1, max_size=40), draft_max=st.integers(1, 12),
       ngram=st.integers(1, 4))
def test_drafts_are_llama_cpp_pythons(history, draft_max, ngram):
    want = llama_spec.LlamaPromptLookupDecoding.find_candidate_pred_tokens(
        np.array(history, dtype=np.intc), max_ngram_size=ngram, num_pred_tokens=draft_max)
    assert gen.prompt_lookup_draft(history, draft_max, ngram) == want.tolist()


@settings(max_examples=300, deadline=None)
@given(history=st.lists(st.integers(0, 3), min_size=1, max_size=40), draft_max=st.integers(1, 12),
       ngram_min=st.integers(1, 3), extra=st.integers(0, 2))
def test_drafts_from_matches_of_at_least_ngram_min_tokens(history, draft_max, ngram_min, extra):
    """With ``ngram_min`` the draft is llama-cpp-python's when the context's last ``ngram_min``
    tokens recur earlier with a token after them (then every shorter match recurs too), else none."""
    ngram_max = ngram_min + extra
    tail = history[-ngram_min:]
    recurs = len(history) > ngram_min and any(history[i:i + ngram_min] == tail
                                              for i in range(len(history) - ngram_min))
    want = llama_spec.LlamaPromptLookupDecoding.find_candidate_pred_tokens(
        np.array(history, dtype=np.intc), max_ngram_size=ngram_max, num_pred_tokens=draft_max).tolist()
    assert gen.prompt_lookup_draft(history, draft_max, ngram_max, ngram_min) == (want if recurs else [])


def test_ngram_bounds_are_checked(f32_llama):
    m = toy_llm.load(f32_llama, max_T=32, n_threads=1)
    try:
        for bad in ({"ngram_min": 0}, {"ngram_min": 3, "ngram_max": 2}, {"ngram_max": 2.0}):
            with pytest.raises(ValueError, match="ngram_min"):
                list(gen.token_stream(m, [1, 2, 3], 4, Sampler(SamplerConfig()), set(), {}, "prompt_lookup", **bad))
    finally:
        m.close()


def _chi2_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of Pearson's chi-square goodness of fit (Wilson-Hilferty normal approximation)."""
    from math import erf, sqrt

    n = counts.sum()
    keep = probs * n >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep] * n, probs[~keep].sum() * n)
    obs, exp = obs[exp > 0], exp[exp > 0]
    x2, k = float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1
    z = ((x2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / sqrt(2 / (9 * k))
    return 0.5 * (1 - erf(z / sqrt(2)))


@pytest.mark.parametrize("draft_rank", [0, 1, 3, 50])
def test_acceptance_rule_keeps_the_distribution(draft_rank):
    """For any draft token (the likeliest, a middling one, one outside the candidates), the token
    accept_draft emits is distributed as sample()'s: chi-square over 20000 draws."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=64) * 2
    s = Sampler(SamplerConfig(temperature=0.8, top_k=20, top_p=0.95, seed=1))
    ids, probs = s.distribution(logits)
    want = np.zeros(64)
    want[ids] = probs
    draft = int(np.argsort(-logits)[draft_rank])
    counts = np.zeros(64)
    for _ in range(20000):
        counts[s.accept_draft(logits, [], draft)[1]] += 1
    p = _chi2_p(counts, want)
    assert p > 1e-3, f"chi-square p = {p:.2g}: the emitted tokens are not distributed as the sampler's"


@pytest.fixture(scope="module")
def f32_llama(tmp_path_factory):
    return synthetic.write_model(tmp_path_factory.mktemp("spec") / "llama.gguf", "llama")


@pytest.mark.parametrize("graph", ["fused", "per_head"])
def test_greedy_speculation_is_greedy_decoding(f32_llama, graph):
    """F32 weights: batch and single-step logits agree, so the text is identical, and drafts were used."""
    m = toy_llm.load(f32_llama, max_T=256, n_threads=1, graph=graph)
    try:
        prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 4
        plain = m.generate(prompt, max_new_tokens=48)
        spec = m.generate(prompt, max_new_tokens=48, speculative="prompt_lookup", draft_max=6)
        st_ = m.last_stats
        assert spec == plain
        assert st_["drafted"] > 0 and st_["verify_steps"] < st_["gen_tokens"], st_
        print(f"\n{graph}: {st_['accepted']}/{st_['drafted']} drafts accepted, {st_['gen_tokens']} tokens in "
              f"{st_['verify_steps']} verify steps")
    finally:
        m.close()


def test_sampled_speculation_keeps_the_two_token_distribution(f32_llama, monkeypatch):
    """End to end on a synthetic model, temperature 1.5, top-k 3: the first two generated tokens
    with a draft forced at every step (a token that is sometimes accepted, sometimes not) follow
    the distribution plain sampling defines: p(t1) p(t2 | t1), chi-square over 1500 generations."""
    m = toy_llm.load(f32_llama, max_T=64, n_threads=1)
    try:
        prompt = [3, 14, 15, 92, 65]
        scfg = SamplerConfig(temperature=1.5, top_k=3)
        s = Sampler(scfg)
        m.reset()
        ids1, p1 = s.distribution(m.eval(prompt)[-1], prompt)
        pairs, probs = [], []
        for t1, q1 in zip(ids1, p1):
            m.reset()
            ids2, p2 = s.distribution(m.eval(prompt + [int(t1)])[-1], prompt + [int(t1)])
            for t2, q2 in zip(ids2, p2):
                pairs.append((int(t1), int(t2)))
                probs.append(q1 * q2)
        mass: dict[int, float] = {}            # draft the second token most likely overall
        for (_, t2), q in zip(pairs, probs):
            mass[t2] = mass.get(t2, 0.0) + q
        draft = max(mass, key=mass.get)
        monkeypatch.setattr(gen, "prompt_lookup_draft", lambda history, n, ngram_max=2, ngram_min=1: [draft])
        index = {pr: i for i, pr in enumerate(pairs)}
        counts = np.zeros(len(pairs))
        accepted = 0
        for seed in range(1500):
            out = list(gen.token_stream(m, prompt, 2, Sampler(SamplerConfig(temperature=1.5, top_k=3, seed=seed)),
                                        set(), stats := {}, speculative="prompt_lookup"))
            counts[index[tuple(out)]] += 1
            accepted += stats["accepted"]
        assert 100 < accepted < 1400, (accepted, mass[draft])     # both branches of the rule ran
        p = _chi2_p(counts, np.array(probs))
        print(f"\n{accepted}/1500 drafts accepted; chi-square p = {p:.3f}")
        assert p > 1e-3
    finally:
        m.close()


def test_smollm2_input_grounded_agreement():
    """Q4_1 weights: a batch of drafts and one-token steps can round differently, so report how far
    the greedy texts agree; on this prompt they are identical."""
    m = toy_llm.load(MODEL, max_T=512, n_threads=2)
    try:
        passage = ("The quick brown fox jumps over the lazy dog. The dog was not amused, and it barked at the fox "
                   "until the fox ran away into the forest behind the old farmhouse.")
        ids = m.tokenize(m.apply_chat_template([{"role": "user", "content": "Repeat this text exactly:\n" + passage}]),
                         add_bos=False, special=True)
        plain = m.tokenize(m.generate(ids, max_new_tokens=40), add_bos=False)
        spec_text = m.generate(ids, max_new_tokens=40, speculative="prompt_lookup")
        st_ = m.last_stats
        spec = m.tokenize(spec_text, add_bos=False)
        same = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
        print(f"\nSmolLM2: {same}/{len(plain)} tokens agree; {st_['accepted']}/{st_['drafted']} drafts accepted, "
              f"{st_['gen_tokens']} tokens in {st_['verify_steps']} steps")
        assert spec == plain
        assert st_["accepted"] > 0
    finally:
        m.close()


def test_verify_batches_are_llama_cpps():
    """Speculation's verify batches (the token just decided plus the drafts, all logits), each
    followed by a rewind past the rejected drafts, against llama.cpp given the same batches and
    llama_memory_seq_rm for each rewind: every logit of every batch is compared, SmolLM2 Q4_1."""
    from test_multi_seq import BatchOracle, lc

    m = toy_llm.load(MODEL, max_T=512, n_threads=2)
    oracle = BatchOracle(MODEL, 1, 512, 2)
    try:
        passage = ("The quick brown fox jumps over the lazy dog. The dog was not amused, and it barked at the fox "
                   "until the fox ran away into the forest behind the old farmhouse.")
        history = m.tokenize(m.apply_chat_template([{"role": "user", "content": "Repeat this text exactly:\n" +
                                                     passage}]), add_bos=False, special=True)
        ours, theirs = m.eval(history), oracle.decode([(0, history)])[0]
        worst, agree, rows, sizes, rewinds = float(np.abs(ours - theirs).max()), 0, 0, [], 0
        tok = int(ours[-1].argmax())
        for _ in range(16):
            draft = gen.prompt_lookup_draft(history + [tok], 6, 2, 2)
            batch = [tok] + draft
            base = m.n_past
            ours, theirs = m.eval(batch), oracle.decode([(0, batch)])[0]
            worst = max(worst, float(np.abs(ours - theirs).max()))
            agree += int((ours.argmax(1) == theirs.argmax(1)).sum())
            rows += len(batch)
            sizes.append(len(batch))
            history.append(tok)
            accepted = 0
            for i, d in enumerate(draft):   # greedy acceptance, as generate's
                if int(ours[i].argmax()) != d:
                    break
                accepted += 1
                history.append(d)
            tok = int(ours[accepted].argmax())
            rewinds += accepted < len(draft)
            m.n_past = base + 1 + accepted                     # ours: the rejected rows are overwritten later
            lc.llama_memory_seq_rm(oracle.mem, 0, base + 1 + accepted, -1)
            oracle.lengths[0] = base + 1 + accepted
        print(f"\nverify batches of {sizes} tokens ({rewinds} rewinds past rejected drafts): "
              f"max |dlogit| = {worst:.3g}, argmax {agree}/{rows}")
        assert rewinds > 0
        assert any(a == b > 1 for a, b in zip(sizes, sizes[1:]))   # a verify graph replayed at new positions
        assert worst == 0.0 and agree == rows
    finally:
        oracle.close()
        m.close()


@pytest.fixture(scope="module")
def f32_llama_other(tmp_path_factory):
    """The same family and vocabulary as f32_llama, other weights: a draft model."""
    return synthetic.write_model(tmp_path_factory.mktemp("spec") / "llama_draft.gguf", "llama", seed=7)


def test_draft_model_speculation_is_greedy_decoding(f32_llama, f32_llama_other):
    """speculative="draft_model": a second model's greedy continuation is the draft. F32 weights:
    the text is plain greedy decoding's, whatever the draft model; with the target itself (loaded
    a second time) as the draft, every draft is accepted."""
    m = toy_llm.load(f32_llama, max_T=256, n_threads=1)
    other = toy_llm.load(f32_llama_other, max_T=256, n_threads=1)
    same = toy_llm.load(f32_llama, max_T=256, n_threads=1)
    try:
        prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 3
        plain = m.generate(prompt, max_new_tokens=40)
        for draft, name in ((other, "other weights"), (same, "the target itself")):
            spec = m.generate(prompt, max_new_tokens=40, draft_model=draft, draft_max=5)
            st_ = m.last_stats
            print(f"\ndraft model with {name}: {st_['accepted']}/{st_['drafted']} drafts accepted, "
                  f"{st_['gen_tokens']} tokens in {st_['verify_steps']} steps")
            assert spec == plain
            assert st_["drafted"] > 0
        assert st_["accepted"] == st_["drafted"] and st_["verify_steps"] < st_["gen_tokens"] / 3
        # the draft's cache follows the context across calls and rewinds: a second run is the same
        assert m.generate(prompt, max_new_tokens=40, draft_model=other, draft_max=3) == plain
    finally:
        for x in (m, other, same):
            x.close()


def test_draft_model_is_checked(f32_llama):
    m = toy_llm.load(f32_llama, max_T=64, n_threads=1)
    q = toy_llm.load(MODEL, max_T=64, n_threads=1)   # SmolLM2: another vocabulary
    try:
        with pytest.raises(ValueError, match="does not share the vocabulary"):
            m.generate([1, 2, 3], max_new_tokens=4, draft_model=q)
        with pytest.raises(ValueError, match="another Model"):
            m.generate([1, 2, 3], max_new_tokens=4, draft_model=m)
        with pytest.raises(ValueError, match="draft_model"):
            m.generate([1, 2, 3], max_new_tokens=4, speculative="prompt_lookup", draft_model=q)
        q.close()
        with pytest.raises(Exception, match="closed"):
            m.generate([1, 2, 3], max_new_tokens=4, draft_model=q)
    finally:
        m.close()
        q.close()


def test_cli_draft_model(f32_llama, f32_llama_other, capsys):
    from toy_llm.cli import main

    args = ["generate", "-m", str(f32_llama), "-n", "12", "-t", "1", "--quiet-prompt", "one two three"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--draft-model", str(f32_llama_other), "--draft-max", "4"]) == 0
    spec = capsys.readouterr()
    assert spec.out == plain.out
    assert re.search(r"\d+/\d+ drafts accepted", spec.err)
    with pytest.raises(SystemExit, match="take one prompt"):
        main(args + ["again", "--draft-model", str(f32_llama_other)])
