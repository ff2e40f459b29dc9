"""Each weight is stored once: anonymous memory (RssAnon) that a load adds is one copy of the
weights for the copy loader, and one copy of the repacked weights for the mmap loader, beyond
what a load whose weights all stay in the file's pages adds (the tokenizer, the graph arena and
the KV cache, the same in every run). Each figure comes from a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from toy_llm.fetch import fetch

SLACK_MIB = 4.0   # allocator noise; a second copy of the attention matrices is ~9 MiB on SmolLM2, ~10 on Gemma 3

_PROBE = textwrap.dedent("""
    import json, sys
    from toy_llm import tinynn as tnn
    from toy_llm.engine import EngineOptions, SmolLM2KVFFICache
    from toy_llm.gguf_load import load_config
    from toy_llm.tokenizer import Tokenizer

    from toy_llm.testing.procmem import status_kib

    def anon_kib():   # after malloc_trim: glibc's retained free heap (the copy loader's temporaries) is not counted
        return status_kib('RssAnon')

    path, loader, repack = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
    before = anon_kib()
    cfg = load_config(path)
    tok = Tokenizer.from_gguf(path)
    c = SmolLM2KVFFICache(options=EngineOptions(loader=loader, repack_weights=repack, weight_type=None))
    c.apply_config(cfg)
    if loader == 'mmap':
        c.realize_for_mmap(tnn.tnn_gguf_load(path), cfg, 256, cfg.untied_output, cfg.qkv_bias)
    else:
        c.realize_for(256, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv, cfg.n_layers, cfg.vocab, cfg.rope_base,
                      cfg.rms_eps, cfg.untied_output, cfg.qkv_bias, d_head=cfg.head_dim)
        c.load_weights(path)
    for i, t in enumerate(tok.encode('The capital of France is')):
        c.step(t, i)
    growth = anon_kib() - before
    g = tnn.tnn_gguf_load(path)
    weights = sum(tnn.tnn_gguf_tensor_nbytes(g, i) for i in range(tnn.tnn_gguf_n_tensors(g)))
    tnn.tnn_gguf_free(g)
    w = c.engine.weights
    mats = [w.token_embd, w.output] + [getattr(b, f) for b in w.layers for f in (
        't_w_q_all', 't_w_k_all', 't_w_v_all', 't_w_o', 't_w_gate', 't_w_up', 't_w_down', 't_w_router',
        't_w_gate_exps', 't_w_up_exps', 't_w_down_exps')]
    repacked = sum(tnn.tnn_tensor_nbytes(t) for t in mats if t is not None and tnn.tnn_tensor_is_repacked(c.sess, t) == 1)
    kv = sum(tnn.tnn_tensor_nbytes(t) for t in c.kv_cache.k_layers + c.kv_cache.v_layers)
    print(json.dumps(dict(growth_mib=growth / 1024, weights_mib=weights / 2**20, repacked_mib=repacked / 2**20,
                          kv_mib=kv / 2**20)))
""")


def _probe(path, loader: str, repack: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), loader, "1" if repack else "0"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("model", ["smollm2", "gemma3-270m"])
def test_each_weight_is_stored_once(model):
    path = fetch(model)
    base = _probe(path, "mmap", repack=False)      # every weight in the file's pages
    mapped = _probe(path, "mmap", repack=True)     # + the repacked matmul weights, copied as llama.cpp does
    copied = _probe(path, "copy", repack=True)     # every weight in the session's buffer
    print(f"\n[rss] {model}: anonymous growth, mmap without repacking {base['growth_mib']:.1f} MiB (tokenizer, "
          f"graph arena, KV cache {base['kv_mib']:.1f} MiB); mmap {mapped['growth_mib']:.1f} MiB with "
          f"{mapped['repacked_mib']:.1f} MiB of repacked weights; copy loader {copied['growth_mib']:.1f} MiB "
          f"for {copied['weights_mib']:.1f} MiB of weights")
    extra_mapped = mapped["growth_mib"] - base["growth_mib"]
    extra_copied = copied["growth_mib"] - base["growth_mib"]
    print(f"[rss] {model}: beyond the file-backed load: mmap +{extra_mapped:.1f} MiB (one copy of the repacked "
          f"weights: {mapped['repacked_mib']:.1f}), copy +{extra_copied:.1f} MiB (one copy of the weights: "
          f"{copied['weights_mib']:.1f})")
    assert extra_mapped <= mapped["repacked_mib"] + SLACK_MIB
    assert extra_copied <= copied["weights_mib"] + SLACK_MIB
    assert extra_copied >= 0.9 * copied["weights_mib"]   # the measurement sees the weights at all
    if model == "gemma3-270m":                           # Q4_K is repacked on AVX2 / NEON machines
        assert mapped["repacked_mib"] == 0 or extra_mapped >= 0.9 * mapped["repacked_mib"]
