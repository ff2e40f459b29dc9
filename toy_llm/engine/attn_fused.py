"""The fused attention block (the default): all heads of the graph's tokens at once, as
llama.cpp's graph. One projection, norm and rope for all Q (and all K, all V), the cache rows
written through set_rows, then one attention op in which ggml broadcasts each KV head over its
group of query heads. Every head meets the same ops on the same numbers as in the per-head
block, so the logits are the same."""
from __future__ import annotations

from .. import tinynn as tnn
from .context import BuildContext
from .inputs import GraphInputs
from .ops import attend, finish_q, project, qk_norm, rope


def build(b: BuildContext, inp: GraphInputs, il: int, h):
    """Returns the heads of each token joined [n_heads * d_head, tokens]."""
    sess, cfg, cache, blk = b.sess, b.cfg, b.cache, b.weights.layers[il]
    Dh, H, G, n = cfg.head_dim, cfg.n_heads, cfg.n_kv, inp.n_tokens
    if blk.t_w_q_all is None:
        raise ValueError("the fused graph needs attn_q/k/v as whole matrices; this file stores them per head "
                         "(use graph='per_head')")
    if inp.kv_rows is None:
        raise ValueError("the fused graph writes the cache through row inputs (GraphInputs rows_as_inputs=True)")
    adapter = None
    if b.weights.lora_q_scale is not None and blk.t_lora_q_a is not None:   # an inference LoRA-Q adapter
        adapter = (blk.t_lora_q_a, blk.t_lora_q_b, b.weights.lora_q_scale)
    q = project(sess, blk.t_w_q_all, h, blk.t_b_q_all, adapter=adapter, mm=b.mm)   # [H*Dh, n]
    k = project(sess, blk.t_w_k_all, h, blk.t_b_k_all, mm=b.mm)       # [G*Dh, n]
    v = b.tap(project(sess, blk.t_w_v_all, h, blk.t_b_v_all, mm=b.mm), "attn.hook_v", il)
    if cfg.qk_norm_kind:
        q = qk_norm(sess, q, blk.t_q_norm_gamma, cfg)
        k = qk_norm(sess, k, blk.t_k_norm_gamma, cfg)
    q = b.tap(rope(sess, tnn.tnn_reshape_3d(sess, q, Dh, H, n), inp.positions, cfg, il, b.weights.rope_freqs),
              "attn.hook_q", il)
    k = b.tap(rope(sess, tnn.tnn_reshape_3d(sess, k, Dh, G, n), inp.positions, cfg, il, b.weights.rope_freqs),
              "attn.hook_k", il)
    cache.write_rows(il, cache.rotate_k(k, G * n), cache.rotate_v(v, G * n), n, inp.kv_rows, inp.v_idx)
    q, scale = finish_q(sess, q, cfg, cache, H * n)
    # [d_head, tokens, heads], as llama.cpp permutes Q; with several sequence streams
    # [d_head, tokens of a stream, heads, streams] (llama.cpp's build_attn_mha)
    ns = inp.streams[1]
    if ns > 1:
        q = tnn.tnn_permute(sess, tnn.tnn_reshape_4d(sess, q, Dh, H, n // ns, ns), 0, 2, 1, 3)
    else:
        q = tnn.tnn_reshape_3d(sess, q, Dh, 1, H) if n == 1 else \
            tnn.tnn_permute(sess, tnn.tnn_reshape_3d(sess, q, Dh, H, n), 0, 2, 1, 3)
    start, count, mask = inp.span(cfg.layer_window[il])
    kh, vh = cache.history(il, None, start, count, inp.streams)
    def read_probs(p):   # [length, tokens, heads(, streams)], kept as [tokens, heads, length] (a copy, read only)
        copy = b.tap(tnn.tnn_cont(sess, tnn.tnn_permute(sess, p, 0, 2, 1, 3)), "attn.hook_pattern", il)
        tnn.tnn_add_to_graph(sess, copy)    # a side branch: nothing downstream reads it
        return p
    return attend(sess, cache, q, kh, vh, mask, scale, cfg.attn_softcap,
                  read_probs if b.tap.reads("attn.hook_pattern", il) else None)
