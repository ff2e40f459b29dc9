"""The training graph: per-Q-head LoRA fine-tuning through ggml's autodiff.

One graph per training step, teacher-forced over one whole sequence, in the engine's layout and
with its stateless builders (ops.py), but built for a backward pass:

* attention reads the sequence's own current K/V (a causal mask over the sequence, as llama.cpp's
  training mode does), not the KV cache: a cache write (set_rows / cpy) cuts the gradient;
* plain softmax attention (FLASH_ATTN_EXT has no backward) and no concat of heads (CONCAT has
  none): each head's LoRA term is added into its rows of the whole Q with ggml_acc;
* K and V stay F32 activations (the quantized out_prod of the backward does not broadcast over
  the query heads of a KV group);
* the per-head LoRA sits where the seed puts it: q_h = W_q[h] x + (alpha/r) B_h (A_h x) + bias_h,
  with A_h (r, d_model), B_h (d_head, r);
* cross-entropy over the chosen positions (rows of the sequence whose next token is a target),
  then the backward pass, the global gradient norm, clipping to ``max_grad_norm`` and one
  ggml_opt_step_adamw per adapter tensor, all in the same graph: one compute is one step.

The AdamW moments are the seed's persistent ``t_w_lora_*_m`` / ``_v`` tensors, so they live
across graph rebuilds. :func:`check_trainable` refuses, before anything is built, a model whose
graph has an op without backward between the adapters and the loss; the shim checks again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .. import tinynn as tnn
from ..gguf_load import ModelConfig
from .context import BuildContext
from .graph import unembed
from .ops import ffn, norm, qk_norm, rope


class NoBackwardError(ValueError):
    """The model's graph has an op that ggml cannot differentiate between the adapters and the loss."""


def ops_without_backward(cfg: ModelConfig) -> list[str]:
    """The ggml ops with no backward that ``cfg``'s forward graph would put between the LoRA-Q
    adapters and the loss (empty: trainable). Read from the config's flags, never its arch name."""
    bad = []
    if cfg.ffn_act == "gelu":
        bad.append("GELU (the FFN activation)")
    if cfg.attn_softcap > 0.0 or cfg.final_softcap > 0.0:
        bad.append("TANH (logit soft-capping)")
    if cfg.is_moe:
        bad.append("MUL_MAT_ID (the routed experts), ARGSORT (top-k routing)")
    return bad


def check_trainable(cfg: ModelConfig) -> None:
    """Raise :class:`NoBackwardError` naming the ops when ``cfg`` cannot be trained (before building)."""
    bad = ops_without_backward(cfg)
    if bad:
        raise NoBackwardError(f"{cfg.path}: cannot train LoRA-Q on a '{cfg.arch}' model: its graph needs "
                              f"{'; '.join(bad)}, which ggml has no backward for")
    if cfg.per_head_qkv:
        raise NoBackwardError(f"{cfg.path}: the training graph needs attn_q/k/v as whole matrices; this file "
                              f"stores them per head")


@dataclass(frozen=True)
class AdamW:
    """ggml_opt_step_adamw's hyper-parameters (decoupled weight decay: w *= 1 - lr * weight_decay)."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def params(self, t: int, lr: float | None = None) -> np.ndarray:
        """The 7 F32 values of step ``t`` (1-based): {lr, b1, b2, eps, wd, 1/(1-b1^t), 1/(1-b2^t)}."""
        if t < 1:
            raise ValueError(f"AdamW step must be >= 1, got {t}")
        return np.array([self.lr if lr is None else lr, self.beta1, self.beta2, self.eps, self.weight_decay,
                         1.0 / (1.0 - self.beta1 ** t), 1.0 / (1.0 - self.beta2 ** t)], np.float32)


@dataclass
class TrainGraph:
    """Handles of one built training graph (n_tokens positions, n_rows of them in the loss)."""

    n_tokens: int
    n_rows: int
    tokens: object
    positions: object
    masks: dict
    loss_rows: object
    labels: object
    loss: object
    params: list                       # [(layer, head, "a" | "b", tensor)]
    grads: list = field(default_factory=list)    # the gradients of ``params``, in that order
    grad_norm: object = None           # the global gradient norm (before clipping)
    adamw_params: object = None
    max_grad_norm: object = None
    logits: object = None

    def upload(self, sess, cfg: ModelConfig, tokens, rows, targets, positions=None, segments=None) -> None:
        """Set every input: the ``tokens`` (several sequences packed one after another: ``positions``
        restart at 0 and ``segments`` number the sequence of each token; default one sequence), and
        for each loss row (an index into ``tokens``) the token that should follow it."""
        n = self.n_tokens
        positions = np.arange(n, dtype=np.int32) if positions is None else np.asarray(positions, np.int32)
        tnn.upload(sess, self.tokens, np.asarray(tokens, np.int32))
        tnn.upload(sess, self.positions, positions)
        for window, t in self.masks.items():
            tnn.upload(sess, t, causal_mask(n, window, positions, segments))
        tnn.upload(sess, self.loss_rows, np.asarray(rows, np.int32))
        labels = np.zeros((self.n_rows, cfg.vocab), np.float32)
        labels[np.arange(self.n_rows), np.asarray(targets, np.int64)] = 1.0
        tnn.upload(sess, self.labels, labels)
        tnn.tnn_graph_reset_grads(sess)   # gradients accumulate in place: 0, and the loss's seed 1


def causal_mask(n: int, window: int = 0, positions=None, segments=None) -> np.ndarray:
    """[n, n]: 0 where token i may attend token j (same sequence, j at or before i, inside the
    window), -inf elsewhere."""
    pos = np.arange(n) if positions is None else np.asarray(positions, np.int64)
    i, j = pos[:, None], pos[None, :]
    ok = j <= i
    if segments is not None:
        seg = np.asarray(segments, np.int64)
        ok &= seg[:, None] == seg[None, :]
    if window > 0:
        ok &= i - j < window
    return np.where(ok, 0.0, -np.inf).astype(np.float32)


def _no_tap(t, *args, **kwargs):
    return t


_no_tap.reads = lambda *a, **k: False   # type: ignore[attr-defined]


def _lora_q(b: BuildContext, il: int, h, q, lora_scale: float):
    """Whole Q [H*Dh, n] plus each head's (alpha/r) B_h (A_h h), added into its rows (ggml_acc)."""
    sess, cfg, blk = b.sess, b.cfg, b.weights.layers[il]
    Dh, H = cfg.head_dim, cfg.n_heads
    n = tnn.tnn_tensor_ne(q, 1)
    row = H * Dh * 4
    for hq in range(H):
        u = tnn.tnn_scale(sess, tnn.tnn_matmul(sess, blk.t_w_lora_a_q[hq], h), lora_scale)   # [r, n]
        delta = tnn.tnn_matmul(sess, blk.t_w_lora_b_q[hq], u)                                # [Dh, n]
        q = tnn.tnn_acc(sess, q, delta, row, row * n, row * n, hq * Dh * 4)
    return q


def attention(b: BuildContext, il: int, h, positions, masks: dict, lora_scale: float):
    """One layer's attention over the sequence's own K/V, as llama.cpp's build_attn_mha without
    flash attention: returns the heads joined [H*Dh, n]."""
    sess, cfg, blk = b.sess, b.cfg, b.weights.layers[il]
    Dh, H, G = cfg.head_dim, cfg.n_heads, cfg.n_kv
    n = tnn.tnn_tensor_ne(h, 1)
    q = tnn.tnn_matmul(sess, blk.t_w_q_all, h)
    if b.weights.lora_rank:
        q = _lora_q(b, il, h, q, lora_scale)
    if blk.t_b_q_all is not None:
        q = tnn.tnn_add(sess, q, blk.t_b_q_all)
    k = tnn.tnn_matmul(sess, blk.t_w_k_all, h)
    if blk.t_b_k_all is not None:
        k = tnn.tnn_add(sess, k, blk.t_b_k_all)
    v = tnn.tnn_matmul(sess, blk.t_w_v_all, h)
    if blk.t_b_v_all is not None:
        v = tnn.tnn_add(sess, v, blk.t_b_v_all)
    if cfg.qk_norm_kind:
        q = qk_norm(sess, q, blk.t_q_norm_gamma, cfg)
        k = qk_norm(sess, k, blk.t_k_norm_gamma, cfg)
    q = rope(sess, tnn.tnn_reshape_3d(sess, q, Dh, H, n), positions, cfg, il, b.weights.rope_freqs)   # [Dh, H, n]
    k = rope(sess, tnn.tnn_reshape_3d(sess, k, Dh, G, n), positions, cfg, il, b.weights.rope_freqs)
    scale = cfg.kq_scale
    if cfg.q_prescale:
        q = tnn.tnn_scale(sess, q, scale)
        scale = 1.0
    q = tnn.tnn_permute(sess, q, 0, 2, 1, 3)                                          # [Dh, n, H]
    k = tnn.tnn_cont(sess, tnn.tnn_permute(sess, k, 0, 2, 1, 3))                      # [Dh, n, G]
    scores = tnn.tnn_matmul(sess, k, q)                                               # [n_k, n_q, H]
    probs = tnn.tnn_softmax_ext(sess, scores, masks[cfg.layer_window[il]], scale, 0.0)
    v_t = tnn.tnn_cont(sess, tnn.tnn_permute(sess, tnn.tnn_reshape_3d(sess, v, Dh, G, n), 1, 2, 0, 3))  # [n, Dh, G]
    heads = tnn.tnn_matmul(sess, v_t, probs)                                          # [Dh, n, H]
    heads = tnn.tnn_cont(sess, tnn.tnn_permute(sess, heads, 0, 2, 1, 3))              # [Dh, H, n]
    return tnn.tnn_reshape_2d(sess, heads, Dh * H, n)


def layer(b: BuildContext, il: int, x, positions, masks: dict, lora_scale: float):
    """One block, as graph.layer: norm -> attention -> (post-norm) -> residual -> norm -> FFN -> ..."""
    sess, cfg, blk = b.sess, b.cfg, b.weights.layers[il]
    h = norm(sess, x, blk.t_rn1_gamma, cfg)
    attn = tnn.tnn_matmul(sess, blk.t_w_o, attention(b, il, h, positions, masks, lora_scale))
    if cfg.post_norms:
        attn = norm(sess, attn, blk.t_post_attn_norm_gamma, cfg)
    if cfg.residual_scale != 1.0:
        attn = tnn.tnn_scale(sess, attn, cfg.residual_scale)
    x = tnn.tnn_add(sess, x, attn)
    out = ffn(sess, norm(sess, x, blk.t_rn2_gamma, cfg), blk, cfg, _no_tap, il, b.mm)
    if cfg.post_norms:
        out = norm(sess, out, blk.t_post_ffn_norm_gamma, cfg)
    if cfg.residual_scale != 1.0:
        out = tnn.tnn_scale(sess, out, cfg.residual_scale)
    return tnn.tnn_add(sess, x, out)


def _forward_rows(b: BuildContext, n_tokens: int, n_rows: int, lora_scale: float):
    """Inputs and the logits [vocab, n_rows] of the chosen rows of an n_tokens sequence."""
    b = replace(b, mm=tnn.tnn_matmul)   # ggml_mul_mat: it has a backward, the tiled kernels have none
    sess, cfg = b.sess, b.cfg
    tokens = tnn.tnn_input_1d_i32(sess, n_tokens)
    positions = tnn.tnn_input_1d_i32_ctx(sess, n_tokens)
    tnn.tnn_set_name(tokens, "train_tokens")
    tnn.tnn_set_name(positions, "train_pos")
    masks = {w: tnn.tnn_input_2d_f32(sess, n_tokens, n_tokens) for w in sorted(set(cfg.layer_window))}
    rows = tnn.tnn_input_1d_i32(sess, n_rows)
    tnn.tnn_set_name(rows, "train_loss_rows")
    x = tnn.tnn_get_rows(sess, b.weights.token_embd, tokens)
    if cfg.embed_scale != 1.0:
        x = tnn.tnn_scale(sess, x, cfg.embed_scale)
    for il in range(cfg.n_layers):
        x = layer(b, il, x, positions, masks, lora_scale)
    x = tnn.tnn_get_rows(sess, x, rows)                     # only the positions in the loss
    logits = unembed(b, norm(sess, x, b.weights.output_norm, cfg))
    return tokens, positions, masks, rows, logits


def lora_params(b: BuildContext) -> list:
    """[(layer, head, "a" | "b", tensor)] of every adapter tensor."""
    out = []
    for il, blk in enumerate(b.weights.layers):
        for hq in range(b.cfg.n_heads):
            out.append((il, hq, "a", blk.t_w_lora_a_q[hq]))
            out.append((il, hq, "b", blk.t_w_lora_b_q[hq]))
    return out


def build(b: BuildContext, n_tokens: int, n_rows: int, lora_scale: float, *, optimizer: bool = True,
          keep_grads: bool = False) -> TrainGraph:
    """A new training graph (the previous one is dropped): forward, loss, backward, and with
    ``optimizer`` the clipped AdamW step of every adapter tensor. ``keep_grads``: the gradients
    stay readable after compute (TrainGraph.grads)."""
    check_trainable(b.cfg)
    if not b.weights.lora_rank:
        raise ValueError("the training graph needs LoRA-Q adapters (enable_lora_q before realize)")
    if optimizer and not b.weights.layers[0].t_w_lora_a_q_m:
        raise ValueError("the optimizer step needs the AdamW moments (enable_lora_q_adamw before realize)")
    if not 0 < n_rows <= n_tokens:
        raise ValueError(f"n_rows must be in 1..n_tokens ({n_tokens}), got {n_rows}")
    sess, cfg = b.sess, b.cfg
    tnn.tnn_reset_for_training(sess)
    tokens, positions, masks, rows, logits = _forward_rows(b, n_tokens, n_rows, lora_scale)
    labels = tnn.tnn_input_2d_f32(sess, n_rows, cfg.vocab)
    loss = tnn.tnn_cross_entropy_loss(sess, logits, labels)
    tnn.tnn_set_name(loss, "train_loss")
    tnn.tnn_build_backward(sess, loss)
    tg = TrainGraph(n_tokens, n_rows, tokens, positions, masks, rows, labels, loss, lora_params(b))
    tg.grads = [tnn.tnn_graph_grad(sess, t) for *_, t in tg.params]
    if keep_grads:
        for g in tg.grads:
            tnn.tnn_set_output(g)
    sq = None
    for g in tg.grads:
        s = tnn.tnn_sum(sess, tnn.tnn_sqr(sess, g))
        sq = s if sq is None else tnn.tnn_add(sess, sq, s)
    tg.grad_norm = tnn.tnn_sqrt(sess, sq)
    tnn.tnn_set_output(tg.grad_norm)
    tnn.tnn_add_to_graph(sess, tg.grad_norm)
    if optimizer:
        tg.adamw_params = tnn.tnn_input_1d_f32(sess, 7)
        tg.max_grad_norm = tnn.tnn_input_1d_f32(sess, 1)
        # clip: g * min(1, max_norm / |g|) (|g| = 0 gives inf, clamped to 1)
        factor = tnn.tnn_clamp(sess, tnn.tnn_div(sess, tg.max_grad_norm, tg.grad_norm), 0.0, 1.0)
        for (il, hq, which, t), g in zip(tg.params, tg.grads):
            blk = b.weights.layers[il]
            m = (blk.t_w_lora_a_q_m if which == "a" else blk.t_w_lora_b_q_m)[hq]
            v = (blk.t_w_lora_a_q_v if which == "a" else blk.t_w_lora_b_q_v)[hq]
            step = tnn.tnn_opt_step_adamw(sess, t, tnn.tnn_mul(sess, g, factor), m, v, tg.adamw_params)
            tnn.tnn_add_to_graph(sess, step)
    tnn.tnn_realize(sess, loss)
    return tg


def build_forward(b: BuildContext, n_tokens: int, lora_scale: float):
    """The same forward pass without gradients: (tokens, positions, masks, logits [vocab, n]) of every
    position, e.g. to read what the adapter predicts."""
    tnn.tnn_reset_for_rebuild(b.sess)
    tokens, positions, masks, rows, logits = _forward_rows(b, n_tokens, n_tokens, lora_scale)
    tnn.tnn_realize(b.sess, logits)
    return tokens, positions, masks, rows, logits


def run_forward(sess, handles, tokens: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Logits [n, vocab] of :func:`build_forward`'s graph for ``tokens``."""
    t_tokens, t_pos, masks, rows, logits = handles
    n = len(tokens)
    tnn.upload(sess, t_tokens, np.asarray(tokens, np.int32))
    tnn.upload(sess, t_pos, np.arange(n, dtype=np.int32))
    for window, t in masks.items():
        tnn.upload(sess, t, causal_mask(n, window))
    tnn.upload(sess, rows, np.arange(n, dtype=np.int32))
    tnn.tnn_compute(sess)
    return tnn.download(sess, logits).reshape(n, cfg.vocab)
