"""Sampler tests: greedy/argmax identities, filter guarantees, determinism, penalties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from toy_llm.sampling import Sampler, SamplerConfig

finite = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False, allow_infinity=False, width=32)
logit_arrays = arrays(np.float32, st.integers(min_value=1, max_value=64), elements=finite)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


@settings(max_examples=200, deadline=None)
@given(logit_arrays)
def test_greedy_is_argmax(logits):
    assert Sampler(SamplerConfig(temperature=0.0)).sample(logits, []) == int(np.argmax(logits))


@settings(max_examples=200, deadline=None)
@given(logit_arrays, st.floats(min_value=0.05, max_value=5.0), st.integers(0, 2**32 - 1))
def test_top_k_1_is_argmax_for_any_temperature(logits, temperature, seed):
    sampler = Sampler(SamplerConfig(temperature=temperature, top_k=1, seed=seed))
    assert sampler.sample(logits, []) == int(np.argmax(logits))


@settings(max_examples=200, deadline=None)
@given(logit_arrays, st.floats(min_value=0.01, max_value=1.0), st.integers(0, 2**32 - 1))
def test_min_p_never_returns_filtered_token(logits, min_p, seed):
    sampler = Sampler(SamplerConfig(temperature=1.0, top_k=0, min_p=min_p, seed=seed))
    probs = _softmax(logits)
    for _ in range(5):
        tok = sampler.sample(logits, [])
        # small tolerance: the filter works on logits (log-space) in float64
        assert probs[tok] >= min_p * probs.max() * (1 - 1e-9)


@settings(max_examples=200, deadline=None)
@given(logit_arrays, st.floats(min_value=0.01, max_value=0.99), st.integers(0, 2**32 - 1))
def test_top_p_never_returns_token_outside_nucleus(logits, top_p, seed):
    sampler = Sampler(SamplerConfig(temperature=0.7, top_k=0, top_p=top_p, seed=seed))
    probs = _softmax(logits)
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    cum = np.cumsum(probs[order])
    n_keep = min(int(np.searchsorted(cum, top_p + 1e-9)) + 1, len(order))  # superset
    # tokens tied with the boundary one may legitimately be kept
    allowed = set(order[:n_keep].tolist()) | set(np.flatnonzero(logits >= logits[order[n_keep - 1]]).tolist())
    for _ in range(5):
        assert sampler.sample(logits, []) in allowed


def test_top_p_small_keeps_only_the_best():
    logits = np.array([1.0, 3.0, 2.0, 0.5])
    sampler = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.1, seed=0))
    assert {sampler.sample(logits, []) for _ in range(50)} == {1}


def test_top_k_restricts_support():
    logits = np.array([0.0, 5.0, 4.9, 4.8, -1.0, 4.7])
    sampler = Sampler(SamplerConfig(temperature=10.0, top_k=3, seed=1))
    seen = {sampler.sample(logits, []) for _ in range(300)}
    assert seen == {1, 2, 3}


@settings(max_examples=50, deadline=None)
@given(logit_arrays, st.integers(0, 2**32 - 1))
def test_same_seed_same_sequence(logits, seed):
    cfg = SamplerConfig(temperature=1.3, top_k=0, top_p=0.95, min_p=0.01, seed=seed)
    a, b = Sampler(cfg), Sampler(cfg)
    prev: list[int] = []
    seq_a = [a.sample(logits, prev) for _ in range(10)]
    seq_b = [b.sample(logits, prev) for _ in range(10)]
    assert seq_a == seq_b


def test_different_seeds_differ_and_distribution_is_sane():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    sampler = Sampler(SamplerConfig(temperature=1.0, top_k=0, seed=123))
    counts = np.bincount([sampler.sample(logits, []) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.04)
    seqs = {tuple(Sampler(SamplerConfig(temperature=1.0, top_k=0, seed=s)).sample(logits, [])
                  for _ in range(20)) for s in range(5)}
    assert len(seqs) > 1


def test_repetition_penalty_changes_argmax():
    logits = np.array([2.0, 1.9, -0.5, -3.0])
    greedy = SamplerConfig(temperature=0.0, repeat_penalty=1.5)
    assert Sampler(SamplerConfig(temperature=0.0)).sample(logits, [0]) == 0  # no penalty
    assert Sampler(greedy).sample(logits, [0]) == 1  # 2.0 / 1.5 < 1.9
    # a token outside the last-n window is not penalised
    windowed = SamplerConfig(temperature=0.0, repeat_penalty=1.5, repeat_last_n=2)
    assert Sampler(windowed).sample(logits, [0, 3, 3]) == 0
    # negative logits are multiplied (made less likely), not divided
    neg = np.array([-1.0, -1.2])
    assert Sampler(SamplerConfig(temperature=0.0, repeat_penalty=1.5)).sample(neg, [0]) == 1
    # repeated occurrences are penalised once, like llama.cpp
    assert Sampler(greedy).sample(np.array([2.0, 1.2]), [0, 0, 0]) == 0


def test_input_not_modified_and_validation():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    before = logits.copy()
    Sampler(SamplerConfig(temperature=0.0, repeat_penalty=2.0)).sample(logits, [2])
    assert np.array_equal(logits, before)
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1),
                dict(repeat_penalty=0.0), dict(repeat_last_n=-2)):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    with pytest.raises(ValueError):
        Sampler().sample(np.array([]), [])
    cfg = SamplerConfig()
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, cfg.repeat_penalty,
            cfg.repeat_last_n, cfg.seed) == (0.0, 40, 1.0, 0.0, 1.0, 64, None)
    with pytest.raises(Exception):
        cfg.temperature = 1.0  # frozen
