"""SmolLM2KVFFICache: the seed's engine class, the user's handle, as a thin face over the parts.

It keeps every public method and attribute of the seed (``realize_for``, ``realize_for_mmap``,
``realize_and_load_auto``, ``load_weights``, ``build_decode_step``, ``build_block_step``,
``build_attention_qhead_step``, ``build_moe_ffn``, ``alloc_2d_w``, ``head_nbytes``,
``read_persistent_mat``, the ``enable_*`` calls, the trace calls, and the attributes). Before
realize it gathers options (a frozen EngineOptions, replaced by each ``enable_*``) and the config;
realize hands both to an :class:`~toy_llm.engine.engine.Engine`, which does the work. Attributes
that mirror the config or the options are read-only properties: the config is read, never copied.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from .. import tinynn as tnn
from ..ggml_types import GGML_TYPE_F32
from ..gguf_load import ModelConfig
from . import attn_per_head, graph as graph_mod
from .cache import hadamard_matrix  # noqa: F401  (the seed's helper, re-exported)
from .engine import Engine
from .inputs import GraphInputs
from .ops import moe_ffn
from .options import BACKENDS, EngineOptions
from .weights import SmolLM2KVBlockFFI

BACKEND_KINDS = BACKENDS


@dataclass(frozen=True)
class SmolLM2KVStepResult:
    """Handles of one built graph: the token and position inputs, the logits, and every other
    input (masks, cache rows) in ``inputs``; ``inputs.upload`` sets them all."""

    t_token_id: object
    t_pos: object
    t_logits: object
    inputs: GraphInputs | None = None


def _config_property(field: str, default, doc: str = ""):
    def get(self):
        return default if self._config is None else getattr(self._config, field)
    return property(get, doc=doc or f"ModelConfig.{field} (read-only)")


class SmolLM2KVFFICache:
    """The seed's class: options and config before realize; realize -> an Engine; step / build_* run it."""

    def __init__(self, backend: str = "cpu", n_threads: int | None = None, options: EngineOptions | None = None):
        # the seed's legacy default: F32 weights on the copy path, the seed's per-head graph
        self.options = options or EngineOptions(backend=backend, n_threads=n_threads, graph="per_head",
                                                kv_type="f32", weight_type=GGML_TYPE_F32)
        self._config: ModelConfig | None = None
        self._moe: tuple[int, int] | None = None
        self.lora_q_rank = 0
        self.lora_q_adamw_enabled = False
        self.engine: Engine | None = None
        self._trace_wanted = False

    # ------------------------------------------------------------------ options (call before realize)

    def _set_options(self, **changes) -> None:
        self.options = replace(self.options, **changes)   # checked by EngineOptions

    def _before_realize(self, what: str) -> None:
        if self.engine is not None:
            raise RuntimeError(f"{what}: call before realize")

    def enable_kv_q8(self) -> None:
        """Q8_0 K and V caches; turns flash attention on (a Q8 V cannot be transposed for the plain path)."""
        self._before_realize("enable_kv_q8")
        self._set_options(kv_type="q8_0", flash_attn=True)

    def enable_flash_attn(self) -> None:
        """Fused softmax(QKᵀ·scale)·V via ggml_flash_attn_ext (inference only)."""
        self._before_realize("enable_flash_attn")
        self._set_options(flash_attn=True)

    def enable_moe(self, n_experts: int, n_experts_used: int) -> None:
        self._moe = (int(n_experts), int(n_experts_used))

    def enable_lora_q(self, r: int) -> None:
        """Per-Q-head LoRA (A: r x d_model, B: d_head x r), trainable F32 in the session buffer."""
        if r <= 0:
            raise ValueError(f"enable_lora_q: rank must be positive, got {r}")
        if self.options.fused:
            raise RuntimeError("enable_lora_q: LoRA-Q adapters are per head; use the per-head graph")
        self.lora_q_rank = int(r)

    def enable_lora_q_adamw(self) -> None:
        """Persistent AdamW moments beside each LoRA tensor (needs enable_lora_q first)."""
        if not self.lora_q_enabled:
            raise RuntimeError("enable_lora_q_adamw: call enable_lora_q(r) first")
        self.lora_q_adamw_enabled = True

    def enable_fused_heads(self) -> None:
        """Build each layer's attention with all heads in one tensor (llama.cpp's graph)."""
        if self.lora_q_enabled:
            raise RuntimeError("enable_fused_heads: LoRA-Q adapters are per head; use the per-head graph")
        self._set_options(graph="fused")

    def set_weight_type(self, t: int) -> None:
        """ggml type of 2-D linear weights on the copy path (0 = F32, 8 = Q8_0, or the file's own type)."""
        tnn.tnn_row_size(t, 256)   # raises TinyNNError for an unknown type
        self._set_options(weight_type=int(t))

    def apply_config(self, cfg: ModelConfig) -> None:
        """The model's dims and arch flags, read once from the GGUF (the seed set these from its flag detection)."""
        self._config = cfg

    @property
    def fused_heads(self) -> bool:
        """Which attention block step() builds; may change between steps (both share weights and cache)."""
        return self.options.fused

    @fused_heads.setter
    def fused_heads(self, on: bool) -> None:
        if on and self.lora_q_enabled:
            raise RuntimeError("fused heads: LoRA-Q adapters are per head; use the per-head graph")
        self._set_options(graph="fused" if on else "per_head")

    @property
    def repack_weights(self) -> bool:
        return self.options.repack_weights

    @repack_weights.setter
    def repack_weights(self, on: bool) -> None:
        self._before_realize("repack_weights")
        self._set_options(repack_weights=bool(on))

    # ------------------------------------------------------------------ the seed's attributes

    backend = property(lambda self: self.options.backend)
    n_threads = property(lambda self: self.options.n_threads)
    use_flash_attn = property(lambda self: self.options.flash_attn)
    kv_type_k = property(lambda self: self.options.kv_ggml_type)
    kv_type_v = property(lambda self: self.options.kv_ggml_type)
    lora_q_enabled = property(lambda self: self.lora_q_rank > 0)

    @property
    def weight_type(self) -> int:
        wt = self.options.weight_type
        if wt is None:
            return self._config.weight_type if self._config is not None else GGML_TYPE_F32
        return wt

    @property
    def config(self) -> ModelConfig | None:
        return self._config

    d_model = _config_property("d_model", 0)
    d_ff = _config_property("d_ff", 0)
    n_heads = _config_property("n_heads", 0)
    n_kv = _config_property("n_kv", 0)
    d_head = _config_property("head_dim", 0)
    n_layers = _config_property("n_layers", 0)
    vocab_size = _config_property("vocab", 0)
    rope_base = _config_property("rope_base", 10000.0)
    rope_dim = _config_property("rope_dim", 0)
    rope_mode = _config_property("rope_mode", tnn.ROPE_NORMAL)
    rms_eps = _config_property("rms_eps", 1.0e-5)
    has_untied_output = _config_property("untied_output", False)
    has_qkv_bias = _config_property("qkv_bias", False)
    qk_norm_kind = _config_property("qk_norm_kind", 0)
    swa_window = _config_property("swa_window", 0)
    has_post_norms = _config_property("post_norms", False)
    embed_scale = _config_property("embed_scale", 1.0)
    attn_softcap = _config_property("attn_softcap", 0.0)
    final_softcap = _config_property("final_softcap", 0.0)
    n_experts = _config_property("n_experts", 0)
    n_experts_used = _config_property("n_experts_used", 0)
    has_rope_freqs = _config_property("has_rope_freqs", False)

    @property
    def rope_scaling(self):
        from ..gguf_load import RopeScaling

        return RopeScaling.none() if self._config is None else self._config.rope_scaling

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv if self.n_kv else 0

    @property
    def has_qk_norm(self) -> bool:
        return self.qk_norm_kind != 0

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def swa_alternates(self) -> bool:
        """Gemma 2's pattern: every other layer (the even ones) uses the window."""
        p = self._config.swa_pattern if self._config is not None else ()
        return len(p) > 1 and all(on == (il % 2 == 0) for il, on in enumerate(p))

    # from the realized engine
    realized = property(lambda self: self.engine is not None and self.engine.realized)
    max_T = property(lambda self: self.engine.max_T if self.engine is not None else 0)
    sess = property(lambda self: self.engine.sess if self.engine is not None else None)
    gguf_handle_keepalive = property(lambda self: self.engine.gguf if self.engine is not None else None)

    def _weights(self):
        return self.engine.weights if self.engine is not None and self.engine.weights is not None else None

    t_token_embed = property(lambda self: self._weights() and self._weights().token_embd)
    t_final_norm_gamma = property(lambda self: self._weights() and self._weights().output_norm)
    t_output = property(lambda self: self._weights() and self._weights().output)
    t_rope_freq_factors = property(lambda self: self._weights() and self._weights().rope_freqs)
    per_head_attn = property(lambda self: bool(self._weights() and self._weights().per_head_file),
                             doc="the file stores attn_q/k/v per head (the seed's toy checkpoints)")

    @property
    def kv_blocks_ffi(self) -> list[SmolLM2KVBlockFFI]:
        return self._weights().layers if self._weights() else [SmolLM2KVBlockFFI()]

    @property
    def kv_cache(self):
        """The KVCache object (cache.py)."""
        return self.engine.cache if self.engine is not None else None

    t_k_hadamard = property(lambda self: self.kv_cache and self.kv_cache.rot_k)
    t_v_hadamard = property(lambda self: self.kv_cache and self.kv_cache.rot_v)
    v_trans = property(lambda self: bool(self.kv_cache and self.kv_cache.v_trans))

    # ------------------------------------------------------------------ trace

    def enable_trace(self) -> None:
        """Keep every hook point of the next steps; read them with dump_trace() (names: README)."""
        self._trace_wanted = True
        if self.engine is not None:
            self.engine.trace.enabled = True

    def trace_tap(self, name: str, t):
        """Name ``t`` (a hook-point name, hook_points.py) and, tracing, keep it readable after compute."""
        return self.engine.trace(t, name) if self.engine is not None else t

    def dump_trace(self) -> dict[str, np.ndarray]:
        """Hook points of the last computed step, full name -> float32 array [tokens, ...]."""
        return dict(self.engine.trace.last) if self.engine is not None else {}

    # ------------------------------------------------------------------ realize

    def _realize(self, cfg: ModelConfig, max_T: int, how) -> None:
        if self._moe is not None and not cfg.is_moe:
            cfg = replace(cfg, n_experts=self._moe[0], n_experts_used=self._moe[1])
        if self.engine is not None:
            self.close()
        self._config = cfg
        self.engine = Engine(cfg, self.options, int(max_T), self.lora_q_rank, self.lora_q_adamw_enabled)
        self.engine.trace.enabled = self._trace_wanted
        try:
            how(self.engine)
        except BaseException:
            self.close()
            raise

    def realize_for(self, max_T, d_model, d_ff, n_heads, n_kv, n_layers, vocab_size, rope_base, rms_eps,
                    untied, qkv_bias, d_head: int | None = None) -> None:
        """Copy path: declare every persistent tensor in the session's buffer; fill with load_weights(path).
        The arch flags come from apply_config (a plain llama without it); ``d_head`` defaults to
        d_model / n_heads as in the seed."""
        cfg = ModelConfig.from_dims(d_model, d_ff, n_heads, n_kv, n_layers, vocab_size, rope_base, rms_eps, untied,
                                    qkv_bias, d_head, base=self._config)
        wt = self.options.weight_type
        if wt is None:   # each tensor in the file's own type, the embedding too (tied models reuse it)
            how = lambda e: e.realize_copy(cfg.weight_type, cfg.weight_type, dict(cfg.tensor_types))  # noqa: E731
        else:            # the seed keeps the embedding table F32 on this path
            how = lambda e: e.realize_copy(wt, GGML_TYPE_F32, None)  # noqa: E731
        self._realize(cfg, max_T, how)

    def realize_for_mmap(self, gguf_handle, cfg: ModelConfig, max_T: int, untied: bool, qkv_bias: bool,
                         qk_norm: bool = False) -> None:
        """BYO-pointer path: weights point into the GGUF's mapped pages; only caches live in the session.
        The cache owns ``gguf_handle`` from here on (close() frees it, also when this call fails)."""
        cfg = replace(cfg, untied_output=untied, qkv_bias=qkv_bias,
                      qk_norm_kind=cfg.qk_norm_kind or (1 if qk_norm else 0))

        owned = []   # set once the engine holds the handle (its close frees it, on failure too)

        def how(e: Engine):
            owned.append(True)
            e.realize_mmap(gguf_handle)
        try:
            self._realize(cfg, max_T, how)
        except BaseException:
            if not owned:
                tnn.tnn_gguf_free(gguf_handle)
            raise

    def realize_and_load_auto(self, gguf_path: str, max_T: int, cfg: ModelConfig, flags=None):
        """The seed's dispatch: files with ``toy.ggml_native`` take the mmap path, others the copy path.

        Returns the GGUF handle (mmap path) or None (copy path)."""
        untied = cfg.untied_output if flags is None else flags.untied
        qkv_bias = cfg.qkv_bias if flags is None else flags.qkv_bias
        g = tnn.tnn_gguf_load(str(gguf_path))
        if tnn.tnn_gguf_get_bool(g, "toy.ggml_native") == 1:
            self.set_weight_type(cfg.weight_type)
            self.realize_for_mmap(g, cfg, max_T, untied, qkv_bias, cfg.qk_norm_kind != 0)
            return g
        tnn.tnn_gguf_free(g)
        self.apply_config(cfg)
        self.realize_for(max_T, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv, cfg.n_layers, cfg.vocab,
                         cfg.rope_base, cfg.rms_eps, untied, qkv_bias, d_head=cfg.head_dim)
        self.load_weights(gguf_path)
        return None

    def load_weights(self, path: str, progress: bool = False) -> None:
        """Fill a realize_for cache from a GGUF (types converted with ggml's own (de)quantizer)."""
        if self.engine is None:
            raise RuntimeError("load_weights: call realize_for first")
        self.engine.load_weights(path, progress=progress)

    def alloc_2d_w(self, rows: int, cols: int):
        """One persistent 2-D linear weight at the configured weight type (the seed's helper)."""
        if self.weight_type == GGML_TYPE_F32:
            return tnn.tnn_input_2d_f32_persistent(self.sess, rows, cols)
        return tnn.tnn_input_2d_persistent_typed(self.sess, rows, cols, self.weight_type)

    def head_nbytes(self, ggml_type: int, d_head: int, d_model: int) -> int:
        """Byte stride of one head's d_head rows of a fused [n_heads*d_head, d_model] weight."""
        return d_head * tnn.tnn_row_size(ggml_type, d_model)   # raises on a bad type/shape

    def upload_lora_q_init(self, seed: int, init_scale: float = 0.01) -> None:
        """Standard LoRA init: A ~ N(0, init_scale^2), B = 0, so the adapter starts as a no-op."""
        if not self.lora_q_enabled:
            return
        rng = np.random.default_rng(seed)
        zb = np.zeros((self.d_head, self.lora_q_rank), np.float32)
        for blk in self.kv_blocks_ffi:
            for hq in range(self.n_heads):
                a = (init_scale * rng.standard_normal((self.lora_q_rank, self.d_model))).astype(np.float32)
                tnn.upload(self.sess, blk.t_w_lora_a_q[hq], a)
                tnn.upload(self.sess, blk.t_w_lora_b_q[hq], zb)

    def build_lora_train_step(self, n_tokens: int, n_rows: int, lora_scale: float, optimizer: bool = True,
                              keep_grads: bool = False):
        """A LoRA-Q training graph (engine/train_graph.py) over ``n_tokens`` positions, ``n_rows`` of
        them in the cross-entropy: forward, ggml's backward and, with ``optimizer``, the clipped AdamW
        step of every adapter (moments: the t_w_lora_*_m / _v tensors). Needs enable_lora_q (and
        enable_lora_q_adamw for the optimizer) before realize. Returns its TrainGraph handles."""
        from . import train_graph

        e = self._engine("build_lora_train_step")
        if not self.lora_q_enabled:
            raise RuntimeError("build_lora_train_step: call enable_lora_q(r) before realize")
        return train_graph.build(e.context(), n_tokens, n_rows, lora_scale, optimizer=optimizer,
                                 keep_grads=keep_grads)

    def read_persistent_mat(self, t, rows: int, cols: int) -> np.ndarray:
        """Any persistent F32 tensor back as a (rows, cols) numpy matrix."""
        return tnn.download_to_mat(self.sess, t, rows, cols)

    # ------------------------------------------------------------------ the seed's graph builders

    def _engine(self, what: str) -> Engine:
        if self.engine is None or not self.engine.realized:
            raise RuntimeError(f"{what}: the cache is not realized (realize it first) or was closed")
        return self.engine

    def build_decode_step(self, pos: int, n_tokens: int = 1) -> SmolLM2KVStepResult:
        """A new graph for ``n_tokens`` positions ending at ``pos`` (one for the per-head graph),
        with the current attention block; realize ``t_logits``, then ``inputs.upload``, compute."""
        e = self._engine("build_decode_step")
        fused = self.options.fused
        inp = e.new_graph(n_tokens, pos, masked=fused or not self.options.flash_attn, rows_as_inputs=fused)
        t_logits = graph_mod.forward(e.context(), inp, self.options.graph)
        return SmolLM2KVStepResult(inp.tokens, inp.positions, t_logits, inp)

    def _seed_inputs(self, t_pos, pos: int, inputs: GraphInputs | None) -> GraphInputs:
        """The inputs a seed-style builder call works with: those of the graph being built, or
        the seed's own (this position, no masks: the exact history views)."""
        return inputs if inputs is not None else GraphInputs(1, pos, None, t_pos)

    def build_block_step(self, t_x, blk, t_pos, pos, scale=None, eps=None, bytes_d_head=None, bytes_d_head_k=None,
                         bytes_d_head_v=None, bytes_max_T=None, layer_idx=0, inputs: GraphInputs | None = None):
        """One transformer block of the graph being built. The seed's signature; ``blk``, ``scale``,
        ``eps`` and the byte sizes are read from the realized model instead (kept for callers)."""
        e = self._engine("build_block_step")
        return graph_mod.layer(e.context(), self._seed_inputs(t_pos, pos, inputs), layer_idx, t_x,
                               graph_mod.ATTENTION[self.options.graph])

    def build_attention_qhead_step(self, t_h, blk, hq, t_pos, pos, scale=None, bytes_d_head=None,
                                   bytes_d_head_k=None, bytes_d_head_v=None, bytes_max_T=None, tag=None,
                                   tap_this_head=None, layer_idx=0, t_q_normed=None,
                                   inputs: GraphInputs | None = None):
        """One query head against the (already written) K/V of its KV head hq // group_size
        (attn_per_head.query_head). The seed's signature; the unused arguments are kept for callers."""
        e = self._engine("build_attention_qhead_step")
        return attn_per_head.query_head(e.context(), self._seed_inputs(t_pos, pos, inputs), layer_idx, hq, t_h,
                                        t_q_normed)

    def build_moe_ffn(self, blk, t_h2, tag: str = ""):
        """The routed FFN of a block (ops.moe_ffn); ``tag`` "L<i>." names the layer for the taps."""
        e = self._engine("build_moe_ffn")
        m = re.match(r"L(\d+)", tag or "")
        return moe_ffn(e.sess, t_h2, blk, e.cfg, e.trace, int(m.group(1)) if m else None)

    # ------------------------------------------------------------------ running

    def step(self, token_id: int, pos: int) -> np.ndarray:
        """Build (or replay), run and read one position: logits (vocab,) of ``token_id`` at ``pos``."""
        return self._engine("step").step(token_id, pos, self.options.graph)

    def step_batch(self, token_ids, pos0: int, all_logits: bool = True) -> np.ndarray:
        """Prefill: ``token_ids`` at positions pos0, pos0+1, ... in one fused graph (llama.cpp's ubatch)."""
        if not self.options.fused:
            raise RuntimeError("step_batch: needs the fused graph (graph='fused'); the per-head graph "
                               "evaluates one position per graph")
        return self._engine("step_batch").step_batch(token_ids, pos0, all_logits)

    def close(self) -> None:
        """Free the session, then the mapping it points into."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# The seed's names.
SmolLM2KVFFICacheMetal = SmolLM2KVFFICache
SmolLM2KVBlockFFIMetal = SmolLM2KVBlockFFI
SmolLM2KVStepResultMetal = SmolLM2KVStepResult
