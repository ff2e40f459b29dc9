"""GraphInputs: the inputs of one built graph (llama.cpp's llm_graph_input_*), made with it and
uploaded before each compute. A graph's builders read these, never attributes of the engine."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import tinynn as tnn
from .cache import KVCache


@dataclass
class GraphInputs:
    """``n_tokens`` positions ending at ``last_pos``.

    * ``kv_len``: the padded KV length attended behind ``masks`` (one mask per distinct layer
      window, [kv_len, n_tokens]); None: attention reads exactly the history positions (the seed's
      per-head graph under flash attention), with no mask.
    * ``kv_rows`` (+ ``v_idx`` for a transposed V): the cache rows the graph writes, as inputs
      (replayable graphs); None: the new K/V are copied into the slot at ``last_pos``.
    * ``out_rows``: the rows (``out_idx``) whose logits are wanted (llama.cpp's inp_out_ids); None: all.
    * ``streams``: (s0, ns): the tokens belong to the ns consecutive sequence streams from s0,
      n_tokens / ns of each, stream-major (llama.cpp's split_equal ubatch); positions are within
      each stream, and attention reads each token's own stream only.
    """

    n_tokens: int
    last_pos: int
    tokens: object
    positions: object
    kv_len: int | None = None
    masks: dict = field(default_factory=dict)
    kv_rows: object = None
    v_idx: object = None
    out_rows: object = None
    out_idx: tuple = ()
    streams: tuple = (0, 1)
    constants: list = field(default_factory=list)   # (tensor, array | positions -> array): interventions' values
    hook_keys: list = field(default_factory=list)   # the Python hooks this graph calls (interventions.py)

    @classmethod
    def new(cls, sess, cache: KVCache, windows, n_tokens: int, last_pos: int, *, masked: bool,
            rows_as_inputs: bool, last_only: bool = False, streams: tuple[int, int] = (0, 1),
            outputs: tuple[int, ...] | None = None) -> "GraphInputs":
        """Declare the inputs of a graph (before its builders run). ``outputs``: the rows whose logits
        are wanted (``last_only``: the last); None: every row."""
        s0, ns = streams
        if not (0 <= s0 and 1 <= ns and s0 + ns <= cache.n_stream and n_tokens % ns == 0):
            raise ValueError(f"streams {s0}..{s0 + ns - 1} for {n_tokens} tokens: the cache has {cache.n_stream} "
                             f"streams, and each stream of a graph has the same number of tokens")
        if not 0 <= last_pos - n_tokens // ns + 1 <= last_pos < cache.max_T:
            raise ValueError(f"positions {last_pos - n_tokens // ns + 1}..{last_pos} outside the cache "
                             f"(max_T={cache.max_T})")
        inp = cls(n_tokens, last_pos, tnn.tnn_input_1d_i32(sess, n_tokens), tnn.tnn_input_1d_i32_ctx(sess, n_tokens),
                  streams=(s0, ns))
        tnn.tnn_set_name(inp.tokens, "inp_tokens")
        tnn.tnn_set_name(inp.positions, "inp_pos")
        if masked:
            inp.kv_len = cache.padded_len(last_pos)
            inp.masks = {w: tnn.tnn_input_4d(sess, cache.mask_type, inp.kv_len, n_tokens // ns, 1, ns)
                         for w in sorted(windows)}
        if rows_as_inputs:
            inp.kv_rows = tnn.tnn_input_1d_i32(sess, n_tokens)
            if cache.v_trans:
                inp.v_idx = tnn.tnn_input_1d_i32(sess, cache.n_kv * cache.d_head * n_tokens)
        if last_only:
            outputs = (n_tokens - 1,)
        if outputs is not None:
            if not outputs or any(not 0 <= r < n_tokens for r in outputs):
                raise ValueError(f"output rows {outputs} outside the graph's {n_tokens} tokens")
            inp.out_idx = tuple(outputs)
            inp.out_rows = tnn.tnn_input_1d_i32(sess, len(outputs))
        return inp

    def upload(self, sess, cache: KVCache, ids: np.ndarray, positions: np.ndarray) -> None:
        """Set every input for ``ids`` at ``positions`` (after the graph is allocated)."""
        positions = np.asarray(positions, np.int32)
        s0, ns = self.streams
        cells = cache.cells(positions, None if ns == 1 and s0 == 0 else
                            s0 + np.arange(self.n_tokens) // (self.n_tokens // ns))
        for window, t_mask in self.masks.items():
            tnn.upload(sess, t_mask, cache.mask(positions, window, self.kv_len))
        tnn.upload(sess, self.tokens, np.asarray(ids, np.int32))
        tnn.upload(sess, self.positions, positions)
        if self.kv_rows is not None:
            tnn.upload(sess, self.kv_rows, cells)
        if self.v_idx is not None:
            tnn.upload(sess, self.v_idx, cache.v_write_index(cells))
        if self.out_rows is not None:
            tnn.upload(sess, self.out_rows, np.array(self.out_idx, np.int32))
        for t, value in self.constants:
            tnn.upload(sess, t, value(positions) if callable(value) else value)

    def constant(self, sess, value):
        """An F32 input holding ``value`` (an array, or a function of the graph's positions giving
        one, e.g. a patch's rows), uploaded with the other inputs: 1-D [n], or [k, rows] for 2-D."""
        # positions of the right count for the shape (with several streams the real ones differ per stream)
        first = np.maximum(np.arange(self.last_pos - self.n_tokens + 1, self.last_pos + 1, dtype=np.int32), 0)
        arr = np.asarray(value(first) if callable(value) else value, np.float32)
        if arr.ndim == 1:
            t = tnn.tnn_input_1d_f32(sess, arr.shape[0])
        elif arr.ndim == 2:
            t = tnn.tnn_input_2d_f32(sess, arr.shape[0], arr.shape[1])
        else:
            raise ValueError(f"a graph constant has 1 or 2 dimensions, got shape {arr.shape}")
        self.constants.append((t, value if callable(value) else arr))
        return t

    def span(self, window: int):
        """(start, count, mask) of the cached positions this graph's attention reads in a layer with
        ``window`` (0: the whole context): the padded length behind the window's mask, or without
        masks exactly the positions the last position may see."""
        if self.kv_len is not None:
            return 0, self.kv_len, self.masks[window]
        pos = self.last_pos
        if window > 0 and pos + 1 > window:
            return pos + 1 - window, window, None
        return 0, pos + 1, None
