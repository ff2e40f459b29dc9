"""The fast path beside the seed's per-head graph: all heads of a layer in one tensor.

Mixed into SmolLM2KVFFICache, so it runs on the same session, weights and KV cache as the
per-head builder (the two can take turns on one context). It builds llama.cpp's graph: one
Q/K/V projection, norm and rope for all heads, one attention op per layer that broadcasts each
KV head over its query group; its decode graph is built once per padded KV length and replayed,
and ``step_batch`` evaluates many positions in one graph, as llama.cpp's ubatches. Every number
matches llama.cpp (tests/test_parity_*.py); the attention helpers it shares with the per-head
builder (_kv_history, _attend, _finish_q, _block_tail) live in kv_cache.py.
"""
from __future__ import annotations

import numpy as np

from .. import tinynn as tnn

GGML_TYPE_F32 = tnn.GGML_TYPE_F32
GGML_TYPE_F16 = tnn.GGML_TYPE_F16


class FusedHeadsMixin:
    """enable_fused_heads, the fused attention block, replayed decode steps and batched prefill."""

    def enable_fused_heads(self) -> None:
        """Build each layer's attention with all heads in one tensor (one Q/K/V matmul, one rope,
        one attention op for every head) instead of the seed's chain per query head: the same
        numbers in ~1/4 of the graph nodes. Shares the weights' file bytes and the KV cache with
        the per-head builder; call before realize."""
        if self.lora_q_enabled:
            raise RuntimeError("enable_fused_heads: LoRA-Q adapters are per head; use the per-head graph")
        self.fused_heads = True

    def _attention_fused(self, t_h, blk, t_pos, pos, scale, bytes_d_head_k, bytes_d_head_v, tag, layer_idx):
        """All heads of the graph's tokens at once, as llama.cpp's graph: one projection, norm and rope
        for all Q (and all K), then one attention op (ggml broadcasts each KV head over its group of
        query heads). Every head sees the same ops on the same numbers as in the per-head graph, so
        the logits are the same; returns the heads joined [H*d_head, tokens]."""
        sess, Dh, H, G = self.sess, self.d_head, self.n_heads, self.n_kv
        n = tnn.tnn_tensor_ne(t_h, 1)                                   # tokens in this graph
        if blk.t_w_q_all is None:
            raise RuntimeError("fused-heads graph: this cache was realized without the whole Q/K/V "
                               "projections; call enable_fused_heads before realize")
        t_q = self._project(blk.t_w_q_all, blk.t_b_q_all, t_h)          # [H*Dh, n]
        t_k = self._project(blk.t_w_k_all, blk.t_b_k_all, t_h)          # [G*Dh, n]
        t_v = self._project(blk.t_w_v_all, blk.t_b_v_all, t_h)
        t_k = self.trace_tap(tag + "k_all_pre", t_k)
        if self.has_qk_norm:
            if self.qk_norm_kind == 2:     # OLMoE: the whole projected vector
                t_q = tnn.tnn_rms_norm(sess, t_q, blk.t_q_norm_gamma, self.rms_eps)
                t_k = tnn.tnn_rms_norm(sess, t_k, blk.t_k_norm_gamma, self.rms_eps)
            else:                          # each head's row
                t_q = tnn.tnn_rms_norm(sess, tnn.tnn_reshape_2d(sess, t_q, Dh, H * n), blk.t_q_norm_gamma,
                                       self.rms_eps)
                t_k = tnn.tnn_rms_norm(sess, tnn.tnn_reshape_2d(sess, t_k, Dh, G * n), blk.t_k_norm_gamma,
                                       self.rms_eps)
        t_q = self._rope(tnn.tnn_reshape_3d(sess, t_q, Dh, H, n), t_pos, layer_idx)
        t_k = self._rope(tnn.tnn_reshape_3d(sess, t_k, Dh, G, n), t_pos, layer_idx)
        t_q = self.trace_tap(tag + "q_all_rot", t_q)
        if self.t_k_hadamard is not None:
            t_k = self._hadamard(t_k, self.t_k_hadamard, G * n)
        if self.t_v_hadamard is not None:
            t_v = self._hadamard(t_v, self.t_v_hadamard, G * n)
        # the new K and V of every KV head into the cache: rows given as inputs (set_rows) in replayed
        # and batched graphs; a rebuilt single-position graph (tracing) writes each head at `pos` as
        # the per-head graph does
        if self._t_kv_row is None:
            row = Dh * 4
            for h in range(G):
                self._write_kv(blk, h, tnn.tnn_view_2d(sess, t_k, Dh, 1, row, h * row),
                               tnn.tnn_view_2d(sess, t_v, Dh, 1, row, h * row), pos, bytes_d_head_k, bytes_d_head_v)
        else:
            self._set_cache_rows(blk.t_K_layer, t_k, n)
            if self.v_trans:
                self._set_v_transposed(blk.t_V_layer, t_v, n)
            else:
                self._set_cache_rows(blk.t_V_layer, t_v, n)
        t_q, scale = self._finish_q(t_q, scale, H * n)
        # [d_head, tokens, heads], as llama.cpp permutes Q
        t_q = tnn.tnn_reshape_3d(sess, t_q, Dh, 1, H) if n == 1 else \
            tnn.tnn_permute(sess, tnn.tnn_reshape_3d(sess, t_q, Dh, H, n), 0, 2, 1, 3)
        t_K_hist, t_V_hist, t_mask = self._kv_history(blk, None, pos, layer_idx, bytes_d_head_k, bytes_d_head_v)
        return self._attend(t_q, t_K_hist, t_V_hist, t_mask, scale, tag, False)

    def _set_cache_rows(self, layer, t_new, n: int) -> None:
        """New K (or V) of n positions [n_kv * d_head, n] into rows _t_kv_row of a [d_head, max_T, n_kv] cache."""
        sess, Dh, G = self.sess, self.d_head, self.n_kv
        src = tnn.tnn_reshape_3d(sess, t_new, Dh, 1, G) if n == 1 else \
            tnn.tnn_permute(sess, tnn.tnn_reshape_3d(sess, t_new, Dh, G, n), 0, 2, 1, 3)   # [Dh, n, G]
        tnn.tnn_add_to_graph(sess, tnn.tnn_set_rows(sess, layer, src, self._t_kv_row))

    def _set_v_transposed(self, layer, t_v, n: int) -> None:
        """New V of n positions [n_kv * d_head, n] into the transposed cache [max_T, d_head, n_kv]:
        element e of position p goes to e * max_T + p (_t_v_idx), as llama.cpp's v_trans set_rows."""
        sess, E = self.sess, self.n_kv * self.d_head
        dst = tnn.tnn_reshape_2d(sess, layer, 1, self.max_T * E)
        tnn.tnn_add_to_graph(sess, tnn.tnn_set_rows(sess, dst, tnn.tnn_reshape_2d(sess, t_v, 1, E * n),
                                                    self._t_v_idx))

    def step_batch(self, token_ids, pos0: int, all_logits: bool = True) -> np.ndarray:
        """Prefill: ``token_ids`` at positions pos0, pos0+1, ... in one fused-heads graph, as
        llama.cpp computes one ubatch; logits [len(token_ids), vocab], or with ``all_logits=False``
        only the last position's [1, vocab] (the last layer then runs on that position alone, as
        llama.cpp's does when it outputs only the last logits). The cache advances."""
        if not self.fused_heads or not self.kv_pad:
            raise RuntimeError("step_batch: needs the fused-heads builder (enable_fused_heads)")
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        n = ids.size
        if n == 0:
            return np.zeros((0, self.vocab_size), np.float32)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token id {int(ids[(ids < 0) | (ids >= self.vocab_size)][0])} outside the "
                             f"vocabulary (size {self.vocab_size})")
        if pos0 < 0 or pos0 + n > self.max_T:
            raise ValueError(f"positions {pos0}..{pos0 + n - 1} outside the cache (max_T={self.max_T})")
        self._replay = None
        res = self._build_fused(pos0 + n - 1, n, last_only=not all_logits and n > 1)
        logits = self._run_fused(res, ids, np.arange(pos0, pos0 + n, dtype=np.int32))
        self._collect_trace()
        return logits

    def _step_replayed(self, token_id: int, pos: int) -> np.ndarray:
        """A step of the fused-heads graph, built once per padded KV length (every 256 positions) and
        replayed: the token, its position, the cache row it writes and the masks are inputs, so
        nothing in the graph depends on `pos` itself. With the attention always over the padded
        length behind a -inf mask, as llama.cpp's, the numbers are the rebuilt graph's."""
        if not 0 <= pos < self.max_T:
            raise ValueError(f"position {pos} outside the cache (max_T={self.max_T})")
        length = self._n_kv_padded(pos)
        if self._replay is None or self._replay[0] != length:
            self._replay = (length, self._build_fused(pos, 1, last_only=False))
        return self._run_fused(self._replay[1], np.array([token_id]), np.array([pos], np.int32)).reshape(-1)

    def _build_fused(self, last_pos: int, n: int, last_only: bool):
        """Build and allocate the graph of ``n`` positions ending at ``last_pos``, whose inputs are the
        tokens, positions, cache rows, masks over the padded KV length (and the output row)."""
        tnn.tnn_reset_for_rebuild(self.sess)
        self._taps = []
        length = self._n_kv_padded(last_pos)
        mask_type = GGML_TYPE_F16 if self.use_flash_attn else GGML_TYPE_F32   # flash attention takes F16
        self._t_kq_masks = {w: tnn.tnn_input_4d(self.sess, mask_type, length, n, 1, 1) for w in self.mask_windows}
        self._t_kv_row = tnn.tnn_input_1d_i32(self.sess, n)
        self._t_v_idx = tnn.tnn_input_1d_i32(self.sess, self.n_kv * self.d_head * n) if self.v_trans else None
        self._v_starts = np.arange(0, self.n_kv * self.d_head * self.max_T, self.max_T, dtype=np.int32)
        self._t_out_rows = tnn.tnn_input_1d_i32(self.sess, 1) if last_only else None
        res = self.build_decode_step(last_pos, n_tokens=n)
        tnn.tnn_realize(self.sess, res.t_logits)
        if self._t_out_rows is not None:
            tnn.upload(self.sess, self._t_out_rows, np.array([n - 1], np.int32))
        return res

    def _run_fused(self, res, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Upload a built fused graph's inputs for ``ids`` at ``positions``, compute, read the logits."""
        for window, t_mask in self._t_kq_masks.items():
            length = tnn.tnn_tensor_ne(t_mask, 0)
            mask = np.stack([self._kq_mask(int(p), window, length) for p in positions])
            tnn.upload(self.sess, t_mask, mask.astype(np.float16) if self.use_flash_attn else mask)
        tnn.upload(self.sess, res.t_token_id, ids.astype(np.int32))
        tnn.upload(self.sess, res.t_pos, positions)
        tnn.upload(self.sess, self._t_kv_row, positions)
        if self._t_v_idx is not None:   # element e of each position's V goes to e * max_T + position
            tnn.upload(self.sess, self._t_v_idx, (self._v_starts[None, :] + positions[:, None]).reshape(-1))
        tnn.tnn_compute(self.sess)
        return tnn.download(self.sess, res.t_logits).reshape(-1, self.vocab_size)
