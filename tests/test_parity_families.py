"""Every architecture and weight type of the seed, proven against llama.cpp on synthetic models.

Models come from ``toy_llm.testing.synthetic`` (small random GGUFs that llama.cpp loads); the
quantized variants are made from the F32 file by llama.cpp's own quantizer. For each family x
weight type x KV setting we teacher-force N_POS positions (past the sliding window of 16 used by
the Gemma files) and compare logits with llama.cpp fed the same tokens one per ubatch (the
computation our per-head graph performs, see tests/test_parity_smollm2.py).

Bounds: the engine reproduces llama.cpp's kernels and reduction orders (KV padding, Hadamard
rotation of quantized caches, CPU_REPACK weight layout, MoE routing and summation order), and we
measure max |Δlogit| = 0 for every row of the matrix. The asserted bound, 1e-3 for every weight
type, only allows rounding-level noise: a structural difference (a wrong scale, mask, rope base,
or kernel) shows up as >0.1 on these models (see README, "Parity").
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import toy_llm
from oracle import greedy_reference, report, ubatch_logits

synthetic = pytest.importorskip("toy_llm.testing.synthetic")
lc = pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")

N_POS = 56
BOUND = 1e-3
ALL_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# The full sweep runs on the plain llama family; every other family is checked on the float types
# and on one type of each quantization kind (legacy 8-bit, legacy 4-bit, K-quant, 6-bit K-quant).
FAMILY_TYPES = {f: ("F32", "F16", "Q8_0", "Q4_0", "Q4_K", "Q6_K") for f in synthetic.FAMILIES}
FAMILY_TYPES["llama"] = ALL_TYPES
KV_SETTINGS = (("f32", False), ("q8_0", True))
MATRIX = [(f, t) for f in synthetic.FAMILIES for t in FAMILY_TYPES[f]]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic-models")


def model_file(model_dir, family: str, wtype: str):
    f32 = model_dir / f"{family}.F32.gguf"
    if not f32.exists():
        synthetic.write_model(f32, family)
    if wtype == "F32":
        return f32
    out = model_dir / f"{family}.{wtype}.gguf"
    if not out.exists():
        synthetic.quantize(f32, out, wtype)
    return out


_TOKENS: dict = {}


def teacher_tokens(path) -> list[int]:
    """N_POS tokens of the synthetic corpus, tokenized by llama.cpp (same vocab in every file)."""
    if "ids" not in _TOKENS:
        llm = lc.Llama(str(path), n_ctx=64, vocab_only=True, verbose=False)
        _TOKENS["ids"] = llm.tokenize(synthetic.CORPUS.encode(), add_bos=False)[:N_POS]
        llm.close()
    return _TOKENS["ids"]


@pytest.mark.parametrize("fused", [False, True], ids=["per_head", "fused_one_position_per_graph"])
@pytest.mark.parametrize("kv_type,flash", KV_SETTINGS, ids=["kv_f32", "kv_q8_0_fa"])
@pytest.mark.parametrize("family,wtype", MATRIX, ids=[f"{f}-{t}" for f, t in MATRIX])
def test_family_weight_type_logits(model_dir, family, wtype, kv_type, flash, fused):
    path = model_file(model_dir, family, wtype)
    tokens = teacher_tokens(path)
    ref = ubatch_logits(path, tokens, kv_type, flash, n_ctx=256)
    with toy_llm.load(path, max_T=256, kv_type=kv_type, flash_attn=flash,
                      graph="fused" if fused else "per_head", n_batch=1) as m:
        ours = m.eval(tokens)
    max_abs, agree = report(f"{family} {wtype} kv={kv_type}{' fused' if fused else ' per-head'}", ours, ref)
    assert agree == 1.0
    assert max_abs <= BOUND


@pytest.mark.parametrize("graph,n_batch", [("per_head", 1), ("fused", 1), ("fused", N_POS)])
@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_f16_kv_cache_matches_llama_cpp(model_dir, family, graph, n_batch):
    """llama.cpp's default KV type (F16, and so toy_llm.load's), Q4_K files of every family."""
    path = model_file(model_dir, family, "Q4_K")
    tokens = teacher_tokens(path)
    ref = ubatch_logits(path, tokens, "f16", False, n_batch, n_ctx=256)
    with toy_llm.load(path, max_T=256, kv_type="f16", graph=graph, n_batch=n_batch) as m:
        ours = m.eval(tokens)
    max_abs, agree = report(f"{family} Q4_K kv=f16 {graph} n_batch={n_batch}", ours, ref)
    assert agree == 1.0
    assert max_abs <= BOUND


# Q4_1, Q5_0 and Q8_0 batches go through the tiled kernels (tiles.c)
BATCHED_MATRIX = [(f, "Q4_K") for f in synthetic.FAMILIES] + [("llama", t) for t in ("F32", "F16", "Q8_0", "Q4_0", "Q6_K", "Q4_1", "Q5_0")]


@pytest.mark.parametrize("kv_type,flash", KV_SETTINGS, ids=["kv_f32", "kv_q8_0_fa"])
@pytest.mark.parametrize("family,wtype", BATCHED_MATRIX, ids=[f"{f}-{t}" for f, t in BATCHED_MATRIX])
def test_batched_prefill_matches_llama_cpp_batched(model_dir, family, wtype, kv_type, flash):
    """All N_POS positions in one fused-heads graph, then the rest of the way in graphs of 20,
    against llama.cpp evaluating them in ubatches of the same sizes."""
    path = model_file(model_dir, family, wtype)
    tokens = teacher_tokens(path)
    for n_batch in (N_POS, 20):
        ref = ubatch_logits(path, tokens, kv_type, flash, n_batch, n_ctx=256)
        with toy_llm.load(path, max_T=256, kv_type=kv_type, flash_attn=flash, n_batch=n_batch) as m:
            ours = m.eval(tokens)
        max_abs, agree = report(f"{family} {wtype} kv={kv_type} batched n_batch={n_batch}", ours, ref)
        assert agree == 1.0
        assert max_abs <= BOUND
    # only the last position's logits (the last layer runs on it alone, llama.cpp's inp_out_ids)
    ref_last = ubatch_logits(path, tokens, kv_type, flash, 20, n_ctx=256, last_only=True)
    with toy_llm.load(path, max_T=256, kv_type=kv_type, flash_attn=flash, n_batch=20) as m:
        last = m.eval(tokens, all_logits=False)
    max_abs, agree = report(f"{family} {wtype} kv={kv_type} batched n_batch=20, last logits only", last, ref_last)
    assert agree == 1.0 and max_abs <= BOUND


COPY_MATRIX = [("llama", t) for t in ALL_TYPES] + [(f, "Q4_K") for f in synthetic.FAMILIES if f != "llama"]


@pytest.mark.parametrize("fused", [False, True], ids=["per_head", "fused_one_position_per_graph"])
@pytest.mark.parametrize("family,wtype", COPY_MATRIX, ids=[f"{f}-{t}" for f, t in COPY_MATRIX])
def test_copy_loader_matches_llama_cpp(model_dir, family, wtype, fused):
    """The seed's legacy path (realize_for + load_weights) with the file's own types."""
    path = model_file(model_dir, family, wtype)
    tokens = teacher_tokens(path)[:24]
    ref = ubatch_logits(path, tokens, n_ctx=256)
    with toy_llm.load(path, max_T=256, loader="copy", graph="fused" if fused else "per_head", n_batch=1) as m:
        ours = m.eval(tokens)
    max_abs, agree = report(f"{family} {wtype} copy loader{' fused' if fused else ' per-head'}", ours, ref)
    assert agree == 1.0
    assert max_abs <= BOUND


@pytest.mark.parametrize("src_type,weight_type", [("F32", "Q8_0"), ("Q8_0", "F32"), ("Q4_K", "F32")])
def test_copy_loader_converts_weight_types(model_dir, src_type, weight_type):
    """realize_for with set_weight_type(F32 | Q8_0) converts the file's weights with ggml's own
    (de)quantizer: the loaded rows equal ggml's conversion of the file's rows, exactly."""
    from toy_llm import tinynn as tnn
    from toy_llm.engine import SmolLM2KVFFICache
    from toy_llm.gguf_load import load_config

    import gguf

    path = model_file(model_dir, "llama", src_type)
    cfg = load_config(path)
    to = {"F32": tnn.GGML_TYPE_F32, "Q8_0": tnn.GGML_TYPE_Q8_0}[weight_type]
    cache = SmolLM2KVFFICache()
    cache.repack_weights = False   # read the weights back as stored
    cache.apply_config(cfg)
    cache.set_weight_type(to)
    cache.realize_for(64, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv, cfg.n_layers, cfg.vocab, cfg.rope_base,
                      cfg.rms_eps, cfg.untied_output, cfg.qkv_bias)
    cache.load_weights(str(path))
    try:
        t = cache.kv_blocks_ffi[1].t_w_q[3]      # layer 1, head 3: rows 192..255 of attn_q
        assert tnn.tnn_tensor_type(t) == to
        src = next(x for x in gguf.GGUFReader(str(path)).tensors if x.name == "blk.1.attn_q.weight")
        raw = np.asarray(src.data).reshape(-1).view(np.uint8)
        row = tnn.tnn_row_size(int(src.tensor_type), cfg.d_model)
        rows = tnn.dequantize(int(src.tensor_type), raw[3 * 64 * row:4 * 64 * row], 64 * cfg.d_model)
        expect = tnn.quantize(to, rows.reshape(64, -1)) if to == tnn.GGML_TYPE_Q8_0 else rows
        got = tnn.download(cache.sess, t, raw=True).view(np.uint8 if to else np.float32).reshape(-1)
        np.testing.assert_array_equal(got, expect.reshape(-1))
        logits = cache.step(teacher_tokens(path)[0], 0)
        assert np.isfinite(logits).all()
    finally:
        cache.close()


@pytest.mark.parametrize("family", synthetic.FAMILIES)
def test_greedy_32_tokens_identical(model_dir, family):
    path = model_file(model_dir, family, "Q4_K")
    prompt = "The river ran quietly past the old mill"
    # both sides' defaults: llama.cpp n_batch = n_ubatch = 512 (the prompt in one ubatch, its last logits only)
    _, ref_text = greedy_reference(path, prompt, 32, n_ctx=256, n_batch=512, logits_all=False)
    with toy_llm.load(path, max_T=256) as m:
        text = m.generate(prompt, max_new_tokens=32)
    print(f"\n[greedy] {family}: {text!r}")
    assert text == ref_text


@pytest.mark.parametrize("family,wtype", [("llama", "F32"), ("qwen2", "Q8_0"), ("gemma3", "Q4_K"),
                                          ("mixtral", "Q6_K")])
def test_per_head_checkpoint_round_trip(model_dir, family, wtype):
    """The seed's toy checkpoint layout (one tensor per head, toy.ggml_native): detected and loaded by
    realize_for_mmap, giving the same logits as the fused file."""
    fused = model_file(model_dir, family, wtype)
    per_head = model_dir / f"{family}.{wtype}.per-head.gguf"
    if not per_head.exists():
        synthetic.write_per_head(fused, per_head)
    tokens = teacher_tokens(fused)[:20]
    # F32 KV: the seed's class below keeps the seed's default cache type
    with toy_llm.load(fused, max_T=64, n_batch=1, kv_type="f32") as m:
        ref = m.eval(tokens)
    with pytest.raises(ValueError, match="graph='per_head'"):
        toy_llm.load(per_head, max_T=64)
    with toy_llm.load(per_head, max_T=64, graph="per_head", kv_type="f32") as m:
        assert m.cache.per_head_attn
        ours = m.eval(tokens)
    np.testing.assert_array_equal(ours, ref)
    # and the seed's dispatch on toy.ggml_native takes the mmap path for it
    from toy_llm.engine import SmolLM2KVFFICache
    from toy_llm.gguf_load import load_config

    cfg = load_config(per_head)
    cache = SmolLM2KVFFICache(n_threads=os.cpu_count())
    cache.apply_config(cfg)
    handle = cache.realize_and_load_auto(per_head, 64, cfg)
    try:
        assert handle is not None and cache.per_head_attn
        np.testing.assert_array_equal(cache.step(tokens[0], 0), ref[0])
    finally:
        cache.close()
