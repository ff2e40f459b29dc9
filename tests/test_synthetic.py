"""The synthetic model factory (toy_llm.testing.synthetic): files llama.cpp loads and runs sensibly.

Every family is written once per session (module-scoped cache), loaded in llama.cpp (the
llama-cpp-python oracle) and teacher-forced over 64 tokens; the llama family is quantized into every
supported type; the per-head layout is checked byte for byte against the fused tensors.
"""
from __future__ import annotations

import math
import zlib
import os
from collections import Counter

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from toy_llm.testing import synthetic as S  # noqa: E402

# Not in the training corpus of the merges, so tokenization exercises byte fallbacks too.
EVAL_TEXT = (
    "Once upon a time, in a small town by the sea, there lived an old clockmaker who repaired watches for "
    "the sailors. Every evening he wound the great clock in the square, and the children counted the "
    "chimes: one, two, three... until the night was quiet again. In 1887 a storm broke the tower's glass!"
)
N_EVAL = 64
MiB = 1 << 20
SIZE_LIMIT = {"qwen3": 25 * MiB}  # head_dim 128: q/o are 512x1024; everything else stays under 20 MiB


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Lazily written files, cached for the module: files(family) / files(family, quant_type)."""
    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[tuple, os.PathLike] = {}

    def get(family: str, qtype: str | None = None):
        key = (family, qtype)
        if key not in cache:
            if qtype is None:
                cache[key] = S.write_model(root / f"{family}.gguf", family, seed=0)
            else:
                cache[key] = S.quantize(get(family), root / f"{family}.{qtype}.gguf", qtype)
        return cache[key]

    get.root = root
    return get


def _open(path, n_ctx: int = 256):
    lc = _llama_cpp()
    return lc.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                    n_threads=os.cpu_count() or 1)


def _eval_tokens(llm) -> list[int]:
    toks = llm.tokenize(EVAL_TEXT.encode(), add_bos=False, special=False)
    assert len(toks) >= N_EVAL
    return toks[:N_EVAL]


def _teacher_forced(llm, toks) -> np.ndarray:
    llm.reset()
    llm.eval(list(toks))
    return np.array(llm.scores[: len(toks)], dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# no llama.cpp needed
# ------------------------------------------------------------------------------------------------

def test_vocab_is_gpt2_byte_level():
    v = S.synthetic_vocab()
    toks, types, merges = v["tokens"], v["token_types"], v["merges"]
    assert len(toks) == len(types) == S.N_VOCAB == 512
    assert len(set(toks)) == len(toks)
    assert toks[0] == "!" and toks[220] == "Ġ" and toks[188] == "Ā" and toks[198] == "Ċ"  # GPT-2's own ids
    assert (v["bos_id"], v["eos_id"]) == (510, 511) and toks[510:] == ["<|bos|>", "<|eos|>"]
    assert types[:510] == [1] * 510 and types[510:] == [3, 3]
    vocab = set(toks)
    for m in merges:
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    assert set(toks[256:510]) <= {m.replace(" ", "") for m in merges}


def test_family_config():
    assert set(S.FAMILIES) == {"llama", "llama_untied", "llama3_rope", "qwen2", "qwen3", "gemma2", "gemma3",
                               "mixtral", "qwen3moe", "olmoe", "granite"}
    for fam in S.FAMILIES:
        c = S.family_config(fam)
        assert (c["n_layers"], c["d_model"], c["n_heads"], c["d_ff"], c["context_length"]) == (2, 512, 8, 1024, 512)
        assert c["head_dim"] == (128 if fam == "qwen3" else 64)
        assert c["n_kv_heads"] == (8 if fam == "olmoe" else 2)
    assert S.family_config("gemma3")["llama_cpp"]["swa_layers"] == [0]
    assert S.family_config("gemma2")["llama_cpp"]["swa_layers"] == [0]
    assert S.family_config("granite")["llama_cpp"]["kq_scale"] == 0.25
    assert S.family_config("qwen3")["llama_cpp"]["kq_scale"] == 1 / math.sqrt(128)
    assert S.family_config("mixtral")["llama_cpp"]["moe_renormalize_topk"] is True
    assert S.family_config("olmoe")["llama_cpp"]["moe_renormalize_topk"] is False
    with pytest.raises(ValueError):
        S.family_config("gpt2")


def test_llama3_rope_factors_bite():
    c = S.family_config("llama3_rope")
    f = S.llama3_rope_factors(c["head_dim"], c["rope_theta"], **c["llama3_rope"])
    assert f.shape == (32,) and f.dtype == np.float32
    assert f[0] == 1.0 and f[-1] == 8.0
    assert ((f > 1.0) & (f < 8.0)).sum() >= 2  # the smooth band is populated


def test_write_is_deterministic(tmp_path):
    a = S.write_model(tmp_path / "a.gguf", "llama", seed=3).read_bytes()
    b = S.write_model(tmp_path / "b.gguf", "llama", seed=3).read_bytes()
    c = S.write_model(tmp_path / "c.gguf", "llama", seed=4).read_bytes()
    assert a == b and a != c and len(a) == len(c)


def _expected_shapes(c) -> dict[str, tuple[int, ...]]:
    """ggml ne of the main tensors of layer 0."""
    d, hd = c["d_model"], c["head_dim"]
    out = {"token_embd.weight": (d, c["n_vocab"]), "blk.0.attn_q.weight": (d, c["n_heads"] * hd),
           "blk.0.attn_k.weight": (d, c["n_kv_heads"] * hd), "blk.0.attn_v.weight": (d, c["n_kv_heads"] * hd),
           "blk.0.attn_output.weight": (c["n_heads"] * hd, d), "output_norm.weight": (d,)}
    if c["n_experts"]:
        ne, ff = c["n_experts"], c["d_ff_exp"]
        out |= {"blk.0.ffn_gate_inp.weight": (d, ne), "blk.0.ffn_gate_exps.weight": (d, ff, ne),
                "blk.0.ffn_up_exps.weight": (d, ff, ne), "blk.0.ffn_down_exps.weight": (ff, d, ne)}
    else:
        out |= {"blk.0.ffn_gate.weight": (d, c["d_ff"]), "blk.0.ffn_down.weight": (c["d_ff"], d)}
    if not c["tied_embeddings"]:
        out["output.weight"] = (d, c["n_vocab"])
    return out


@pytest.mark.parametrize("family", S.FAMILIES)
def test_file_layout(files, family):
    c = S.family_config(family)
    path = files(family)
    assert os.path.getsize(path) < SIZE_LIMIT.get(family, 20 * MiB)
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    a = c["arch"]
    assert kv["general.architecture"] == a
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert kv["tokenizer.ggml.add_bos_token"] is False
    assert kv[f"{a}.block_count"] == 2 and kv[f"{a}.embedding_length"] == 512
    assert kv[f"{a}.attention.head_count_kv"] == c["n_kv_heads"]
    tensors = {t.name: t for t in r.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    for name, ne in _expected_shapes(c).items():
        assert tuple(int(x) for x in tensors[name].shape) == ne, name
    assert ("output.weight" in tensors) == (not c["tied_embeddings"])
    if family == "qwen3":
        assert kv["qwen3.attention.key_length"] == kv["qwen3.attention.value_length"] == 128
    if family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensors)
    if family == "gemma2":
        assert (kv["gemma2.attn_logit_softcapping"], kv["gemma2.final_logit_softcapping"]) == (50.0, 30.0)
        assert kv["gemma2.attention.sliding_window"] == 16
    if family == "gemma3":
        assert kv["gemma3.attention.sliding_window"] == 16 and kv["gemma3.attention.sliding_window_pattern"] == 2
        assert (kv["gemma3.rope.freq_base"], kv["gemma3.rope.freq_base_swa"]) == (1e6, 1e4)
    if family in ("gemma2", "gemma3"):
        assert "blk.1.post_attention_norm.weight" in tensors and "blk.1.post_ffw_norm.weight" in tensors
    if family == "olmoe":
        assert tuple(tensors["blk.0.attn_q_norm.weight"].shape) == (512,)
        assert tuple(tensors["blk.0.attn_k_norm.weight"].shape) == (512,)
    if family in ("qwen3", "qwen3moe", "gemma3"):
        assert tuple(tensors["blk.0.attn_q_norm.weight"].shape) == (c["head_dim"],)
    if family == "qwen3moe":
        assert kv["qwen3moe.expert_feed_forward_length"] == 64
    if family in ("mixtral", "qwen3moe", "olmoe"):
        assert (kv[f"{a}.expert_count"], kv[f"{a}.expert_used_count"]) == (8, 2)
    if family == "granite":
        assert (kv["granite.embedding_scale"], kv["granite.residual_scale"], kv["granite.attention.scale"],
                kv["granite.logit_scale"]) == pytest.approx((12.0, 0.22, 0.25, 8.0))
    if family == "llama3_rope":
        rf = np.asarray(tensors["rope_freqs.weight"].data)
        np.testing.assert_array_equal(rf, S.llama3_rope_factors(64, 500000.0, 8.0, 1.0, 4.0, 64))


def test_unknown_inputs(tmp_path):
    with pytest.raises(ValueError):
        S.write_model(tmp_path / "x.gguf", "nope")
    with pytest.raises(ValueError):
        S.quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "IQ2_XXS")


# ------------------------------------------------------------------------------------------------
# llama.cpp runs them
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", S.FAMILIES)
def test_llama_cpp_runs_family(files, family):
    llm = _open(files(family))
    try:
        assert llm.n_vocab() == S.N_VOCAB
        toks = _eval_tokens(llm)
        assert llm.detokenize(toks).decode() == EVAL_TEXT[: len(llm.detokenize(toks).decode())]
        logits = _teacher_forced(llm, toks)
        assert np.isfinite(logits).all()
        am = logits.argmax(1)
        assert len(set(am.tolist())) >= N_EVAL // 2, "argmax barely changes across positions"
        assert np.mean(am == np.array(toks)) < 0.25, "the model mostly predicts its input token"
        top2 = np.sort(logits, axis=1)[:, -2:]
        assert np.median(top2[:, 1] - top2[:, 0]) > 0.05, "argmax is a near tie"
        assert 0.5 < logits.std() < 20.0
        # greedy continuation is not one repeated token
        llm.reset()
        llm.eval(toks[:16])
        out = []
        for _ in range(24):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        assert len(set(out)) >= 8, out
        assert max(Counter(out).values()) <= 8, out
    finally:
        llm.close()


def _variant(files, family, **changes):
    cfg = S.family_config(family)
    cfg.update(changes)
    name = "_".join(f"{k}{v}" for k, v in sorted(changes.items())).replace(" ", "").replace("'", "")
    return S.write_model(files.root / f"{family}.var.{zlib.crc32(name.encode()):08x}.gguf", family, config=cfg)


@pytest.mark.parametrize("family,changes,first_equal", [
    ("gemma2", {"sliding_window": 4096}, 16),   # window 16: only positions >= 16 can differ
    ("gemma3", {"sliding_window": 4096}, 16),
    ("gemma3", {"swa_pattern": 6}, 0),          # llama.cpp's default pattern: both layers SWA, local rope base
    ("gemma2", {"final_softcap": 1e6}, 0),
    ("llama3_rope", {"llama3_rope": dict(factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_context_length=64)}, 1),  # all factors 1 (pos 0: no rotation)
])
def test_feature_changes_llama_cpp_logits(files, family, changes, first_equal):
    """Each special hparam is live: turning it off moves llama.cpp's logits (and only where it should)."""
    ref_llm = _open(files(family))
    var_llm = _open(_variant(files, family, **changes))
    try:
        toks = _eval_tokens(ref_llm)
        a, b = _teacher_forced(ref_llm, toks), _teacher_forced(var_llm, toks)
    finally:
        ref_llm.close()
        var_llm.close()
    diff = np.abs(a - b).max(axis=1)
    if first_equal:
        assert diff[:first_equal].max() < 1e-4
    assert diff[first_equal:].max() > 0.1


# ------------------------------------------------------------------------------------------------
# quantization
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(S.QUANT_TYPES))
def test_quantize_llama(files, qtype):
    _llama_cpp()
    path = files("llama", qtype)
    counts = S.tensor_type_counts(path)
    assert counts == S.QUANT_OBSERVED[qtype]
    r = gguf.GGUFReader(str(path))
    bulk = Counter(t.tensor_type.name for t in r.tensors if len(t.shape) == 2 and t.name.startswith("blk."))
    assert bulk.most_common(1)[0][0] == qtype
    llm = _open(path, n_ctx=64)
    try:
        toks = _eval_tokens(llm)[:16]
        logits = _teacher_forced(llm, toks)
        assert np.isfinite(logits).all()
        if qtype in ("F32", "F16", "BF16", "Q8_0", "Q6_K"):
            ref = _open(files("llama"), n_ctx=64)
            try:
                want = _teacher_forced(ref, toks)
            finally:
                ref.close()
            assert np.mean(logits.argmax(1) == want.argmax(1)) >= 0.75
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------------
# per-head layout
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,qtype", [("llama", None), ("llama", "Q4_K"), ("llama", "Q8_0"),
                                          ("llama", "BF16"), ("qwen3", None), ("qwen2", None)])
def test_write_per_head_round_trip(files, family, qtype):
    if qtype is not None:
        _llama_cpp()
    src = files(family, qtype)
    dst = S.write_per_head(src, files.root / f"{family}.{qtype}.perhead.gguf")
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    c = S.family_config(family)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert b.fields["toy.ggml_native"].contents() is True
    for k, f in a.fields.items():
        if not k.startswith("GGUF."):
            assert b.fields[k].contents() == f.contents(), k

    def raw(t):
        return np.asarray(t.data).view(np.uint8).reshape(-1)

    n_split = 0
    for name, t in ta.items():
        if name.split(".")[-2] in ("attn_q", "attn_k", "attn_v") and name.endswith(".weight"):
            assert name not in tb
            n_heads = c["n_heads"] if ".attn_q." in name else c["n_kv_heads"]
            rows = raw(t).reshape(int(np.prod([int(x) for x in t.shape[1:]])), -1)
            hd = rows.shape[0] // n_heads
            assert hd == c["head_dim"]
            for h in range(n_heads):
                th = tb[name.replace(".weight", f".head_{h}.weight")]
                assert th.tensor_type == t.tensor_type
                assert tuple(int(x) for x in th.shape) == (c["d_model"], hd)
                assert raw(th).tobytes() == rows[h * hd:(h + 1) * hd].tobytes()
                n_split += 1
        else:
            assert tb[name].tensor_type == t.tensor_type
            assert tuple(tb[name].shape) == tuple(t.shape)
            assert raw(tb[name]).tobytes() == raw(t).tobytes()
    assert n_split == c["n_layers"] * (c["n_heads"] + 2 * c["n_kv_heads"])
    assert len(tb) == len(ta) - 3 * c["n_layers"] + n_split
