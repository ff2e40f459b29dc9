"""Engine: one realized model in one libtinynn session, and the graphs run on it.

backend -> session -> persistent buffers (weights, KV cache) -> graph -> compute, as ggml's
simple-backend example. ``step`` runs one position (the per-head graph rebuilt each time; the
fused graph built once per padded KV length and replayed with new inputs), ``step_batch`` a
ubatch of positions in one fused graph; with tracing on, every graph is rebuilt with its taps.
"""
from __future__ import annotations

import operator
import threading

import numpy as np

from .. import tinynn as tnn
from ..gguf_load import ModelConfig
from .batch import split_equal
from .cache import KVCache
from .context import BuildContext
from .graph import forward
from .hook_points import READ_ONLY, Trace, hook_point
from .inputs import GraphInputs
from .interventions import dispatcher
from .ops import tiled_matmul
from .options import BACKENDS, EngineOptions
from .weights import CopyWeights, MmapWeights, ModelWeights, declare_weights


def check_token_ids(tokens, vocab: int, what: str) -> list[int]:
    """``tokens`` (ints, numpy ints or an integer array) as a list of ids, each checked against the
    vocabulary; floats, bools and strings are refused rather than truncated or parsed."""
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise TypeError(f"{what}: tokens must be a sequence of token ids, got {type(tokens).__name__}")
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind not in "iu":
        raise TypeError(f"{what}: token ids must be integers, got an array of {tokens.dtype}")
    ids = []
    for t in tokens:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{what}: token ids must be ints, got {t!r} ({type(t).__name__}) at index {len(ids)}")
        t = int(t)
        if not 0 <= t < vocab:
            raise ValueError(f"{what}: token id {t} at index {len(ids)} is outside the vocabulary (0..{vocab - 1})")
        ids.append(t)
    return ids


def _serialised(method):
    """Run ``method`` under the engine's lock: a second thread waits for the running graph (the
    session, its graph arena and the KV cache are one mutable state), and close waits too."""
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    locked.__name__, locked.__qualname__, locked.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return locked


class Engine:
    """Realize with :meth:`realize_mmap` or :meth:`realize_copy` (+ :meth:`load_weights`), then step."""

    def __init__(self, cfg: ModelConfig, opts: EngineOptions, max_T: int, lora_rank: int = 0,
                 lora_adamw: bool = False):
        if cfg.n_heads <= 0 or cfg.n_kv <= 0 or cfg.n_heads % cfg.n_kv:
            raise ValueError(f"n_heads ({cfg.n_heads}) must be a positive multiple of n_kv ({cfg.n_kv})")
        if type(max_T) is not int or max_T <= 0:
            raise ValueError(f"max_T must be a positive int, got {max_T!r}")
        if opts.fused and cfg.per_head_qkv:
            raise ValueError(f"{cfg.path}: attn_q/k/v are stored one tensor per head (the seed's toy checkpoint "
                             f"layout), which only the per-head graph reads: load it with graph='per_head'")
        self.cfg, self.opts, self.max_T = cfg, opts, max_T
        self.lora_rank, self.lora_adamw = lora_rank, lora_adamw
        self.sess = None
        self.gguf = None                  # the mapping the weights point into (mmap path)
        self.weights: ModelWeights | None = None
        self.cache: KVCache | None = None
        self.source = None
        self.trace = Trace(cfg)
        self.windows = frozenset(cfg.layer_window)   # one mask input per distinct layer window
        self._replay = None               # (padded KV length, inputs, logits) of the graph kept for replay
        self._inputs: GraphInputs | None = None   # those of the graph built last
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ realize

    def _declare(self, source) -> None:
        self.source = source
        self.weights = declare_weights(self.sess, source, self.cfg, self.lora_rank, self.lora_adamw,
                                       self.opts.lora_q_slots)
        kv = self.opts.kv_ggml_type
        self.cache = KVCache(self.sess, self.cfg.n_layers, self.cfg.n_kv, self.cfg.head_dim, self.max_T, kv, kv,
                             self.opts.flash_attn, n_stream=self.opts.n_seq)
        for il, blk in enumerate(self.weights.layers):   # the seed keeps the cache's views on the block
            blk.t_K_layer, blk.t_V_layer = self.cache.k_layers[il], self.cache.v_layers[il]
            blk.t_K, blk.t_V = self.cache.k_heads[il], self.cache.v_heads[il]
        tnn.tnn_finalize_weights(self.sess)
        self.weights.after_finalize(self.sess, self.cfg)
        self.cache.after_finalize()

    def _new_session(self) -> None:
        self.sess = tnn.tnn_session_new(BACKENDS[self.opts.backend])
        if self.opts.n_threads:
            tnn.tnn_session_set_n_threads(self.sess, self.opts.n_threads)
        if self.opts.threadpool:
            tnn.tnn_session_set_threadpool(self.sess, 1)
        # llama.cpp keeps CPU matmul weights of some types (Q4_0, Q4_K, ... per CPU) in ggml's
        # interleaved CPU_REPACK layout; using it too runs the same kernels, so the same rounding
        tnn.tnn_session_set_weight_repack(self.sess, 1 if self.opts.repack_weights else 0)

    def realize_mmap(self, gguf_handle) -> None:
        """Weights point into ``gguf_handle``'s mapped pages, which the engine then owns (freed by close)."""
        self.gguf = gguf_handle
        self._new_session()
        self._declare(MmapWeights(self.sess, gguf_handle, self.cfg.path))

    def realize_copy(self, weight_type: int, embed_type: int, file_types: dict | None) -> None:
        """Weights in the session's buffer (filled by :meth:`load_weights`)."""
        self._new_session()
        self._declare(CopyWeights(self.sess, weight_type, embed_type, file_types))

    def load_weights(self, path: str, progress: bool = False) -> None:
        if not isinstance(self.source, CopyWeights):
            raise RuntimeError("load_weights: only after realize_for (the mmap path needs no load)")
        self.source.load(path, progress=progress)

    @property
    def realized(self) -> bool:
        return self.cache is not None and self.sess is not None

    def context(self) -> BuildContext:
        if not self.realized:
            raise RuntimeError("the engine is not realized (or was closed)")
        return BuildContext(self.sess, self.cfg, self.weights, self.cache, self.trace, self.mm)

    @property
    def mm(self):
        """The weight product of inference graphs: on the CPU backend ops.tiled_matmul (the tiled
        kernels where they apply), else ggml_mul_mat."""
        if self.opts.tiles and tnn.tnn_session_backend_kind(self.sess) == 0:
            return tiled_matmul
        return tnn.tnn_matmul

    # ------------------------------------------------------------------ graphs

    def new_graph(self, n_tokens: int, last_pos: int, *, masked: bool, rows_as_inputs: bool,
                  last_only: bool = False, streams: tuple[int, int] = (0, 1), outputs=None) -> GraphInputs:
        """Start a graph: drop the previous one, declare the new one's inputs."""
        ctx = self._drop_graph()
        self._inputs = GraphInputs.new(ctx.sess, ctx.cache, self.windows, n_tokens, last_pos, masked=masked,
                                       rows_as_inputs=rows_as_inputs, last_only=last_only, streams=streams,
                                       outputs=outputs)
        self.trace.begin(self.sess, self._inputs)
        return self._inputs

    def _drop_graph(self) -> BuildContext:
        """Drop the graph built last (and its Python hooks): the session is ready for a new one."""
        ctx = self.context()
        tnn.tnn_reset_for_rebuild(self.sess)
        self._replay = None
        if self._inputs is not None:
            dispatcher().release(self._inputs.hook_keys)
            self._inputs = None
        return ctx

    def set_hooks(self, hooks) -> None:
        """(matcher, Intervention) pairs every graph from now on applies (the replayed graph is rebuilt).
        A matcher that names a hook point must name one that exists and can be changed."""
        hooks = tuple(hooks)
        for match, _ in hooks:
            if isinstance(match, str):
                hook_point(match)   # KeyError naming an unknown hook point
                if match.endswith(READ_ONLY):
                    raise ValueError(f"{match} is read-only (it is computed beside the graph for reading: hook "
                                     f"the tensors it is computed from instead)")
        self.trace.hooks = hooks
        self._replay = None

    def build(self, inp: GraphInputs, graph: str):
        """The logits tensor of ``graph`` ("fused" | "per_head") over ``inp``, allocated and ready."""
        logits = forward(self.context(), inp, graph)
        tnn.tnn_realize(self.sess, logits)
        return logits

    def run(self, inp: GraphInputs, logits, ids, positions) -> np.ndarray:
        """Upload ``inp`` for ``ids`` at ``positions``, compute, read the logits [rows, vocab]."""
        inp.upload(self.sess, self.cache, ids, positions)
        tnn.tnn_compute(self.sess)
        if inp.hook_keys:
            dispatcher().raise_pending()
        if self.trace.enabled:
            self.trace.collect(self.sess)
        return tnn.download(self.sess, logits).reshape(-1, self.cfg.vocab)

    @_serialised
    def step(self, token_id: int, pos: int, graph: str) -> np.ndarray:
        """Logits (vocab,) of ``token_id`` at ``pos``; the cache advances."""
        ids = np.array(check_token_ids([token_id], self.cfg.vocab, "step"), np.int64)
        pos = operator.index(pos)
        if not 0 <= pos < self.max_T:
            raise ValueError(f"position {pos} outside the cache (max_T={self.max_T})")
        if graph == "per_head":
            # the seed's graph, rebuilt at each position; without flash attention it reduces over
            # llama.cpp's padded length behind a mask, so its sums round as llama.cpp's do
            inp = self.new_graph(1, pos, masked=not self.opts.flash_attn, rows_as_inputs=False)
            return self.run(inp, self.build(inp, graph), ids, [pos]).reshape(-1)
        return self._replayed(ids, np.array([pos]), (0, 1)).reshape(-1)

    def _replayed(self, ids, positions, streams, outputs=None) -> np.ndarray:
        """A fused graph of ``ids`` at ``positions`` in ``streams`` (logits of the rows ``outputs``;
        None: all), kept and replayed while its shape (tokens, streams, outputs, padded KV length)
        stays the same."""
        key = (ids.size, streams, outputs, self.cache.padded_len(int(positions.max())))
        if self.trace.enabled or self._replay is None or self._replay[0] != key:
            inp = self.new_graph(ids.size, int(positions.max()), masked=True, rows_as_inputs=True, streams=streams,
                                 outputs=outputs)
            logits = self.build(inp, "fused")
            if not self.trace.enabled:   # a traced graph keeps its taps as outputs: rebuild it each time
                self._replay = (key, inp, logits)
        else:
            _, inp, logits = self._replay
        return self.run(inp, logits, ids, positions)

    @_serialised
    def step_batch(self, token_ids, pos0: int, all_logits: bool = True, seq: int = 0) -> np.ndarray:
        """``token_ids`` at positions pos0, pos0+1, ... of sequence slot ``seq`` in one fused graph,
        as llama.cpp computes one ubatch: logits [n, vocab], or with ``all_logits=False`` the last
        position's [1, vocab] (the last layer then runs on that position alone, as llama.cpp's does)."""
        if isinstance(token_ids, np.ndarray):
            token_ids = token_ids.reshape(-1)
        ids = np.array(check_token_ids(token_ids, self.cfg.vocab, "step_batch"), np.int64)
        pos0 = operator.index(pos0)
        n = ids.size
        if n == 0:
            return np.zeros((0, self.cfg.vocab), np.float32)
        if pos0 < 0 or pos0 + n > self.max_T:
            raise ValueError(f"positions {pos0}..{pos0 + n - 1} outside the cache (max_T={self.max_T})")
        streams, positions = (self._seq(seq), 1), np.arange(pos0, pos0 + n)
        if all_logits or n == 1:   # kept for the next batch of this shape (speculation's verify batches)
            return self._replayed(ids, positions, streams)
        inp = self.new_graph(n, pos0 + n - 1, masked=True, rows_as_inputs=True, last_only=True, streams=streams)
        return self.run(inp, self.build(inp, "fused"), ids, positions)

    def _seq(self, seq) -> int:
        seq = operator.index(seq)
        if not 0 <= seq < self.opts.n_seq:
            raise ValueError(f"sequence {seq} outside the cache's {self.opts.n_seq} sequences (load with n_seq=...)")
        return seq

    @_serialised
    def step_seqs(self, token_ids, positions, seqs, logits=None) -> np.ndarray:
        """A batch of tokens of several sequences (llama.cpp's llama_batch, one seq_id per token):
        token i at ``positions[i]`` of sequence ``seqs[i]``, attending to its own sequence only.
        The batch runs as llama.cpp cuts it (batch.split_equal: consecutive sequences, as many
        tokens of each, per graph), so each token's logits are llama.cpp's. ``logits``: a flag per
        token, whether its logits are wanted (llama_batch.logits; None: all). Returns the wanted
        rows [k, vocab] in batch order."""
        ids = np.array(check_token_ids(token_ids, self.cfg.vocab, "step_seqs"), np.int64)
        positions = np.array([operator.index(p) for p in positions], np.int64)
        seqs = [self._seq(q) for q in seqs]
        n = ids.size
        if not n == positions.size == len(seqs):
            raise ValueError(f"step_seqs: {n} tokens, {positions.size} positions and {len(seqs)} sequences")
        if n == 0:
            return np.zeros((0, self.cfg.vocab), np.float32)
        if positions.min() < 0 or positions.max() >= self.max_T:
            raise ValueError(f"step_seqs: positions {positions.tolist()} outside a sequence of max_T={self.max_T}")
        for q in set(seqs):   # llama.cpp: each sequence's positions in the batch follow one another
            p = positions[[i for i, s in enumerate(seqs) if s == q]]
            if np.any(np.diff(p) != 1):
                raise ValueError(f"step_seqs: sequence {q}'s positions {p.tolist()} are not consecutive")
        want = np.ones(n, bool) if logits is None else np.array([bool(x) for x in logits])
        if want.size != n:
            raise ValueError(f"step_seqs: {want.size} logits flags for {n} tokens")
        out = np.empty((n, self.cfg.vocab), np.float32)
        for idx in split_equal(seqs, self.opts.n_batch):
            idx = np.array(idx)
            streams = (seqs[idx[0]], len({seqs[i] for i in idx}))
            rows = np.flatnonzero(want[idx])
            if rows.size == idx.size:
                got = self._replayed(ids[idx], positions[idx], streams)
                if idx.size == n and np.array_equal(idx, np.arange(n)):   # the whole batch, in order: no copy
                    return got
                out[idx] = got
            else:   # the last layer runs on the wanted rows only (none wanted: any one row, dropped)
                got = self._replayed(ids[idx], positions[idx], streams, tuple(rows.tolist()) or (idx.size - 1,))
                out[idx[rows]] = got[:rows.size]
        return out[want]

    @_serialised
    def copy_seq(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` positions of sequence ``src``'s K and V into sequence ``dst`` (llama.cpp's
        llama_memory_seq_cp across streams, which copies the stream's buffers): ``dst`` then
        continues from ``src``'s prefix without evaluating it again."""
        src, dst, n = self._seq(src), self._seq(dst), operator.index(n)
        if not 0 <= n <= self.max_T:
            raise ValueError(f"copy_seq: {n} positions outside a sequence of max_T={self.max_T}")
        if src == dst or n == 0:
            return
        self._drop_graph()
        last = None
        for il in range(self.cfg.n_layers):
            for h in range(self.cfg.n_kv):   # a head at a time: its K rows are contiguous (a Q8_0 copy needs it)
                for a, b in zip(self.cache.history(il, h, 0, n, (src, 1)), self.cache.history(il, h, 0, n, (dst, 1))):
                    last = tnn.tnn_cpy(self.sess, a, b)
                    tnn.tnn_add_to_graph(self.sess, last)
        tnn.tnn_realize(self.sess, last)
        tnn.tnn_compute(self.sess)

    @_serialised
    def set_lora_q(self, adapter, scale: float | None) -> None:
        """Upload ``adapter`` (a LoraAdapter whose rank and layers are ``opts.lora_q_slots``) into the
        inference LoRA-Q tensors and apply it with ``scale`` (llama.cpp's float32 alpha / rank *
        lora_scale) from the next graph on; ``adapter=None`` stops applying it (the tensors stay)."""
        if not self.realized:
            raise RuntimeError("set_lora_q: the engine is not realized (or was closed)")
        if adapter is not None:
            for il, blk in enumerate(self.weights.layers):
                if blk.t_lora_q_a is not None:
                    a, b = adapter.q[il]
                    tnn.upload(self.sess, blk.t_lora_q_a, a)
                    tnn.upload(self.sess, blk.t_lora_q_b, b)
        self.weights.lora_q_scale = None if adapter is None else float(scale)
        self._replay = None   # the replayed decode graph holds the old scale / adapter term

    # ------------------------------------------------------------------ lifetime

    @_serialised
    def close(self) -> None:
        """Free the session, then the mapping it points into."""
        self._replay = None
        self.cache = None
        self.weights = None
        if self._inputs is not None:     # the Python hooks of the last graph
            dispatcher().release(self._inputs.hook_keys)
            self._inputs = None
        if self.sess is not None:
            tnn.tnn_session_free(self.sess)
            self.sess = None
        if self.gguf is not None:
            tnn.tnn_gguf_free(self.gguf)
            self.gguf = None
