"""Reading and changing activations: hook points, run_with_cache / run_with_hooks, built-in
interventions, Python hooks, control vectors. References: the unhooked engine for identity (a hook
that changes nothing must change no bit), the clean run for patching, a rewritten F32 GGUF for head
ablation, and llama.cpp's own control vectors (llama_set_adapter_cvec) for control vectors."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

import toy_llm
from toy_llm.engine.hook_points import HOOK_POINTS
from toy_llm.engine.interventions import AddVector, Patch, Scale, ZeroHeads
from toy_llm.testing import synthetic

from oracle import report, ubatch_oracle

GRAPHS = [("per_head", 1), ("fused", 512)]
TOKENS = [65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("hooks")
    return {f: synthetic.write_model(d / f"{f}.gguf", f) for f in ("llama", "mixtral", "gemma2")}


@pytest.mark.parametrize("graph,n_batch", GRAPHS)
@pytest.mark.parametrize("family", ["llama", "mixtral", "gemma2"])
def test_identity_hooks_change_no_bit(models, family, graph, n_batch):
    """A Python hook on every hook point that returns its input (or None) gives the logits of no hook."""
    seen = set()

    def same(x, name):
        seen.add(name)
        return x

    with toy_llm.load(models[family], max_T=64, graph=graph, n_batch=n_batch) as m:
        plain = m.eval(TOKENS)
        hooked = m.run_with_hooks(TOKENS, [(lambda name: True, same)])
        untouched = m.run_with_hooks(TOKENS, [(lambda name: True, lambda x, name: None)])
        after = m.run_with_hooks(TOKENS, [])
    np.testing.assert_array_equal(hooked, plain)
    np.testing.assert_array_equal(untouched, plain)
    np.testing.assert_array_equal(after, plain)
    assert {"hook_embed", "blocks.1.attn.hook_q", "blocks.1.attn.hook_z", "hook_logits"} <= seen
    assert not any(n.endswith("hook_pattern") for n in seen)   # read-only: a filter skips it


@pytest.mark.parametrize("graph,n_batch", GRAPHS)
def test_run_with_cache_names_and_shapes(models, graph, n_batch):
    with toy_llm.load(models["llama"], max_T=64, graph=graph, n_batch=n_batch) as m:
        cfg = m.config
        logits, cache = m.run_with_cache(TOKENS)
        np.testing.assert_array_equal(logits, m.run_with_hooks(TOKENS, []))
        n = len(TOKENS)
        assert cache["hook_embed"].shape == (n, cfg.d_model)
        assert cache["blocks.1.attn.hook_q"].shape == (n, cfg.n_heads, cfg.head_dim)
        assert cache["blocks.1.attn.hook_k"].shape == (n, cfg.n_kv, cfg.head_dim)
        assert cache["blocks.0.mlp.hook_post"].shape == (n, cfg.d_ff)
        pattern = cache["blocks.0.attn.hook_pattern"]
        assert pattern.shape[:2] == (n, cfg.n_heads)
        np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)                 # probabilities
        assert np.all(pattern[np.arange(n)[:, None], :, np.arange(n)[:, None] + 1] == 0) if n < pattern.shape[-1] \
            else True                                                                 # causal: nothing ahead
        np.testing.assert_array_equal(cache["hook_logits"], logits)
        # the residual stream adds up: resid_post = resid_mid + mlp_out
        np.testing.assert_allclose(cache["blocks.1.hook_resid_post"],
                                   cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"], atol=1e-5)
        only = m.run_with_cache(TOKENS, names=["blocks.0.hook_resid_pre", "hook_logits"])[1]
        assert set(only) == {"blocks.0.hook_resid_pre", "hook_logits"}
        np.testing.assert_array_equal(only["blocks.0.hook_resid_pre"], cache["hook_embed"])
        assert set(m.run_with_cache(TOKENS, names=lambda s: s.endswith("hook_z"))[1]) == \
            {f"blocks.{i}.attn.hook_z" for i in range(cfg.n_layers)}
        with pytest.raises(KeyError, match="unknown hook point 'blocks.0.hook_nothing'"):
            m.run_with_cache(TOKENS, names=["blocks.0.hook_nothing"])
        with pytest.raises(ValueError, match="read-only"):
            m.run_with_hooks(TOKENS, [("blocks.0.attn.hook_pattern", lambda x, name: x)])
        with pytest.raises(KeyError, match="unknown hook point 'blocks.0.hook_nope'"):
            m.run_with_hooks(TOKENS, [("blocks.0.hook_nope", lambda x, name: x)])
        np.testing.assert_array_equal(m.run_with_hooks(TOKENS, []), logits)   # a refused hook leaves nothing behind


def test_every_table_row_is_traced_somewhere(models):
    """The README's table is the set of names the graphs produce (dense, MoE and Gemma rows)."""
    names = set()
    for family in ("llama", "mixtral", "gemma2"):
        with toy_llm.load(models[family], max_T=64) as m:
            names |= {n.split(".", 2)[2] if n.startswith("blocks.") else n for n in m.run_with_cache(TOKENS)[1]}
            lens = m.run_with_cache(TOKENS, names=lambda n: n.endswith("hook_lens_logits"))[1]
            assert len(lens) == m.config.n_layers
            names |= {"hook_lens_logits"}
    assert names == {h.name for h in HOOK_POINTS}


def test_flash_attention_has_no_pattern(models):
    with toy_llm.load(models["llama"], max_T=64, flash_attn=True) as m:
        with pytest.raises(ValueError, match="flash attention computes the attention pattern inside one op"):
            m.run_with_cache(TOKENS, names=["blocks.0.attn.hook_pattern"])
        assert "blocks.0.attn.hook_pattern" not in m.run_with_cache(TOKENS)[1]


@pytest.mark.parametrize("graph,n_batch", GRAPHS)
def test_zero_ablating_a_head_three_ways(models, tmp_path, graph, n_batch):
    """Head 3 of layer 1 zeroed: by the built-in (a ggml mul in the graph), by a Python hook, and in
    the weights (its columns of attn_output.weight zeroed in a rewritten F32 GGUF): the same logits."""
    from test_engine_api import rewrite_gguf

    L, h = 1, 3
    with toy_llm.load(models["llama"], max_T=64, graph=graph, n_batch=n_batch) as m:
        dh = m.config.head_dim
        plain = m.eval(TOKENS)
        builtin = m.run_with_hooks(TOKENS, [(f"blocks.{L}.attn.hook_z", ZeroHeads((h,)))])

        def zero(x, name):
            x[:, h] = 0
            return x
        python = m.run_with_hooks(TOKENS, [(f"blocks.{L}.attn.hook_z", zero)])

    def cut(name, data):
        if name == f"blk.{L}.attn_output.weight":
            data = data.copy()
            data[:, h * dh:(h + 1) * dh] = 0
        return data
    edited = rewrite_gguf(models["llama"], tmp_path / "ablated.gguf", cut)
    with toy_llm.load(edited, max_T=64, graph=graph, n_batch=n_batch) as m:
        weights = m.eval(TOKENS)
    print(f"\n[hooks] zero-ablating L{L}H{h} ({graph}): max|Δlogit| vs plain {np.abs(builtin - plain).max():.3g}; "
          f"built-in vs Python hook {np.abs(builtin - python).max()}, vs zeroed weights {np.abs(builtin - weights).max()}")
    assert np.abs(builtin - plain).max() > 1e-2
    np.testing.assert_array_equal(builtin, python)
    np.testing.assert_array_equal(builtin, weights)


def test_scale_and_add_vector_are_what_they_say(models):
    with toy_llm.load(models["llama"], max_T=64) as m:
        D = m.config.d_model
        v = np.linspace(-1, 1, D, dtype=np.float32)
        base = m.run_with_cache(TOKENS, names=["blocks.1.hook_resid_mid"])[1]["blocks.1.hook_resid_mid"]
        with m.hooks(("blocks.1.hook_resid_mid", AddVector(v, 0.5))):
            added = m.run_with_cache(TOKENS, names=["blocks.1.hook_resid_mid"])[1]["blocks.1.hook_resid_mid"]
        with m.hooks(("blocks.1.hook_resid_mid", Scale(2.0))):
            scaled = m.run_with_cache(TOKENS, names=["blocks.1.hook_resid_mid"])[1]["blocks.1.hook_resid_mid"]
    np.testing.assert_array_equal(added, base + np.float32(0.5) * v)
    np.testing.assert_array_equal(scaled, 2 * base)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")
    from toy_llm.fetch import fetch

    return fetch("smollm2")


@pytest.mark.parametrize("graph,n_batch", GRAPHS)
def test_patching_the_clean_residual_gives_the_clean_logits(smollm2, graph, n_batch):
    clean, corrupt = "The Eiffel Tower is in", "The Colosseum is in"
    with toy_llm.load(smollm2, max_T=64, graph=graph, n_batch=n_batch) as m:
        assert len(m.tokenize(clean)) == len(m.tokenize(corrupt))
        clean_logits, cache = m.run_with_cache(clean, names=["blocks.0.hook_resid_pre"])
        corrupt_logits = m.run_with_hooks(corrupt, [])
        patched = m.run_with_hooks(corrupt, [("blocks.0.hook_resid_pre", Patch(cache["blocks.0.hook_resid_pre"]))])
        paris = m.tokenize(" Paris", add_bos=False)[0]
    assert clean_logits[-1].argmax() == paris != corrupt_logits[-1].argmax()
    np.testing.assert_array_equal(patched, clean_logits)


def test_hooks_apply_under_generate_and_errors_surface(smollm2):
    with toy_llm.load(smollm2, max_T=64) as m:
        plain = m.generate("The capital of France is", max_new_tokens=4)
        calls = []
        with m.hooks(("blocks.3.hook_resid_post", lambda x, name: calls.append(x.shape[0]))):
            same = m.generate("The capital of France is", max_new_tokens=4)
        assert same == plain and calls[0] == len(m.tokenize("The capital of France is")) and calls[1:] == [1, 1, 1]
        with m.hooks(("blocks.3.hook_resid_post", Scale(0.0))):
            assert m.generate("The capital of France is", max_new_tokens=4) != plain

        def broken(x, name):
            raise RuntimeError("boom in a hook")
        with pytest.raises(RuntimeError, match="boom in a hook"):
            m.run_with_hooks("Hello", [("blocks.0.hook_resid_post", broken)])
        with pytest.raises(ValueError, match="returned shape"):
            m.run_with_hooks("Hello", [("blocks.0.hook_resid_post", lambda x, name: x[:, :3])])
        assert m.generate("The capital of France is", max_new_tokens=4) == plain   # nothing left behind


def test_control_vector_matches_llama_cpp(smollm2, tmp_path):
    """The same random vector (norm 3 per layer, layers 1..n-1) applied by us and by llama.cpp's
    llama_set_adapter_cvec, 64 positions, both at their defaults' batch (one ubatch of 512)."""
    import gguf

    from oracle import PARITY_TEXT, oracle_logits

    rng = np.random.default_rng(0)
    with toy_llm.load(smollm2, max_T=512) as m:
        L, D = m.config.n_layers, m.config.d_model
        vec = np.zeros((L, D), np.float32)
        vec[1:] = (rng.standard_normal((L - 1, D)) * (3.0 / np.sqrt(D))).astype(np.float32)
        tokens = m.tokenize(PARITY_TEXT)[:64]
        plain = m.eval(tokens)
        m.reset()
        m.set_control_vector(vec)
        ours = m.eval(tokens)
        # the same vector through llama.cpp's control-vector GGUF format, at half strength
        path = tmp_path / "cvec.gguf"
        w = gguf.GGUFWriter(str(path), "controlvector")
        for il in range(1, L):
            w.add_tensor(f"direction.{il}", vec[il])
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        m.reset()
        m.set_control_vector(path, strength=2.0, layers=(1, L - 1))
        from_file = m.eval(tokens)
        m.reset()
        m.set_control_vector(None)
        np.testing.assert_array_equal(m.eval(tokens), plain)
    llm = ubatch_oracle(smollm2, n_batch=512)
    try:
        buf = np.ascontiguousarray(vec[1:]).reshape(-1)
        lc = pytest.importorskip("llama_cpp")
        assert lc.llama_set_adapter_cvec(llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), buf.size,
                                         D, 1, L - 1) == 0
        ref = oracle_logits(llm, tokens)
        llm.reset()
        buf2 = (2 * buf).astype(np.float32)
        assert lc.llama_set_adapter_cvec(llm._ctx.ctx, buf2.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                         buf2.size, D, 1, L - 1) == 0
        ref2 = oracle_logits(llm, tokens)
    finally:
        llm.close()
    assert np.abs(ref - plain).max() > 0.5                                   # the vector does something
    max_abs, agree = report("SmolLM2 control vector (array) vs llama_set_adapter_cvec", ours, ref)
    assert agree == 1.0 and max_abs <= 1e-3
    max_abs, agree = report("SmolLM2 control vector (GGUF, strength 2) vs llama.cpp", from_file, ref2)
    assert agree == 1.0 and max_abs <= 1e-3
    assert os.path.getsize(path) > 0
