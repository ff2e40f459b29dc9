"""One forward graph: embed -> one layer loop -> final norm -> logits, with the attention block
(attn_fused or attn_per_head) as an argument. Every tensor a researcher may want is named once
through the tap (hook_points.py)."""
from __future__ import annotations

from typing import Callable

from .. import tinynn as tnn
from . import attn_fused, attn_per_head
from .context import BuildContext
from .inputs import GraphInputs
from .ops import f32_div, ffn, moe_ffn, norm, softcap

ATTENTION: dict[str, Callable] = {"fused": attn_fused.build, "per_head": attn_per_head.build}


def embed(b: BuildContext, inp: GraphInputs):
    x = tnn.tnn_get_rows(b.sess, b.weights.token_embd, inp.tokens)
    if b.cfg.embed_scale != 1.0:   # Gemma: sqrt(d_model); Granite: its embedding scale
        x = tnn.tnn_scale(b.sess, x, b.cfg.embed_scale)
    return b.tap(x, "hook_embed")


def layer(b: BuildContext, inp: GraphInputs, il: int, x, attention: Callable):
    """One transformer block: norm -> attention -> (post-norm) -> residual -> norm -> FFN/MoE ->
    (post-norm) -> residual."""
    sess, cfg, tap, blk = b.sess, b.cfg, b.tap, b.weights.layers[il]
    x = tap(x, "hook_resid_pre", il)
    h = tap(norm(sess, x, blk.t_rn1_gamma, cfg), "ln1.hook_normalized", il)
    z = tap(attention(b, inp, il, h), "attn.hook_z", il)
    attn = tap(b.mm(sess, blk.t_w_o, z), "hook_attn_out", il)
    if il == cfg.n_layers - 1 and inp.out_rows is not None:
        # llama.cpp (inp_out_ids): the last layer goes on only with the positions whose logits
        # are wanted, from right after the attention output
        attn = tnn.tnn_get_rows(sess, attn, inp.out_rows)
        x = tnn.tnn_get_rows(sess, x, inp.out_rows)
    if cfg.post_norms:
        attn = tap(norm(sess, attn, blk.t_post_attn_norm_gamma, cfg), "ln1_post.hook_normalized", il)
    if cfg.residual_scale != 1.0:   # Granite scales each branch before the residual add
        attn = tnn.tnn_scale(sess, attn, cfg.residual_scale)
    x = tap(tnn.tnn_add(sess, x, attn), "hook_resid_mid", il)
    h = tap(norm(sess, x, blk.t_rn2_gamma, cfg), "ln2.hook_normalized", il)
    mlp = moe_ffn(sess, h, blk, cfg, tap, il) if cfg.is_moe else ffn(sess, h, blk, cfg, tap, il, b.mm)
    out = tap(mlp, "hook_mlp_out", il)
    if cfg.post_norms:
        out = tap(norm(sess, out, blk.t_post_ffn_norm_gamma, cfg), "ln2_post.hook_normalized", il)
    if cfg.residual_scale != 1.0:
        out = tnn.tnn_scale(sess, out, cfg.residual_scale)
    x = tap(tnn.tnn_add(sess, x, out), "hook_resid_post", il)
    if tap.reads("hook_lens_logits", il):   # the logit lens, beside the graph: nothing downstream reads it
        tnn.tnn_add_to_graph(sess, tap(unembed(b, norm(sess, x, b.weights.output_norm, cfg)), "hook_lens_logits", il))
    return x


def unembed(b: BuildContext, h):
    """Logits of the final-normed ``h``: the output matrix (the embedding table when tied), Granite's
    scale, Gemma 2's soft-cap."""
    sess, cfg = b.sess, b.cfg
    logits = b.mm(sess, b.weights.out_matrix, h)
    if cfg.logit_scale != 1.0:   # Granite divides the logits
        logits = tnn.tnn_scale(sess, logits, f32_div(1.0, cfg.logit_scale))
    return softcap(sess, logits, cfg.final_softcap)


def head(b: BuildContext, x):
    """Final norm and the output matrix: the logits."""
    h = b.tap(norm(b.sess, x, b.weights.output_norm, b.cfg), "ln_final.hook_normalized")
    logits = b.tap(unembed(b, h), "hook_logits")
    tnn.tnn_set_output(logits)
    return logits


def forward(b: BuildContext, inp: GraphInputs, graph: str):
    """The whole graph of ``inp``'s positions with the ``graph`` attention block; returns the logits."""
    attention = ATTENTION[graph]
    x = embed(b, inp)
    for il in range(b.cfg.n_layers):
        x = layer(b, inp, il, x, attention)
    return head(b, x)
