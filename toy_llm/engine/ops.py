"""Stateless graph builders, in the spirit of llama.cpp's build_norm / build_ffn / build_moe_ffn /
build_attn: each takes what it needs as arguments and returns the tensor it built. Arch
differences come in as ModelConfig fields, never as arch names."""
from __future__ import annotations

import numpy as np

from .. import tinynn as tnn
from ..ggml_types import GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0
from ..gguf_load import ModelConfig
from .cache import KVCache


def f32_div(a: float, b: float) -> float:
    """a / b rounded to float32, as llama.cpp computes its scale constants (1.0f / x)."""
    return float(np.float32(a) / np.float32(b))


def norm(sess, x, gamma, cfg: ModelConfig):
    return tnn.tnn_rms_norm(sess, x, gamma, cfg.rms_eps)


def rope(sess, x, positions, cfg: ModelConfig, il: int, freq_factors):
    """ggml_rope_ext with the layer's base (Gemma's sliding-window layers have their own)."""
    rs = cfg.rope_scaling
    return tnn.tnn_rope_ext(sess, x, positions, cfg.rope_dim, cfg.layer_rope_base[il], rs.freq_scale, rs.ext_factor,
                            rs.attn_factor, rs.beta_fast, rs.beta_slow, freq_factors, cfg.rope_mode, rs.orig_max_pos)


def softcap(sess, x, cap: float):
    """cap * tanh(x / cap); a no-op when cap is 0."""
    if cap <= 0.0:
        return x
    x = tnn.tnn_scale(sess, x, f32_div(1.0, cap))
    return tnn.tnn_scale(sess, tnn.tnn_tanh(sess, x), cap)


# the types the tiled kernels take, each with the column counts of x for which ggml's own kernel is
# faster on the bench machine (README, "Speed"): Q5_0 at 2-3 columns, where tinyBLAS's 4 x 2 tiles
# already share half the unpacking
TILED_TYPES = {GGML_TYPE_Q4_1: (), GGML_TYPE_Q5_0: (2, 3), GGML_TYPE_Q8_0: ()}


def tiled_matmul(sess, w, x):
    """w x, as tnn_matmul computes it, through a tiled kernel (tnn_mul_mat_tiles: bit for bit
    ggml_mul_mat's numbers, up to 2x as fast) where w's type is in TILED_TYPES, x's column count is
    not one ggml is faster at, and the shim takes the pair (tnn_tiles_apply: a 2-D Q4_1/Q5_0/Q8_0
    weight this machine runs the kernel for, a 2-D F32 x with contiguous rows); through tnn_matmul
    otherwise."""
    ggml_faster = TILED_TYPES.get(tnn.tnn_tensor_type(w))
    if ggml_faster is not None and tnn.tnn_tensor_ne(x, 1) not in ggml_faster and tnn.tnn_tiles_apply(sess, w, x):
        return tnn.tnn_mul_mat_tiles(sess, w, x)
    return tnn.tnn_matmul(sess, w, x)


def project(sess, w, x, bias=None, lora=None, adapter=None, mm=tnn.tnn_matmul):
    """mm(w, x) (+ B (A x) for a LoRA pair ``lora`` = (A, B)) (+ s B' (A' x) for an inference adapter
    ``adapter`` = (A', B', s)) (+ bias): both before the bias, as HF and llama.cpp place them.
    The adapter term is llama.cpp's build_lora_mm: ggml_scale of B (A x) by s (always, also at
    s = 1), then added to w x. ``mm`` is the weight product (BuildContext.mm)."""
    t = mm(sess, w, x)
    if lora is not None:
        a, b = lora
        t = tnn.tnn_add(sess, t, tnn.tnn_matmul(sess, b, tnn.tnn_matmul(sess, a, x)))
    if adapter is not None:
        a, b, s = adapter
        t = tnn.tnn_add(sess, t, tnn.tnn_scale(sess, tnn.tnn_matmul(sess, b, tnn.tnn_matmul(sess, a, x)), s))
    return t if bias is None else tnn.tnn_add(sess, t, bias)


def qk_norm(sess, t, gamma, cfg: ModelConfig):
    """RMS-normalise queries or keys t [heads * d_head, tokens] (or one head's [d_head, 1]).
    kind 1 (Qwen3, Gemma 3): each head's d_head row, one shared [d_head] gamma; returns
    [d_head, heads * tokens]. kind 2 (OLMoE): the whole projected vector, as llama.cpp does."""
    if cfg.qk_norm_kind == 2:
        return tnn.tnn_rms_norm(sess, t, gamma, cfg.rms_eps)
    if tnn.tnn_tensor_ne(t, 0) != cfg.head_dim:
        t = tnn.tnn_reshape_2d(sess, t, cfg.head_dim, tnn.tnn_tensor_ne(t, 0) * tnn.tnn_tensor_ne(t, 1) // cfg.head_dim)
    return tnn.tnn_rms_norm(sess, t, gamma, cfg.rms_eps)


def finish_q(sess, q, cfg: ModelConfig, cache: KVCache, n_vecs: int):
    """Gemma's pre-scaled Q (llama.cpp scales Q itself, then attends with scale 1), and the
    rotation into a quantized K cache's basis. Returns (q, the attention scale)."""
    scale = cfg.kq_scale
    if cfg.q_prescale:
        q = tnn.tnn_scale(sess, q, scale)
        scale = 1.0
    return cache.rotate_k(q, n_vecs), scale


def attend(sess, cache: KVCache, q, k, v, mask, scale: float, cap: float, probs_tap=None):
    """softmax(K q * scale + mask) V, as llama.cpp's build_attn_mha.

    q: [d_head, tokens, query heads(, streams)]; k, v: cache views [d_head, length, KV heads(,
    streams)] (v transposed [length, d_head, KV heads(, streams)] for a v_trans cache; ggml gives query head h the KV head
    h // (query heads / KV heads), llama.cpp's GQA); mask: [length, tokens] or None. Returns the
    heads of each token joined: [d_head * query heads, tokens]. ``probs_tap(probs)`` sees the
    attention probabilities [length, tokens, heads] (plain attention only) and returns them."""
    Dh = cache.d_head
    n_tok, n_q, ns = tnn.tnn_tensor_ne(q, 1), tnn.tnn_tensor_ne(q, 2), tnn.tnn_tensor_ne(q, 3)
    if cache.flash_attn:
        # llama.cpp: flash attention reads an F32 cache as F16 (it casts K and V), so do we
        if cache.type_k == GGML_TYPE_F32:
            k = tnn.tnn_cast(sess, k, GGML_TYPE_F16)
        if cache.type_v == GGML_TYPE_F32:
            v = tnn.tnn_cast(sess, v, GGML_TYPE_F16)
        out = tnn.tnn_flash_attn_ext(sess, q, k, v, mask, scale, 0.0, cap)   # [d_head, heads, tokens, streams]
        heads = cache.rotate_v(tnn.tnn_reshape_2d(sess, out, Dh, n_q * n_tok * ns), n_q * n_tok * ns)
        return tnn.tnn_reshape_2d(sess, heads, Dh * n_q, n_tok * ns)
    scores = tnn.tnn_matmul(sess, k, q)                                       # [length, tokens, heads, streams]
    if mask is not None:
        # llama.cpp order: soft-cap the raw scores, then softmax(scores * scale + mask)
        probs = tnn.tnn_softmax_ext(sess, softcap(sess, scores, cap), mask, scale, 0.0)
    else:
        probs = tnn.tnn_softmax(sess, softcap(sess, tnn.tnn_scale(sess, scores, scale), cap))
    if probs_tap is not None:
        probs = probs_tap(probs)
    v_t = v if cache.v_trans else tnn.tnn_transpose(sess, v)                  # [length, d_head, heads, streams]
    heads = tnn.tnn_matmul(sess, v_t, probs)                                  # [d_head, tokens, heads, streams]
    if n_tok > 1:
        heads = tnn.tnn_cont(sess, tnn.tnn_permute(sess, heads, 0, 2, 1, 3))
    return tnn.tnn_reshape_2d(sess, heads, Dh * n_q, n_tok * ns)


def ffn_act(sess, t, cfg: ModelConfig):
    return tnn.tnn_gelu(sess, t) if cfg.ffn_act == "gelu" else tnn.tnn_silu(sess, t)


def ffn(sess, x, blk, cfg: ModelConfig, tap, il: int, mm):
    """Gated FFN: down(act(gate x) * up x), each product mm(sess, w, x) (BuildContext.mm)."""
    gate = tap(mm(sess, blk.t_w_gate, x), "mlp.hook_pre", il)
    up = tap(mm(sess, blk.t_w_up, x), "mlp.hook_pre_linear", il)
    if cfg.ffn_act == "silu":   # one op, as llama.cpp's build_ffn (LLM_FFN_SILU, LLM_FFN_PAR)
        gated = tap(tnn.tnn_swiglu_split(sess, gate, up), "mlp.hook_post", il)
    else:
        gated = tap(tnn.tnn_mul(sess, ffn_act(sess, gate, cfg), up), "mlp.hook_post", il)
    return mm(sess, blk.t_w_down, gated)


def moe_ffn(sess, x, blk, cfg: ModelConfig, tap, il: int):
    """Routed FFN, as llama.cpp's build_moe_ffn: softmax router -> the top-k experts in descending
    order -> (renormalised) weights -> gated FFN per expert -> weighted sum, summed expert by
    expert in that order."""
    K, E, D = cfg.n_experts_used, cfg.n_experts, cfg.d_model
    n = tnn.tnn_tensor_ne(x, 1)                                                   # tokens
    logits = tap(tnn.tnn_matmul(sess, blk.t_w_router, x), "mlp.hook_router_logits", il)
    probs = tnn.tnn_softmax(sess, logits)                                         # [E, n]
    top = tnn.tnn_argsort_top_k(sess, probs, K)                                   # [K, n]
    w = tnn.tnn_get_rows(sess, tnn.tnn_reshape_3d(sess, probs, 1, E, n), top)     # [1, K, n]
    if cfg.expert_weights_norm:
        w2 = tnn.tnn_reshape_2d(sess, w, K, n)
        total = tnn.tnn_clamp(sess, tnn.tnn_sum_rows(sess, w2), 6.103515625e-5, float("inf"))
        w = tnn.tnn_reshape_3d(sess, tnn.tnn_div(sess, w2, total), 1, K, n)
    if cfg.expert_weights_scale not in (0.0, 1.0):
        w = tnn.tnn_scale(sess, w, cfg.expert_weights_scale)
    if n > 1:
        x = tnn.tnn_reshape_3d(sess, x, D, 1, n)
    up = tnn.tnn_mul_mat_id(sess, blk.t_w_up_exps, x, top)                        # [d_ff, K, n]
    gate = tnn.tnn_mul_mat_id(sess, blk.t_w_gate_exps, x, top)
    act = tnn.tnn_mul(sess, ffn_act(sess, gate, cfg), up)
    down = tap(tnn.tnn_mul_mat_id(sess, blk.t_w_down_exps, act, top), "mlp.hook_expert_out", il)  # [D, K, n]
    weighted = tnn.tnn_mul(sess, down, w)
    row = D * 4
    out = tnn.tnn_view_2d(sess, weighted, D, n, row * K, 0)
    for k in range(1, K):
        out = tnn.tnn_add(sess, out, tnn.tnn_view_2d(sess, weighted, D, n, row * K, k * row))
    return tnn.tnn_cont(sess, out) if K == 1 else out
