"""KVCache: the K and V tensors of every layer, their layout, and the graph pieces that write
and read them (llama.cpp's llama_kv_cache).

Layout, decided once from the KV type and the attention kind:

* K: one ``[d_head, cells, n_kv]`` tensor per layer (F32, F16 or Q8_0).
* V: the same, or transposed ``[cells, d_head, n_kv]`` for plain attention on a float cache
  (llama.cpp's ``v_trans``), so attention multiplies by V without copying it.
* ``cells`` = ``n_stream`` streams of ``max_T`` cells: sequence s keeps position p in cell
  s * max_T + p (llama.cpp's non-unified cache, one stream per seq_id). A graph over the
  consecutive streams s0..s1 reads them as one more dimension of the same views.
* Each KV head has a persistent 2-D view of both (the seed's ``t_K[h]`` / ``t_V[h]``).
* A quantized K or V is met by Q/K/V rotated by a Walsh-Hadamard matrix, and the attention output
  rotated back, as llama.cpp does (``attn_rot_k`` / ``attn_rot_v``): it spreads outliers across a
  block so Q8_0 loses less, and doing the same keeps the numbers equal.
* Attention runs over a length padded to a multiple of 256 behind a -inf mask, as llama.cpp's
  ``get_n_kv`` (reducing over the same length rounds the same way).
"""
from __future__ import annotations

import numpy as np

from .. import tinynn as tnn
from ..ggml_types import GGML_TYPE_F16, GGML_TYPE_F32, is_quantized

LLAMA_KV_PAD = 256


def hadamard_matrix(n: int) -> np.ndarray:
    """The orthonormal Walsh-Hadamard matrix of size n, built as llama.cpp's ggml_gen_hadamard does."""
    h = np.zeros((n, n), np.float32)
    h[0, 0] = np.float32(1.0) / np.sqrt(np.float32(n))
    s = 1
    while s < n:
        blk = h[:s, :s].copy()
        h[s:2 * s, :s] = blk
        h[:s, s:2 * s] = blk
        h[s:2 * s, s:2 * s] = -blk
        s *= 2
    return h


class KVCache:
    """Every layer's K and V of one session (see the module docstring for the layout)."""

    def __init__(self, sess, n_layers: int, n_kv: int, d_head: int, max_T: int, type_k: int, type_v: int,
                 flash_attn: bool, pad: int = LLAMA_KV_PAD, n_stream: int = 1):
        self.sess, self.n_kv, self.d_head, self.max_T = sess, n_kv, d_head, max_T
        self.n_stream, self.n_cells = n_stream, max_T * n_stream
        self.type_k, self.type_v, self.flash_attn, self.pad = type_k, type_v, flash_attn, pad
        self.v_trans = not flash_attn and not is_quantized(type_v)
        self.v_elem = tnn.tnn_row_size(type_v, 1) if self.v_trans else 0   # bytes per V element when transposed
        self.row_k = tnn.tnn_row_size(type_k, d_head)
        self.row_v = tnn.tnn_row_size(type_v, d_head)
        self.k_layers, self.v_layers, self.k_heads, self.v_heads = [], [], [], []
        for _ in range(n_layers):
            C = self.n_cells
            k, kh = self._layer(type_k, d_head, C, self.row_k)
            v, vh = self._layer(type_v, C, d_head, C * self.v_elem) if self.v_trans else \
                self._layer(type_v, d_head, C, self.row_v)
            self.k_layers.append(k)
            self.k_heads.append(kh)
            self.v_layers.append(v)
            self.v_heads.append(vh)
        self.rot_k = self.rot_v = None
        if is_quantized(type_k) and d_head % 64 == 0:   # llama.cpp: the largest power of 2 dividing d_head
            n = 64
            while d_head % (n * 2) == 0:
                n *= 2
            self.rot_k = tnn.tnn_input_2d_f32_persistent(sess, n, n)
        if is_quantized(type_v) and d_head % 64 == 0:
            self.rot_v = tnn.tnn_input_2d_f32_persistent(sess, 64, 64)

    def _layer(self, typ, ne0, ne1, row):
        """One layer's [ne0, ne1, n_kv] tensor and each KV head's [ne0, ne1] view of it."""
        layer = tnn.tnn_input_3d_persistent_typed(self.sess, ne0, ne1, self.n_kv, typ)
        return layer, [tnn.tnn_view_2d_persistent(self.sess, layer, ne0, ne1, row, h * ne1 * row)
                       for h in range(self.n_kv)]

    def after_finalize(self) -> None:
        for rot in (self.rot_k, self.rot_v):
            if rot is not None:
                tnn.upload(self.sess, rot, hadamard_matrix(tnn.tnn_tensor_ne(rot, 0)))

    # ------------------------------------------------------------------ lengths and masks

    def padded_len(self, pos: int) -> int:
        """The KV length a graph whose last position is ``pos`` attends over in each stream
        (llama.cpp's n_kv: the same for every stream of a graph)."""
        p = self.pad
        return min(self.max_T, max(p, -(-(pos + 1) // p) * p))

    @property
    def mask_type(self) -> int:
        return GGML_TYPE_F16 if self.flash_attn else GGML_TYPE_F32   # flash attention takes an F16 mask

    def mask(self, positions, window: int, length: int) -> np.ndarray:
        """[len(positions), length]: 0 where a position may attend (causal, inside the window), -inf
        elsewhere. Positions are within each token's own stream, so with several streams the rows
        (stream-major) are the [length, tokens per stream, 1, streams] mask llama.cpp builds."""
        p = np.asarray(positions, np.int64)[:, None]
        j = np.arange(length)[None, :]
        ok = j <= p
        if window > 0:
            ok &= p - j < window
        m = np.where(ok, 0.0, -np.inf).astype(np.float32)
        return m.astype(np.float16) if self.flash_attn else m

    # ------------------------------------------------------------------ rotations

    def _hadamard(self, t, rot, n_vecs: int):
        """rot @ t over consecutive blocks of rot's size (t: n_vecs contiguous [d_head] vectors)."""
        n = tnn.tnn_tensor_ne(rot, 0)
        t = tnn.tnn_reshape_2d(self.sess, t, n, self.d_head * n_vecs // n)
        t = tnn.tnn_mul_mat_hadamard(self.sess, rot, t)
        return tnn.tnn_reshape_2d(self.sess, t, self.d_head, n_vecs)

    def rotate_k(self, t, n_vecs: int):
        """Q or K into the K cache's basis (identity for a float cache)."""
        return t if self.rot_k is None else self._hadamard(t, self.rot_k, n_vecs)

    def rotate_v(self, t, n_vecs: int):
        """V into, or the attention output back out of, the V cache's basis (H is its own inverse)."""
        return t if self.rot_v is None else self._hadamard(t, self.rot_v, n_vecs)

    # ------------------------------------------------------------------ writes

    def write_at(self, il: int, hkv: int, t_k, t_v, pos: int) -> None:
        """The seed's write: KV head ``hkv``'s new K and V ([d_head, 1]) copied into its slot at
        ``pos`` (cpy quantizes on the way into a Q8_0 cache). Added to the graph now, so they run
        before attention reads them."""
        sess, Dh = self.sess, self.d_head
        k_slot = tnn.tnn_view_2d(sess, self.k_heads[il][hkv], Dh, 1, self.row_k, pos * self.row_k)
        if self.v_trans:    # column `pos` of the transposed [max_T, d_head] view
            e = self.v_elem
            v_slot = tnn.tnn_view_2d(sess, self.v_heads[il][hkv], 1, Dh, self.n_cells * e, pos * e)
        else:
            v_slot = tnn.tnn_view_2d(sess, self.v_heads[il][hkv], Dh, 1, self.row_v, pos * self.row_v)
        tnn.tnn_add_to_graph(sess, tnn.tnn_cpy(sess, t_k, k_slot))
        tnn.tnn_add_to_graph(sess, tnn.tnn_cpy(sess, t_v, v_slot))

    def write_rows(self, il: int, t_k, t_v, n: int, kv_rows, v_idx) -> None:
        """llama.cpp's write: every KV head's new K and V of n positions ([n_kv * d_head, n]) into
        the rows given by the graph input ``kv_rows`` (set_rows), so the graph does not depend on
        the positions and can be replayed. A transposed V takes element e of cell c at
        e * cells + c (``v_idx``)."""
        sess, Dh, G = self.sess, self.d_head, self.n_kv

        def heads_by_position(t):   # [n_kv * d_head, n] -> [d_head, n, n_kv]
            return tnn.tnn_reshape_3d(sess, t, Dh, 1, G) if n == 1 else \
                tnn.tnn_permute(sess, tnn.tnn_reshape_3d(sess, t, Dh, G, n), 0, 2, 1, 3)
        tnn.tnn_add_to_graph(sess, tnn.tnn_set_rows(sess, self.k_layers[il], heads_by_position(t_k), kv_rows))
        if self.v_trans:
            E = G * Dh
            dst = tnn.tnn_reshape_2d(sess, self.v_layers[il], 1, self.n_cells * E)
            tnn.tnn_add_to_graph(sess, tnn.tnn_set_rows(sess, dst, tnn.tnn_reshape_2d(sess, t_v, 1, E * n), v_idx))
        else:
            tnn.tnn_add_to_graph(sess, tnn.tnn_set_rows(sess, self.v_layers[il], heads_by_position(t_v), kv_rows))

    def cells(self, positions, streams=None) -> np.ndarray:
        """The cache cell of each position (of sequence stream ``streams[i]``; None: stream 0)."""
        positions = np.asarray(positions, np.int64)
        c = positions if streams is None else positions + np.asarray(streams, np.int64) * self.max_T
        return c.astype(np.int32)

    def v_write_index(self, cells: np.ndarray) -> np.ndarray:
        """The v_idx input of write_rows for ``cells`` (transposed V only)."""
        C = self.n_cells
        starts = np.arange(0, self.n_kv * self.d_head * C, C, dtype=np.int64)
        return (starts[None, :] + np.asarray(cells, np.int64)[:, None]).reshape(-1).astype(np.int32)

    # ------------------------------------------------------------------ reads

    def history(self, il: int, hkv: int | None, start: int, count: int, streams: tuple[int, int] = (0, 1)):
        """Views of layer ``il``'s cached K [d_head, count, heads, ns] and V (V^T [count, d_head,
        heads, ns] when transposed) over positions [start, start + count) of the ``ns`` streams
        from ``s0`` (``streams=(s0, ns)``), for KV head ``hkv`` (heads = 1) or every KV head
        (``hkv=None``)."""
        sess, Dh, C, T = self.sess, self.d_head, self.n_cells, self.max_T
        s0, ns = streams
        heads, first = (self.n_kv, 0) if hkv is None else (1, hkv)
        at = s0 * T + start
        if ns == 1:   # a 3-D view, as before streams (the per-head graph's views)
            k = tnn.tnn_view_3d(sess, self.k_layers[il], Dh, count, heads, self.row_k, C * self.row_k,
                                (first * C + at) * self.row_k)
        else:
            k = tnn.tnn_view_4d(sess, self.k_layers[il], Dh, count, heads, ns, self.row_k, C * self.row_k,
                                T * self.row_k, (first * C + at) * self.row_k)
        if self.v_trans:
            e = self.v_elem
            args = (count, Dh, heads), (C * e, C * Dh * e), (first * Dh * C + at) * e, T * e
        else:
            args = (Dh, count, heads), (self.row_v, C * self.row_v), (first * C + at) * self.row_v, T * self.row_v
        (n0, n1, n2), (b1, b2), off, b3 = args
        v = tnn.tnn_view_3d(sess, self.v_layers[il], n0, n1, n2, b1, b2, off) if ns == 1 else \
            tnn.tnn_view_4d(sess, self.v_layers[il], n0, n1, n2, ns, b1, b2, b3, off)
        return k, v
