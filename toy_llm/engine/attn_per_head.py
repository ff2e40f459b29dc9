"""The seed's attention block: every query head its own chain (matmul -> norm -> rope -> attend
against its KV head), one position per graph. The reference the fused block is checked against;
each head's Q/K/V weight is a view of the layer's whole matrix."""
from __future__ import annotations

from .. import tinynn as tnn
from .context import BuildContext
from .inputs import GraphInputs
from .ops import attend, finish_q, project, qk_norm, rope


def _q_projection(b: BuildContext, blk, hq: int, h):
    """Query head ``hq`` before norm and rope: W_q[hq] h (+ B A h, the trainable LoRA-Q slots)
    (+ s B[hq] (A h), an inference adapter: B[hq] the head's d_head rows of the whole B, so each
    element is the same dot product llama.cpp's whole-matrix product computes) (+ bias)."""
    lora = (blk.t_w_lora_a_q[hq], blk.t_w_lora_b_q[hq]) if b.weights.lora_rank else None
    adapter = None
    if b.weights.lora_q_scale is not None and blk.t_lora_q_a is not None:
        adapter = (blk.t_lora_q_a, blk.t_lora_q_b_heads[hq], b.weights.lora_q_scale)
    return project(b.sess, blk.t_w_q[hq], h, blk.t_b_q[hq] if blk.t_b_q else None, lora, adapter, b.mm)


def _normed_heads(b: BuildContext, heads: list, gamma) -> list:
    """QK-norm of per-head vectors [d_head, 1]: each alone (kind 1), or joined, normalised and
    viewed apart again (kind 2, OLMoE's whole-vector norm)."""
    sess, cfg = b.sess, b.cfg
    if cfg.qk_norm_kind != 2:
        return [qk_norm(sess, t, gamma, cfg) for t in heads]
    whole = heads[0]
    for t in heads[1:]:
        whole = tnn.tnn_concat(sess, whole, t, 0)
    whole = qk_norm(sess, whole, gamma, cfg)
    row = cfg.head_dim * 4
    return [tnn.tnn_view_2d(sess, whole, cfg.head_dim, 1, row, h * row) for h in range(len(heads))]


def write_kv_heads(b: BuildContext, inp: GraphInputs, il: int, h) -> None:
    """Each KV head's K (projected, normed, roped) and V into the cache at the graph's position."""
    sess, cfg, blk = b.sess, b.cfg, b.weights.layers[il]
    k_pre = [project(sess, blk.t_w_k[g], h, blk.t_b_k[g] if blk.t_b_k else None, mm=b.mm) for g in range(cfg.n_kv)]
    if cfg.qk_norm_kind:
        k_pre = _normed_heads(b, k_pre, blk.t_k_norm_gamma)
    k = b.tap.heads([rope(sess, k_pre[g], inp.positions, cfg, il, b.weights.rope_freqs) for g in range(cfg.n_kv)],
                    "attn.hook_k", il)
    v = b.tap.heads([project(sess, blk.t_w_v[g], h, blk.t_b_v[g] if blk.t_b_v else None, mm=b.mm)
                     for g in range(cfg.n_kv)],
                    "attn.hook_v", il)
    for g in range(cfg.n_kv):
        b.cache.write_at(il, g, b.cache.rotate_k(k[g], 1), b.cache.rotate_v(v[g], 1), inp.last_pos)


def roped_query(b: BuildContext, inp: GraphInputs, il: int, hq: int, h, q_normed=None):
    """Query head ``hq`` projected, normed and roped; ``q_normed``: after a whole-vector QK-norm,
    when the block computed it."""
    sess, cfg, blk = b.sess, b.cfg, b.weights.layers[il]
    q = q_normed
    if q is None:
        q = _q_projection(b, blk, hq, h)
        if cfg.qk_norm_kind:
            q = qk_norm(sess, q, blk.t_q_norm_gamma, cfg)
    return rope(sess, q, inp.positions, cfg, il, b.weights.rope_freqs)


def query_head(b: BuildContext, inp: GraphInputs, il: int, hq: int, h, q_normed=None, q_roped=None):
    """One query head against the (already written) K/V of its KV head hq // group_size
    (``q_roped``: its query, when the block computed it). Returns the head's attention output
    [d_head, 1]."""
    sess, cfg = b.sess, b.cfg
    q = q_roped if q_roped is not None else roped_query(b, inp, il, hq, h, q_normed)
    q, scale = finish_q(sess, q, cfg, b.cache, 1)
    start, count, mask = inp.span(cfg.layer_window[il])
    k, v = b.cache.history(il, hq // cfg.group_size, start, count)
    probs_tap = lambda p: b.tap(p, "attn.hook_pattern", il, hq)  # noqa: E731   [length, 1, 1] per head
    return attend(sess, b.cache, tnn.tnn_reshape_3d(sess, q, cfg.head_dim, 1, 1), k, v, mask, scale,
                  cfg.attn_softcap, probs_tap)


def build(b: BuildContext, inp: GraphInputs, il: int, h):
    """The block: K/V of every KV head into the cache, then every query head; returns the heads
    joined [n_heads * d_head, 1]."""
    if inp.n_tokens != 1:
        raise ValueError("the per-head graph evaluates one position per graph")
    cfg = b.cfg
    write_kv_heads(b, inp, il, h)
    q_normed = [None] * cfg.n_heads
    if cfg.qk_norm_kind == 2:   # a whole-vector norm needs every head's query before any head goes on
        blk = b.weights.layers[il]
        q_normed = _normed_heads(b, [_q_projection(b, blk, hq, h) for hq in range(cfg.n_heads)], blk.t_q_norm_gamma)
    q = b.tap.heads([roped_query(b, inp, il, hq, h, q_normed[hq]) for hq in range(cfg.n_heads)], "attn.hook_q", il)
    heads = [query_head(b, inp, il, hq, h, q_roped=q[hq]) for hq in range(cfg.n_heads)]
    joined = heads[0]
    for t in heads[1:]:
        joined = tnn.tnn_concat(b.sess, joined, t, 0)
    return joined
