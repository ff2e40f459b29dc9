"""Synthetic model factory: small random GGUF files that llama.cpp loads and runs.

One file per model family, every one with the same small shape (2 layers, d_model 512, 8 query heads,
2 KV heads, head_dim 64, d_ff 1024, context 512) unless the family needs otherwise, and a small
gpt2-style byte-level BPE vocabulary of 512 tokens (the 256 byte tokens in GPT-2's byte-to-unicode
order, 254 merges learnt from a fixed English text, then ``<|bos|>`` and ``<|eos|>``).  Weights are random
normal, deterministic in ``seed``, scaled so that llama.cpp's logits are finite, of moderate size and
have an argmax that changes from position to position (greedy continuations are not one repeated
token).  All weights are F32; :func:`quantize` turns a file into any of :data:`QUANT_TYPES` with
llama.cpp's own quantizer; :func:`write_per_head` rewrites a file into the per-head attention layout of
the seed's "toy from-scratch checkpoint" (#153).

    from toy_llm.testing.synthetic import write_model, quantize, write_per_head, family_config
    p = write_model(tmp / "gemma2.gguf", "gemma2", seed=0)
    q = quantize(p, tmp / "gemma2.q4_k.gguf", "Q4_K")

What llama.cpp (the 0.3.36 vendored copy) does with each family is recorded in :func:`family_config`
(``llama_cpp`` entries): rope type, the attention scale it actually uses, the SWA layer pattern,
whether top-k expert weights are renormalised, and so on.
"""
from __future__ import annotations

import ctypes
import math
import os
import re
import zlib
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = ("llama", "llama_untied", "llama3_rope", "qwen2", "qwen3", "gemma2", "gemma3",
            "mixtral", "qwen3moe", "olmoe", "granite")

# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------

N_VOCAB = 512
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"

# Text the merges are learnt from (and a handy source of test prompts).
CORPUS = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden screw press into a system that could produce books far "
    "faster than any scribe. Within fifty years, presses were operating in more than two hundred cities across "
    "Europe, and millions of volumes had been printed. Scholars argue about how much the new technology caused "
    "the Reformation, the scientific revolution and the rise of literacy, but few doubt that it changed how "
    "ideas travelled. The river ran quietly past the old mill, where the miller and his daughter watched "
    "the water turn the wheel from morning until the evening bells. In the winter the ice came down from "
    "the hills and the wheel stood still, and the village waited for the spring. Numbers are the other half "
    "of the story: 1, 2, 3, 10, 42, 100, 2024 and 3.14159 all have to survive the trip through the tokenizer. "
    "A language model reads text as a sequence of tokens, computes a probability for every possible next "
    "token, and then picks one. When we test an engine we compare those numbers, position by position, "
    "against a reference that we trust, and we want the differences to be small and to stay small as the "
    "context grows. The quick brown fox jumps over the lazy dog; the five boxing wizards jump quickly. "
    "She sells sea shells on the sea shore, and the shells she sells are surely sea shells. "
    "What is the capital of France? Paris is the capital of France, and Berlin is the capital of Germany. "
    "Every morning the students walked to the school at the end of the street, talking about the weather, "
    "their teachers, and the games they would play in the afternoon."
)

# ASCII approximation of GPT-2's pre-tokenizer, used only to learn merges.
_TRAIN_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")


def _gpt2_bytes_to_unicode() -> tuple[list[int], list[str]]:
    """GPT-2's byte -> printable-unicode map, as (bytes in vocab order, their characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs, [chr(c) for c in cs]


@lru_cache(maxsize=None)
def synthetic_vocab() -> dict[str, Any]:
    """The shared byte-level BPE vocabulary: ``tokens``, ``token_types``, ``merges``, ``bos_id``, ``eos_id``.

    Tokens 0..255 are GPT-2's byte tokens in GPT-2's own order (token 0 is ``!``, byte 0x20 is ``Ġ`` = 220),
    then one token per learnt merge (in merge-rank order), then ``<|bos|>`` (510) and ``<|eos|>`` (511),
    both CONTROL (type 3); every other token is NORMAL (type 1).
    """
    byte_order, byte_chars = _gpt2_bytes_to_unicode()
    b2u = dict(zip(byte_order, byte_chars))
    tokens = list(byte_chars)
    known = set(tokens)

    words = Counter()
    for w in _TRAIN_SPLIT.findall(CORPUS):
        words[tuple(b2u[b] for b in w.encode("utf-8"))] += 1

    merges: list[str] = []
    n_target = N_VOCAB - 2
    while len(tokens) < n_target:
        pairs: Counter = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            raise RuntimeError("synthetic vocab: corpus too small for the requested merges")
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # most frequent, ties by text (deterministic)
        a, b = best
        merges.append(f"{a} {b}")
        if a + b not in known:
            known.add(a + b)
            tokens.append(a + b)
        new_words: Counter = Counter()
        for word, freq in words.items():
            out = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += freq
        words = new_words

    tokens += [BOS_TOKEN, EOS_TOKEN]
    types = [1] * (len(tokens) - 2) + [3, 3]
    return {"tokens": tokens, "token_types": types, "merges": merges,
            "bos_id": len(tokens) - 2, "eos_id": len(tokens) - 1}


# ---------------------------------------------------------------------------------------------
# family configurations
# ---------------------------------------------------------------------------------------------

_BASE: dict[str, Any] = dict(
    arch="llama", n_layers=2, d_model=512, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=1024,
    n_vocab=N_VOCAB, context_length=512, rms_eps=1e-5, rope_theta=10000.0,
    tied_embeddings=True, qkv_bias=False, qk_norm=None, ffn_act="silu", post_norms=False,
    n_experts=0, n_experts_used=0, d_ff_exp=0,
    sliding_window=None, swa_pattern=None, rope_theta_swa=None, attn_softcap=None, final_softcap=None,
    embedding_scale=None, residual_scale=None, attention_scale=None, logit_scale=None,
    llama3_rope=None,
)

# init knobs (std of random normal draws); "gain" multiplies 1/sqrt(fan_in)
_INIT: dict[str, Any] = dict(emb_std=0.1, out_std=None, lin_gain=1.0, q_gain=1.0, k_gain=1.0,
                             norm_gamma=1.0, norm_jitter=0.1, out_norm_gamma=1.0, post_norm_gamma=1.0,
                             qk_norm_gamma=1.0, bias_std=0.0, router_gain=3.0, ffn_down_gain=1.0)

# Tied embeddings: logit_j = h . e_j, so whatever part of the final hidden state is the current token's own
# embedding scores that token ~sqrt(d_model) times higher than the rest, and greedy decoding repeats it
# forever.  Tied families therefore use small embeddings (the attention/FFN branches dominate the residual
# stream) and a larger final-norm gamma to bring the logits back to a useful size.
_TIED = dict(emb_std=0.02, out_norm_gamma=6.0, ffn_down_gain=3.0)

_MOE_FF = 64  # expert width: keeps 8-expert files < 20 MB (2-layer, F32)

_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(init=dict(_TIED)),
    "llama_untied": dict(tied_embeddings=False, init=dict(emb_std=1.0, out_std=0.1)),
    "llama3_rope": dict(rope_theta=500000.0, tied_embeddings=False,
                        llama3_rope=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_context_length=64),
                        init=dict(emb_std=1.0, out_std=0.1)),
    "qwen2": dict(arch="qwen2", rms_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                  init=dict(_TIED, bias_std=0.1)),
    "qwen3": dict(arch="qwen3", head_dim=128, rms_eps=1e-6, rope_theta=1000000.0, qk_norm="head",
                  init=dict(_TIED)),
    # Gemma: tied, embeddings scaled by sqrt(d_model) and every branch post-normed, so the embedding must be
    # tiny for the branches to dominate; the final-norm gamma then sets the logit size -- for gemma2 large
    # enough (|logit| up to ~26) that the final softcap of 30 bends them, and q/k gains make attention
    # scores reach the region where the 50 softcap matters.
    "gemma2": dict(arch="gemma2", rms_eps=1e-6, ffn_act="gelu", post_norms=True, sliding_window=16,
                   swa_pattern=2, attn_softcap=50.0, final_softcap=30.0,
                   init=dict(emb_std=0.004, q_gain=2.5, k_gain=2.5, out_norm_gamma=100.0)),
    "gemma3": dict(arch="gemma3", rms_eps=1e-6, ffn_act="gelu", post_norms=True, qk_norm="head",
                   rope_theta=1000000.0, rope_theta_swa=10000.0, sliding_window=16, swa_pattern=2,
                   init=dict(emb_std=0.004, out_norm_gamma=40.0, qk_norm_gamma=2.0)),
    "mixtral": dict(arch="llama", tied_embeddings=False, n_experts=8, n_experts_used=2, d_ff_exp=_MOE_FF,
                    rope_theta=1000000.0, init=dict(emb_std=1.0, out_std=0.1)),
    "qwen3moe": dict(arch="qwen3moe", rms_eps=1e-6, rope_theta=1000000.0, qk_norm="head", tied_embeddings=False,
                     n_experts=8, n_experts_used=2, d_ff_exp=_MOE_FF, init=dict(emb_std=1.0, out_std=0.1)),
    # llama.cpp's OLMoE creates attn_k_norm with n_embd elements, i.e. it assumes n_kv_heads == n_heads
    "olmoe": dict(arch="olmoe", n_kv_heads=8, qk_norm="full", tied_embeddings=False, n_experts=8,
                  n_experts_used=2, d_ff_exp=_MOE_FF, init=dict(emb_std=1.0, out_std=0.1)),
    "granite": dict(arch="granite", tied_embeddings=False, embedding_scale=12.0, residual_scale=0.22,
                    attention_scale=0.25, logit_scale=8.0,
                    init=dict(emb_std=1.0 / 12.0, out_std=1.0, lin_gain=3.0)),
}


def _llama_cpp_notes(cfg: dict[str, Any]) -> dict[str, Any]:
    """What llama.cpp 0.3.36 does with a file of this configuration (read off src/models/*.cpp)."""
    arch = cfg["arch"]
    rope_type = "norm" if arch in ("llama", "granite") else "neox"
    kq_scale = 1.0 / math.sqrt(cfg["head_dim"])
    if cfg["attention_scale"]:
        kq_scale = cfg["attention_scale"]
    swa_layers: list[int] = []
    if cfg["swa_pattern"]:
        p = cfg["swa_pattern"]
        swa_layers = [il for il in range(cfg["n_layers"]) if il % p < p - 1]
    notes: dict[str, Any] = {
        "rope_type": rope_type,               # norm = adjacent pairs (x[2i], x[2i+1]); neox = halves
        "kq_scale": kq_scale,                 # what multiplies q.k before softmax
        "swa_layers": swa_layers,             # layers using the sliding window (and rope_theta_swa)
        "embed_scale": None, "norm_weight": "multiply by the stored gamma (no +1)",
    }
    if arch in ("gemma2", "gemma3"):
        notes["embed_scale"] = math.sqrt(cfg["d_model"])
        notes["norm_weight"] = ("multiply by the stored gamma: the HF converter already stored 1+w, "
                                "so llama.cpp adds nothing")
        notes["ffn_act"] = "gelu (tanh approximation), gate*up"
        notes["query_pre_attn_scalar"] = ("not read: llama.cpp computes 1/sqrt(head_dim) from "
                                          "attention.key_length (1/sqrt(d_model/n_heads) for 46/62-layer 27B)")
    if arch == "granite":
        notes["embed_scale"] = cfg["embedding_scale"]
        notes["granite"] = ("embeddings *= embedding_scale; each attention/FFN branch output *= residual_scale "
                            "before its residual add; kq_scale = attention.scale; logits /= logit_scale")
    if cfg["n_experts"]:
        notes["moe_gating"] = "softmax over all experts, then top-k"
        notes["moe_renormalize_topk"] = arch in ("llama", "qwen3moe")  # olmoe: false
        notes["moe_weights_scale"] = None  # expert_weights_scale is 0 (unused) for all three
    if cfg["qk_norm"]:
        notes["qk_norm"] = ("RMSNorm per head over head_dim, before rope" if cfg["qk_norm"] == "head"
                            else "RMSNorm over the whole q (n_heads*head_dim) / k (n_kv*head_dim) vector, "
                                 "before the per-head reshape and rope")
    if cfg["llama3_rope"]:
        notes["rope_freqs"] = "theta_i = pos * base^(-2i/head_dim) / rope_freqs[i] (ggml_rope_ext freq_factors)"
    return notes


def family_config(family: str) -> dict[str, Any]:
    """The dimensions, hyper-parameters and init knobs of ``family`` (a fresh dict each call).

    Keys: ``arch`` (general.architecture), ``n_layers``, ``d_model``, ``n_heads``, ``n_kv_heads``, ``head_dim``,
    ``d_ff``, ``n_vocab``, ``context_length``, ``rms_eps``, ``rope_theta``, ``tied_embeddings``, ``qkv_bias``,
    ``qk_norm`` (None / "head" / "full"), ``ffn_act``, ``post_norms`` (Gemma post-attention/post-FFN norms),
    ``n_experts``, ``n_experts_used``, ``d_ff_exp``, ``sliding_window``, ``swa_pattern``, ``rope_theta_swa``,
    ``attn_softcap``, ``final_softcap``, ``embedding_scale``, ``residual_scale``, ``attention_scale``,
    ``logit_scale``, ``llama3_rope`` (dict or None), ``init`` (weight scales), ``llama_cpp`` (what llama.cpp
    derives from all this: rope type, kq scale, SWA layers, MoE renormalisation, ...).
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    spec = _FAMILIES[family]
    cfg = dict(_BASE)
    cfg.update({k: v for k, v in spec.items() if k != "init"})
    cfg["init"] = {**_INIT, **spec.get("init", {})}
    if cfg["llama3_rope"]:
        cfg["llama3_rope"] = dict(cfg["llama3_rope"])
    cfg["family"] = family
    cfg["llama_cpp"] = _llama_cpp_notes(cfg)
    return cfg


def llama3_rope_factors(head_dim: int, base: float, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_context_length: int) -> np.ndarray:
    """Llama-3 frequency factors exactly as llama.cpp's HF converter computes ``rope_freqs.weight``."""
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = original_context_length / low_freq_factor
    high_wavelen = original_context_length / high_freq_factor
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_context_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

class _Gen:
    """Per-tensor deterministic draws: the same (seed, name) always gives the same numbers."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def normal(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)


def _tensors(cfg: dict[str, Any], seed: int) -> list[tuple[str, np.ndarray]]:
    """(name, F32 array in numpy order = reversed ggml ne) for every tensor of the file, in file order."""
    g = _Gen(seed)
    ini = cfg["init"]
    d, hd, nh, nkv = cfg["d_model"], cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    nq, nk = nh * hd, nkv * hd
    V = cfg["n_vocab"]

    def lin(name: str, n_out: int, n_in: int, gain: float | None = None, *lead: int) -> np.ndarray:
        gain = ini["lin_gain"] if gain is None else gain
        return g.normal(name, (*lead, n_out, n_in), gain / math.sqrt(n_in))

    def norm(name: str, n: int, gamma: float | None = None) -> np.ndarray:
        gamma = ini["norm_gamma"] if gamma is None else gamma
        return g.normal(name, (n,), ini["norm_jitter"] * gamma, mean=gamma)

    out: list[tuple[str, np.ndarray]] = [("token_embd.weight", g.normal("token_embd.weight", (V, d), ini["emb_std"]))]
    if cfg["llama3_rope"]:
        out.append(("rope_freqs.weight", llama3_rope_factors(hd, cfg["rope_theta"], **cfg["llama3_rope"])))
    for il in range(cfg["n_layers"]):
        p = f"blk.{il}."
        t = out.append
        t((p + "attn_norm.weight", norm(p + "attn_norm.weight", d)))
        t((p + "attn_q.weight", lin(p + "attn_q.weight", nq, d, ini["q_gain"] * ini["lin_gain"])))
        t((p + "attn_k.weight", lin(p + "attn_k.weight", nk, d, ini["k_gain"] * ini["lin_gain"])))
        t((p + "attn_v.weight", lin(p + "attn_v.weight", nk, d)))
        if cfg["qkv_bias"]:
            for nm, n in (("attn_q.bias", nq), ("attn_k.bias", nk), ("attn_v.bias", nk)):
                t((p + nm, g.normal(p + nm, (n,), ini["bias_std"])))
        if cfg["qk_norm"] == "head":
            t((p + "attn_q_norm.weight", norm(p + "attn_q_norm.weight", hd, ini["qk_norm_gamma"])))
            t((p + "attn_k_norm.weight", norm(p + "attn_k_norm.weight", hd, ini["qk_norm_gamma"])))
        elif cfg["qk_norm"] == "full":
            t((p + "attn_q_norm.weight", norm(p + "attn_q_norm.weight", nq, ini["qk_norm_gamma"])))
            t((p + "attn_k_norm.weight", norm(p + "attn_k_norm.weight", nk, ini["qk_norm_gamma"])))
        t((p + "attn_output.weight", lin(p + "attn_output.weight", d, nq)))
        if cfg["post_norms"]:
            t((p + "post_attention_norm.weight", norm(p + "post_attention_norm.weight", d, ini["post_norm_gamma"])))
        t((p + "ffn_norm.weight", norm(p + "ffn_norm.weight", d)))
        if cfg["n_experts"]:
            ne, ff = cfg["n_experts"], cfg["d_ff_exp"]
            t((p + "ffn_gate_inp.weight", lin(p + "ffn_gate_inp.weight", ne, d, ini["router_gain"])))
            t((p + "ffn_gate_exps.weight", lin(p + "ffn_gate_exps.weight", ff, d, None, ne)))
            t((p + "ffn_up_exps.weight", lin(p + "ffn_up_exps.weight", ff, d, None, ne)))
            # top-2 of 64-wide experts: scale the down projections up so the MoE branch is not negligible
            t((p + "ffn_down_exps.weight", lin(p + "ffn_down_exps.weight", d, ff, 2.0 * ini["lin_gain"], ne)))
        else:
            ff = cfg["d_ff"]
            t((p + "ffn_gate.weight", lin(p + "ffn_gate.weight", ff, d)))
            t((p + "ffn_up.weight", lin(p + "ffn_up.weight", ff, d)))
            t((p + "ffn_down.weight", lin(p + "ffn_down.weight", d, ff, ini["ffn_down_gain"] * ini["lin_gain"])))
        if cfg["post_norms"]:
            t((p + "post_ffw_norm.weight", norm(p + "post_ffw_norm.weight", d, ini["post_norm_gamma"])))
    out.append(("output_norm.weight", norm("output_norm.weight", d, ini["out_norm_gamma"])))
    if not cfg["tied_embeddings"]:
        out.append(("output.weight", g.normal("output.weight", (V, d), ini["out_std"])))
    return out


def _write_kv(w: Any, cfg: dict[str, Any]) -> None:
    import gguf

    a = cfg["arch"]
    w.add_string("general.name", f"toy-synthetic-{cfg['family']}")
    w.add_uint32("general.file_type", 0)  # LLAMA_FTYPE_ALL_F32
    w.add_uint32(f"{a}.context_length", cfg["context_length"])
    w.add_uint32(f"{a}.embedding_length", cfg["d_model"])
    w.add_uint32(f"{a}.block_count", cfg["n_layers"])
    ff = cfg["d_ff_exp"] if (cfg["n_experts"] and a != "qwen3moe") else cfg["d_ff"]
    w.add_uint32(f"{a}.feed_forward_length", ff)
    w.add_uint32(f"{a}.attention.head_count", cfg["n_heads"])
    w.add_uint32(f"{a}.attention.head_count_kv", cfg["n_kv_heads"])
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", cfg["rms_eps"])
    w.add_float32(f"{a}.rope.freq_base", cfg["rope_theta"])
    if cfg["head_dim"] != cfg["d_model"] // cfg["n_heads"] or a in ("qwen3", "qwen3moe", "gemma2", "gemma3"):
        # what the HF converter writes whenever config.json has head_dim
        w.add_uint32(f"{a}.attention.key_length", cfg["head_dim"])
        w.add_uint32(f"{a}.attention.value_length", cfg["head_dim"])
    if a in ("llama", "granite"):
        w.add_uint32(f"{a}.rope.dimension_count", cfg["head_dim"])
    w.add_uint32(f"{a}.vocab_size", cfg["n_vocab"])
    if cfg["n_experts"]:
        w.add_uint32(f"{a}.expert_count", cfg["n_experts"])
        w.add_uint32(f"{a}.expert_used_count", cfg["n_experts_used"])
        if a == "qwen3moe":
            w.add_uint32(f"{a}.expert_feed_forward_length", cfg["d_ff_exp"])
    if cfg["sliding_window"]:
        w.add_uint32(f"{a}.attention.sliding_window", cfg["sliding_window"])
    if cfg["swa_pattern"] and a == "gemma3":
        # llama.cpp's default for gemma3 is 6 (layers il % 6 < 5 are SWA): with 2 layers both would be SWA.
        w.add_uint32(f"{a}.attention.sliding_window_pattern", cfg["swa_pattern"])
    if cfg["rope_theta_swa"]:
        w.add_float32(f"{a}.rope.freq_base_swa", cfg["rope_theta_swa"])
    if cfg["attn_softcap"]:
        w.add_float32(f"{a}.attn_logit_softcapping", cfg["attn_softcap"])
    if cfg["final_softcap"]:
        w.add_float32(f"{a}.final_logit_softcapping", cfg["final_softcap"])
    for key in ("embedding_scale", "residual_scale", "logit_scale"):
        if cfg[key] is not None:
            w.add_float32(f"{a}.{key}", cfg[key])
    if cfg["attention_scale"] is not None:
        w.add_float32(f"{a}.attention.scale", cfg["attention_scale"])

    v = synthetic_vocab()
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "gpt-2")
    w.add_array("tokenizer.ggml.tokens", v["tokens"])
    w.add_key_value("tokenizer.ggml.token_type", v["token_types"], gguf.GGUFValueType.ARRAY,
                    sub_type=gguf.GGUFValueType.INT32)
    w.add_array("tokenizer.ggml.merges", v["merges"])
    w.add_uint32("tokenizer.ggml.bos_token_id", v["bos_id"])
    w.add_uint32("tokenizer.ggml.eos_token_id", v["eos_id"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)


def write_model(path: str | os.PathLike, family: str, *, seed: int = 0,
                config: dict[str, Any] | None = None) -> Path:
    """Write a random F32 GGUF of ``family`` (one of :data:`FAMILIES`) to ``path``; deterministic in ``seed``.

    ``config`` (optional) is a :func:`family_config` dict of the same family, edited, e.g. to switch a
    feature off and see that llama.cpp's numbers move (``cfg["sliding_window"] = 4096``).  Each tensor's
    draws depend only on (seed, tensor name), so variants share every weight they have in common.
    """
    import gguf

    cfg = family_config(family) if config is None else dict(config, family=family)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), cfg["arch"])
    try:
        _write_kv(w, cfg)
        for name, arr in _tensors(cfg, seed):
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return path


# ---------------------------------------------------------------------------------------------
# quantization (llama.cpp's own quantizer)
# ---------------------------------------------------------------------------------------------

# name -> (llama_ftype constant, ggml type of the bulk of the 2-D weights)
# For the K-quants the _S ("small") mix is used for Q3_K/Q4_K/Q5_K: it keeps the requested type on most 2-D
# weights, while the _M/_L mixes upgrade attn_v / ffn_down (and more) to higher types (Q3_K_M: 8 of 14 Q3_K).
# Q2_K uses LLAMA_FTYPE_MOSTLY_Q2_K: Q2_K_S refuses to run without an importance matrix.
QUANT_TYPES: dict[str, str] = {
    "F32": "LLAMA_FTYPE_ALL_F32",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "Q3_K": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
}

# Observed tensor types (F32-source "llama" family, tied embeddings, 2 layers) -- see quantize().
# ``tensor_type_counts`` of quantize(write_model(..., "llama"), ..., name) with llama.cpp 0.3.36 (20 tensors:
# 5 F32 norms, tied token_embd, 7 2-D weights x 2 layers).  Other families (observed, not pinned here):
# an untied ``output.weight`` becomes Q6_K for every type below Q8_0 while token_embd takes the bulk type;
# with 8 experts llama.cpp makes attn_k/attn_v Q8_0 for the 4/5-bit types, keeps ffn_gate_inp F32, and the
# 64-wide ffn_down_exps rows (not a multiple of 256) fall back from K-quants to Q5_0 (Q4_K) and similar.
QUANT_OBSERVED: dict[str, dict[str, int]] = {
    "F32": {"F32": 20},
    "F16": {"F32": 5, "F16": 15},
    "BF16": {"F32": 5, "BF16": 15},
    "Q8_0": {"F32": 5, "Q8_0": 15},                       # tied token_embd stays Q8_0
    "Q4_0": {"F32": 5, "Q6_K": 1, "Q4_0": 14},            # tied token_embd (= output) -> Q6_K
    "Q4_1": {"F32": 5, "Q6_K": 1, "Q4_1": 14},
    "Q5_0": {"F32": 5, "Q6_K": 1, "Q5_0": 14},
    "Q5_1": {"F32": 5, "Q6_K": 1, "Q5_1": 14},
    "Q2_K": {"F32": 5, "Q6_K": 1, "Q2_K": 8, "Q3_K": 4, "Q4_K": 2},  # attn_v Q4_K; attn_output, ffn_down Q3_K
    "Q3_K": {"F32": 5, "Q6_K": 1, "Q3_K": 14},
    "Q4_K": {"F32": 5, "Q6_K": 1, "Q4_K": 12, "Q5_K": 2},  # attn_v Q5_K
    "Q5_K": {"F32": 5, "Q6_K": 1, "Q5_K": 14},
    "Q6_K": {"F32": 5, "Q6_K": 15},
}


def quantize(src_path: str | os.PathLike, dst_path: str | os.PathLike, ggml_type_name: str,
             *, nthread: int | None = None) -> Path:
    """Quantize ``src_path`` into ``dst_path`` with llama.cpp (``llama_model_quantize``).

    ``ggml_type_name`` is one of :data:`QUANT_TYPES` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
    Q3_K, Q4_K, Q5_K, Q6_K); it is mapped to the LLAMA_FTYPE in ``QUANT_TYPES`` (for K-quants the ``_S``
    mix, which makes the bulk of the 2-D weights the requested type; Q2_K uses the plain MOSTLY_Q2_K mix
    because Q2_K_S needs an importance matrix; Q6_K has only one mix).  Defaults
    are llama.cpp's (``llama_model_quantize_default_params``), so llama.cpp's own per-tensor choices apply:
    1-D tensors (norms, biases, rope_freqs) and ``ffn_gate_inp`` stay F32, the (tied) token embedding /
    output get their own type, and some K-quant mixes upgrade attn_v / ffn_down.  What a given file ended
    up with is what :func:`tensor_type_counts` reports; see QUANT_OBSERVED for the llama family.
    """
    import llama_cpp

    name = ggml_type_name.upper()
    if name not in QUANT_TYPES:
        raise ValueError(f"unsupported quant type {ggml_type_name!r}; expected one of {list(QUANT_TYPES)}")
    src, dst = Path(src_path), Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[name])
    params.nthread = nthread or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {name}) failed with {rc}")
    return dst


def tensor_type_counts(path: str | os.PathLike) -> dict[str, int]:
    """{ggml type name: number of tensors of that type} for a GGUF file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return dict(Counter(t.tensor_type.name for t in r.tensors))


# ---------------------------------------------------------------------------------------------
# per-head layout (#153)
# ---------------------------------------------------------------------------------------------

_SKIP_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
_FUSED_QKV = re.compile(r"^blk\.(\d+)\.attn_([qkv])\.weight$")


def _raw_bytes(t: Any) -> np.ndarray:
    """A tensor's bytes as uint8 in numpy order (reversed ggml ne), the last axis holding one row's bytes."""
    ne = [int(x) for x in t.shape]
    raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
    assert raw.size == int(t.n_bytes), (t.name, raw.size, t.n_bytes)
    lead = list(reversed(ne[1:]))
    n_rows = int(np.prod(lead)) if lead else 1
    return raw.reshape(*lead, raw.size // n_rows)


def write_per_head(src_path: str | os.PathLike, dst_path: str | os.PathLike) -> Path:
    """Copy ``src_path`` to ``dst_path`` with attention projections stored one tensor per head.

    Every KV pair and tensor is copied, except that ``blk.N.attn_q.weight`` becomes
    ``blk.N.attn_q.head_H.weight`` for H in 0..n_heads-1 (rows H*head_dim..(H+1)*head_dim, ggml ne
    ``[d_model, head_dim]``, same type, raw bytes copied), and likewise ``attn_k`` / ``attn_v`` for each KV
    head; the fused tensors are dropped and the bool ``toy.ggml_native = True`` is added.  Works for any
    source type (a row of a quantized tensor is a whole number of blocks).  llama.cpp cannot load the
    result; it is a layout for toy_llm's own loader.
    """
    import gguf

    src, dst = Path(src_path), Path(dst_path)
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()

    def kv_int(key: str, default: int | None = None) -> int:
        f = r.fields.get(f"{arch}.{key}")
        if f is None:
            if default is None:
                raise KeyError(f"{arch}.{key}")
            return default
        v = f.contents()
        return int(v[0] if isinstance(v, list) else v)

    d_model = kv_int("embedding_length")
    n_heads = kv_int("attention.head_count")
    n_kv = kv_int("attention.head_count_kv", n_heads)
    head_k = kv_int("attention.key_length", d_model // n_heads)
    head_v = kv_int("attention.value_length", d_model // n_heads)

    dst.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(dst), arch)
    try:
        for key, field in r.fields.items():
            if key in _SKIP_KEYS:
                continue
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, field.contents(), vtype)
        w.add_bool("toy.ggml_native", True)

        for t in r.tensors:
            raw = _raw_bytes(t)
            m = _FUSED_QKV.match(t.name)
            if m is None:
                w.add_tensor(t.name, raw, raw_dtype=t.tensor_type)
                continue
            rows = raw.reshape(-1, raw.shape[-1])
            il, which = m.group(1), m.group(2)
            n_h, hd = (n_heads, head_k) if which == "q" else (n_kv, head_k if which == "k" else head_v)
            if int(t.shape[0]) != d_model or rows.shape[0] != n_h * hd:
                raise ValueError(f"{t.name}: ne {list(map(int, t.shape))} does not match {n_h} heads x {hd}")
            for h in range(n_h):
                part = np.ascontiguousarray(rows[h * hd:(h + 1) * hd])
                w.add_tensor(f"blk.{il}.attn_{which}.head_{h}.weight", part, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return dst
