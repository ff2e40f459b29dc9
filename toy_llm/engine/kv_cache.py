"""SmolLM2KVFFICache: the seed's engine class, ported from Ruby to Python.

One instance owns a libtinynn session, the persistent weights (mapped from the
GGUF or copied into the session), and the K/V cache (one [d_head, max_T, n_kv]
tensor per layer, V transposed to [max_T, d_head, n_kv] for plain attention on an
F32 cache as llama.cpp's v_trans, with a view per KV head). It builds the seed's *per-head*
decode graph one position at a time: every query head is its own matmul ->
rope -> attention chain, so every intermediate is a visible, nameable tensor
(``enable_trace``). Beside it, ``enable_fused_heads`` builds each layer with all
heads in one tensor, as llama.cpp does: the same logits from ~1/4 of the nodes,
on the same weights and the same cache (the builders can take turns); its decode
graph is built once and replayed, and ``step_batch`` evaluates many positions in
one graph (batched prefill, llama.cpp's ubatch numbers).

Where the seed approximates, llama.cpp decides (see the comments marked
"llama.cpp:"), because parity with llama.cpp is how we know the numbers are
right.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import tinynn as tnn
from ..gguf_load import ModelConfig, RopeScaling, detect_weight_type, inv_sqrt_f32
from .fused import FusedHeadsMixin
from .weights import CopyWeights, MmapWeights, Slice

GGML_TYPE_F32 = tnn.GGML_TYPE_F32
GGML_TYPE_F16 = tnn.GGML_TYPE_F16
GGML_TYPE_Q8_0 = tnn.GGML_TYPE_Q8_0

BACKEND_KINDS = {"cpu": 0, "cuda": 1, "metal": 2}

# llama.cpp pads the attended KV length to a multiple of 256 (llama_kv_cache::get_n_kv) and masks
# the tail; the plain attention path reduces over the same length so its sums round identically.
LLAMA_KV_PAD = 256


@dataclass
class SmolLM2KVBlockFFI:
    """Persistent tensors of one transformer block (per-head lists where the seed has them)."""

    t_rn1_gamma: object = None
    t_rn2_gamma: object = None
    t_post_attn_norm_gamma: object = None
    t_post_ffn_norm_gamma: object = None
    t_q_norm_gamma: object = None
    t_k_norm_gamma: object = None
    t_w_q: list = field(default_factory=list)
    t_b_q: list = field(default_factory=list)
    t_w_k: list = field(default_factory=list)
    t_w_v: list = field(default_factory=list)
    t_b_k: list = field(default_factory=list)
    t_b_v: list = field(default_factory=list)
    t_K: list = field(default_factory=list)     # per KV head: views of t_K_layer
    t_V: list = field(default_factory=list)
    t_K_layer: object = None                      # the layer's cache [d_head, max_T, n_kv]
    t_V_layer: object = None
    t_w_o: object = None
    t_w_gate: object = None
    t_w_up: object = None
    t_w_down: object = None
    t_w_router: object = None
    t_w_gate_exps: object = None
    t_w_up_exps: object = None
    t_w_down_exps: object = None
    t_w_lora_a_q: list = field(default_factory=list)
    t_w_lora_b_q: list = field(default_factory=list)
    t_w_lora_a_q_m: list = field(default_factory=list)
    t_w_lora_a_q_v: list = field(default_factory=list)
    t_w_lora_b_q_m: list = field(default_factory=list)
    t_w_lora_b_q_v: list = field(default_factory=list)
    # whole attention projections, for the fused-heads builder (enable_fused_heads)
    t_w_q_all: object = None
    t_w_k_all: object = None
    t_w_v_all: object = None
    t_b_q_all: object = None
    t_b_k_all: object = None
    t_b_v_all: object = None


@dataclass(frozen=True)
class SmolLM2KVStepResult:
    """Handles of one built decode step: the two inputs to upload and the logits to read."""

    t_token_id: object
    t_pos: object
    t_logits: object


class SmolLM2KVFFICache(FusedHeadsMixin):
    """The seed's class: realize (mmap | copy) -> persistent tensors; build_* -> graphs."""

    def __init__(self, backend: str = "cpu", n_threads: int | None = None):
        self.realized = False
        self.max_T = 0
        self.d_model = self.d_ff = self.n_heads = self.n_kv = self.d_head = 0
        self.group_size = self.n_layers = self.vocab_size = 0
        self.rope_base = 10000.0
        self.rope_dim = 0
        self.rope_mode = tnn.ROPE_NORMAL
        self.rope_scaling = RopeScaling.none()
        self.t_rope_freq_factors = None
        self.has_rope_freqs = False
        self.rms_eps = 1.0e-5
        self.sess = None
        self.t_token_embed = None
        self.t_final_norm_gamma = None
        self.t_output = None
        self.has_untied_output = False
        self.has_qkv_bias = False
        self.has_qk_norm = False
        self.qk_norm_kind = 0
        self.swa_window = 0
        self.swa_pattern: tuple[bool, ...] = ()
        self.has_post_norms = False
        self.embed_scale = 1.0
        self.attn_scale = 0.0
        self.q_prescale = False
        self.rope_base_swa = 0.0
        self.residual_scale = 1.0
        self.logit_scale = 1.0
        self.expert_weights_scale = 0.0
        self.attn_softcap = 0.0
        self.final_softcap = 0.0
        self.swa_alternates = False
        self.ffn_act = "silu"
        self.kv_blocks_ffi: list[SmolLM2KVBlockFFI] = [SmolLM2KVBlockFFI()]
        self.weight_type = GGML_TYPE_F32
        self.embed_type = GGML_TYPE_F32   # copy path: the seed keeps the embedding table F32
        self.copy_file_types = None       # copy path: {tensor name: type} to keep the file's own types
        self.kv_type_k = GGML_TYPE_F32
        self.kv_type_v = GGML_TYPE_F32
        self.use_flash_attn = False
        self.is_moe = False
        self.n_experts = 0
        self.n_experts_used = 0
        self.expert_weights_norm = False
        self.gguf_handle_keepalive = None
        self.lora_q_enabled = False
        self.lora_q_rank = 0
        self.lora_q_adamw_enabled = False
        self.per_head_attn = False
        self.fused_heads = False
        self.backend = backend
        self.repack_weights = True   # CPU: matmul weights in llama.cpp's repacked layout (see realize_for_mmap)
        self.n_threads = n_threads
        self._weights = None
        self._trace = False
        self._taps: list[tuple[str, object]] = []
        self._last_trace: dict[str, np.ndarray] = {}
        self._t_kq_masks: dict[int, object] = {}
        self._t_kv_row = None      # replayed graphs: the cache row a step writes is an input
        self._t_out_rows = None    # batches: the positions whose logits are wanted (None: all)
        self._t_v_idx = None       # replayed graphs with a transposed V cache: the elements a step writes
        self._v_starts = None      # ... and where each V element's row of positions starts
        self.v_trans = False       # V cached transposed (plain attention on an F32 cache), set at realize
        self.mask_windows: frozenset[int] = frozenset()   # the layers' distinct windows, set at realize
        self._replay = None        # (padded KV length, step result) of the graph built for replay
        self.kv_pad = LLAMA_KV_PAD
        self.t_k_hadamard = None
        self.t_v_hadamard = None

    # ------------------------------------------------------------------ options (call before realize)

    def enable_kv_q8(self) -> None:
        """Q8_0 K and V caches; turns flash attention on (a Q8 V cannot be transposed for the plain path)."""
        self.kv_type_k = GGML_TYPE_Q8_0
        self.kv_type_v = GGML_TYPE_Q8_0
        self.use_flash_attn = True

    def enable_flash_attn(self) -> None:
        """Fused softmax(QKᵀ·scale)·V per head via ggml_flash_attn_ext (inference only)."""
        self.use_flash_attn = True

    def enable_moe(self, n_experts: int, n_experts_used: int) -> None:
        self.is_moe = True
        self.n_experts = n_experts
        self.n_experts_used = n_experts_used

    def enable_lora_q(self, r: int) -> None:
        """Per-Q-head LoRA (A: r x d_model, B: d_head x r), trainable F32 in the session buffer."""
        if r <= 0:
            raise ValueError(f"enable_lora_q: rank must be positive, got {r}")
        if self.fused_heads:
            raise RuntimeError("enable_lora_q: LoRA-Q adapters are per head; not with enable_fused_heads")
        self.lora_q_enabled = True
        self.lora_q_rank = r

    def enable_lora_q_adamw(self) -> None:
        """Persistent AdamW moments beside each LoRA tensor (needs enable_lora_q first)."""
        if not self.lora_q_enabled:
            raise RuntimeError("enable_lora_q_adamw: call enable_lora_q(r) first")
        self.lora_q_adamw_enabled = True

    def set_weight_type(self, t: int) -> None:
        """ggml type of 2-D linear weights on the copy path (0 = F32, 8 = Q8_0, or the file's own type)."""
        if tnn.tnn_row_size(t, 256) <= 0:  # raises TinyNNError for unknown types
            raise ValueError(f"set_weight_type: bad ggml type {t}")
        self.weight_type = t

    def apply_config(self, cfg: ModelConfig) -> None:
        """Take every arch flag from a frozen config (the seed set these from its flag detection)."""
        self.rope_mode = cfg.rope_mode
        self.rope_dim = cfg.rope_dim
        self.rope_scaling = cfg.rope_scaling
        self.has_rope_freqs = cfg.has_rope_freqs
        self.has_qk_norm = cfg.qk_norm_kind != 0
        self.qk_norm_kind = cfg.qk_norm_kind
        self.has_post_norms = cfg.post_norms
        self.swa_window = cfg.swa_window
        self.swa_pattern = cfg.swa_pattern
        self.swa_alternates = cfg.arch == "gemma2"
        self.embed_scale = cfg.embed_scale
        self.attn_scale = cfg.kq_scale
        self.q_prescale = cfg.q_prescale
        self.rope_base_swa = cfg.rope_base_swa
        self.residual_scale = cfg.residual_scale
        self.logit_scale = cfg.logit_scale
        self.expert_weights_scale = cfg.expert_weights_scale
        self.attn_softcap = cfg.attn_softcap
        self.final_softcap = cfg.final_softcap
        self.ffn_act = cfg.ffn_act
        self.expert_weights_norm = cfg.expert_weights_norm
        if cfg.is_moe:
            self.enable_moe(cfg.n_experts, cfg.n_experts_used)

    # ------------------------------------------------------------------ trace

    def enable_trace(self) -> None:
        """Keep every tapped intermediate of the next steps; read them with dump_trace()."""
        self._trace = True

    def trace_tap(self, name: str, t):
        """Name ``t``; in trace mode also keep its memory alive so it can be read after compute."""
        if self._trace:
            tnn.tnn_set_name(t, name)
            tnn.tnn_set_output(t)
            self._taps.append((name, t))
        return t

    def dump_trace(self) -> dict[str, np.ndarray]:
        """Tapped tensors of the last computed step, name -> float32 array (numpy order)."""
        return dict(self._last_trace)

    # ------------------------------------------------------------------ realize

    def _new_session(self) -> None:
        kind = BACKEND_KINDS.get(self.backend)
        if kind is None:
            raise ValueError(f"unknown backend '{self.backend}' (choose from {', '.join(BACKEND_KINDS)})")
        self.sess = tnn.tnn_session_new(kind)
        if self.n_threads:
            tnn.tnn_session_set_n_threads(self.sess, int(self.n_threads))
        # llama.cpp keeps CPU matmul weights of some types (Q4_0, Q4_K, ... per CPU) in ggml's
        # interleaved CPU_REPACK layout; using it too runs the same kernels, so the same rounding
        tnn.tnn_session_set_weight_repack(self.sess, 1 if self.repack_weights else 0)

    def _set_dims(self, max_T, d_model, d_ff, n_heads, n_kv, d_head, n_layers, vocab, rope_base, rms_eps):
        if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
            raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv ({n_kv})")
        if max_T <= 0:
            raise ValueError(f"max_T must be positive, got {max_T}")
        self.max_T, self.d_model, self.d_ff = max_T, d_model, d_ff
        self.n_heads, self.n_kv, self.d_head = n_heads, n_kv, d_head
        self.group_size = n_heads // n_kv
        self.n_layers, self.vocab_size = n_layers, vocab
        self.rope_base, self.rms_eps = rope_base, rms_eps
        if not self.rope_dim:
            self.rope_dim = d_head

    def realize_for(self, max_T, d_model, d_ff, n_heads, n_kv, n_layers, vocab_size, rope_base, rms_eps,
                    untied, qkv_bias, d_head: int | None = None) -> None:
        """Copy path: declare every persistent tensor in the session's buffer; fill with load_weights(path).

        ``d_head`` defaults to d_model / n_heads as in the seed; Qwen3-style files pass their head_dim."""
        self._set_dims(max_T, d_model, d_ff, n_heads, n_kv, d_head or d_model // n_heads, n_layers, vocab_size,
                       rope_base, rms_eps)
        self.has_untied_output, self.has_qkv_bias = untied, qkv_bias
        self._new_session()
        self._weights = CopyWeights(self.sess, self.weight_type, self.embed_type, self.copy_file_types)
        self._declare_weights()
        self._finalize()

    def realize_for_mmap(self, gguf_handle, cfg: ModelConfig, max_T: int, untied: bool, qkv_bias: bool,
                         qk_norm: bool = False) -> None:
        """BYO-pointer path: weights point into the GGUF's mapped pages; only caches live in the session."""
        self._set_dims(max_T, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv, cfg.head_dim, cfg.n_layers, cfg.vocab,
                       cfg.rope_base, cfg.rms_eps)
        self.rope_scaling = cfg.rope_scaling
        self.gguf_handle_keepalive = gguf_handle  # the mapping must outlive the session
        self.has_untied_output, self.has_qkv_bias = untied, qkv_bias
        self.has_qk_norm = qk_norm or self.has_qk_norm
        if self.has_qk_norm and self.qk_norm_kind == 0:
            self.qk_norm_kind = 1
        self._new_session()
        self._weights = MmapWeights(self.sess, gguf_handle, cfg.path)
        self._declare_weights()
        self._finalize()

    def realize_and_load_auto(self, gguf_path: str, max_T: int, cfg: ModelConfig, flags=None):
        """The seed's dispatch: files with ``toy.ggml_native`` take the mmap path, others the copy path.

        Returns the GGUF handle (mmap path) or None (copy path).
        """
        untied = cfg.untied_output if flags is None else flags.untied
        qkv_bias = cfg.qkv_bias if flags is None else flags.qkv_bias
        g = tnn.tnn_gguf_load(str(gguf_path))
        if tnn.tnn_gguf_get_bool(g, "toy.ggml_native") == 1:
            self.set_weight_type(detect_weight_type(gguf_path))
            self.realize_for_mmap(g, cfg, max_T, untied, qkv_bias, cfg.qk_norm_kind != 0)
            return g
        tnn.tnn_gguf_free(g)
        self.realize_for(max_T, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv, cfg.n_layers, cfg.vocab,
                         cfg.rope_base, cfg.rms_eps, untied, qkv_bias, d_head=cfg.head_dim)
        self.load_weights(gguf_path)
        return None

    def load_weights(self, path: str, progress: bool = False) -> None:
        """Fill a realize_for cache from a GGUF (types converted with ggml's own (de)quantizer)."""
        if not isinstance(self._weights, CopyWeights):
            raise RuntimeError("load_weights: only after realize_for (the mmap path needs no load)")
        self._weights.load(path, progress=progress)

    def alloc_2d_w(self, rows: int, cols: int):
        """One persistent 2-D linear weight at the configured weight type (the seed's helper)."""
        if self.weight_type == GGML_TYPE_F32:
            return tnn.tnn_input_2d_f32_persistent(self.sess, rows, cols)
        return tnn.tnn_input_2d_persistent_typed(self.sess, rows, cols, self.weight_type)

    def head_nbytes(self, ggml_type: int, d_head: int, d_model: int) -> int:
        """Byte stride of one head's d_head rows of a fused [n_heads*d_head, d_model] weight."""
        rs = tnn.tnn_row_size(ggml_type, d_model)  # raises on a bad type/shape: a 0 stride would collapse heads
        return d_head * rs

    def _declare_weights(self) -> None:
        """Declare every persistent tensor, from whichever source realize chose (one routine for both paths)."""
        w, D, Dh, Dff = self._weights, self.d_model, self.d_head, self.d_ff
        vec = lambda name, n: w.tensor(Slice(name, 1, n), "f32")  # noqa: E731
        lin = lambda name, rows, cols, row0=0: w.tensor(Slice(name, rows, cols, row0), "linear")  # noqa: E731

        self.t_token_embed = w.tensor(Slice("token_embd.weight", self.vocab_size, D), "embed")
        self.t_final_norm_gamma = vec("output_norm.weight", D)
        if self.has_untied_output:
            self.t_output = lin("output.weight", self.vocab_size, D)
        if self.has_rope_freqs:   # the file's own rope frequency factors (Llama 3 conversions)
            self.t_rope_freq_factors = vec("rope_freqs.weight", Dh // 2)
        elif self.rope_scaling.kind == "llama3":   # computed from the scaling keys at finalize
            self.t_rope_freq_factors = tnn.tnn_rope_freq_factors_alloc(self.sess, Dh)

        self._declare_kv_rotations()
        self.per_head_attn = isinstance(w, MmapWeights) and w.has("blk.0.attn_q.head_0.weight")
        if self.per_head_attn:
            print("  per-head tensors detected (toy from-scratch checkpoint)")

        def head(li, which, h):
            if self.per_head_attn:
                return lin(f"blk.{li}.attn_{which}.head_{h}.weight", Dh, D)
            return lin(f"blk.{li}.attn_{which}.weight", Dh, D, row0=h * Dh)

        def kv_cache(typ):
            """One layer's cache [d_head, max_T, n_kv] and each KV head's [d_head, max_T] view of it:
            the per-head graph uses the views, the fused-heads graph the whole."""
            layer = tnn.tnn_input_3d_persistent_typed(self.sess, Dh, self.max_T, self.n_kv, typ)
            row = tnn.tnn_row_size(typ, Dh)
            return layer, [tnn.tnn_view_2d_persistent(self.sess, layer, Dh, self.max_T, row, h * self.max_T * row)
                           for h in range(self.n_kv)]

        def v_cache_transposed():
            """llama.cpp (v_trans) keeps V transposed for plain attention: [max_T, d_head, n_kv], each
            KV head's view [max_T, d_head], so attention multiplies by V without copying it."""
            layer = tnn.tnn_input_3d_persistent_typed(self.sess, self.max_T, Dh, self.n_kv, GGML_TYPE_F32)
            head = self.max_T * Dh * 4
            return layer, [tnn.tnn_view_2d_persistent(self.sess, layer, self.max_T, Dh, self.max_T * 4, h * head)
                           for h in range(self.n_kv)]

        self.v_trans = not self.use_flash_attn and self.kv_type_v == GGML_TYPE_F32

        self.kv_blocks_ffi = [SmolLM2KVBlockFFI() for _ in range(self.n_layers)]
        for li, blk in enumerate(self.kv_blocks_ffi):
            p = f"blk.{li}"
            blk.t_rn1_gamma = vec(f"{p}.attn_norm.weight", D)
            blk.t_rn2_gamma = vec(f"{p}.ffn_norm.weight", D)
            if self.has_post_norms:
                blk.t_post_attn_norm_gamma = vec(f"{p}.post_attention_norm.weight", D)
                blk.t_post_ffn_norm_gamma = vec(f"{p}.post_ffw_norm.weight", D)
            if self.has_qk_norm:
                whole = self.qk_norm_kind == 2
                blk.t_q_norm_gamma = vec(f"{p}.attn_q_norm.weight", self.n_heads * Dh if whole else Dh)
                blk.t_k_norm_gamma = vec(f"{p}.attn_k_norm.weight", self.n_kv * Dh if whole else Dh)
            blk.t_w_q = [head(li, "q", h) for h in range(self.n_heads)]
            blk.t_w_k = [head(li, "k", h) for h in range(self.n_kv)]
            blk.t_w_v = [head(li, "v", h) for h in range(self.n_kv)]
            blk.t_K_layer, blk.t_K = kv_cache(self.kv_type_k)
            blk.t_V_layer, blk.t_V = v_cache_transposed() if self.v_trans else kv_cache(self.kv_type_v)
            if self.has_qkv_bias:  # each head's d_head piece of the fused bias
                bias = lambda which, h: w.tensor(Slice(f"{p}.attn_{which}.bias", 1, Dh, elem0=h * Dh), "f32")  # noqa: E731
                blk.t_b_q = [bias("q", h) for h in range(self.n_heads)]
                blk.t_b_k = [bias("k", h) for h in range(self.n_kv)]
                blk.t_b_v = [bias("v", h) for h in range(self.n_kv)]
            if self.lora_q_enabled:
                r = self.lora_q_rank
                f32 = lambda rows, cols: tnn.tnn_input_2d_f32_persistent(self.sess, rows, cols)  # noqa: E731
                blk.t_w_lora_a_q = [f32(r, D) for _ in range(self.n_heads)]
                blk.t_w_lora_b_q = [f32(Dh, r) for _ in range(self.n_heads)]
                if self.lora_q_adamw_enabled:
                    blk.t_w_lora_a_q_m = [f32(r, D) for _ in range(self.n_heads)]
                    blk.t_w_lora_a_q_v = [f32(r, D) for _ in range(self.n_heads)]
                    blk.t_w_lora_b_q_m = [f32(Dh, r) for _ in range(self.n_heads)]
                    blk.t_w_lora_b_q_v = [f32(Dh, r) for _ in range(self.n_heads)]
                for t in blk.t_w_lora_a_q + blk.t_w_lora_b_q:
                    tnn.tnn_set_param(t)
            if self.fused_heads:
                if self.per_head_attn:
                    raise ValueError("fused heads need attn_q/k/v as whole matrices; this file stores them per head")
                blk.t_w_q_all = lin(f"{p}.attn_q.weight", self.n_heads * Dh, D)
                blk.t_w_k_all = lin(f"{p}.attn_k.weight", self.n_kv * Dh, D)
                blk.t_w_v_all = lin(f"{p}.attn_v.weight", self.n_kv * Dh, D)
                if self.has_qkv_bias:
                    blk.t_b_q_all = vec(f"{p}.attn_q.bias", self.n_heads * Dh)
                    blk.t_b_k_all = vec(f"{p}.attn_k.bias", self.n_kv * Dh)
                    blk.t_b_v_all = vec(f"{p}.attn_v.bias", self.n_kv * Dh)
            blk.t_w_o = lin(f"{p}.attn_output.weight", D, self.n_heads * Dh)
            if self.is_moe:
                E = self.n_experts
                blk.t_w_router = lin(f"{p}.ffn_gate_inp.weight", E, D)
                blk.t_w_gate_exps = w.tensor(Slice(f"{p}.ffn_gate_exps.weight", 0, 0, ne=(D, Dff, E)), "linear")
                blk.t_w_up_exps = w.tensor(Slice(f"{p}.ffn_up_exps.weight", 0, 0, ne=(D, Dff, E)), "linear")
                blk.t_w_down_exps = w.tensor(Slice(f"{p}.ffn_down_exps.weight", 0, 0, ne=(Dff, D, E)), "linear")
            else:
                blk.t_w_gate = lin(f"{p}.ffn_gate.weight", Dff, D)
                blk.t_w_up = lin(f"{p}.ffn_up.weight", Dff, D)
                blk.t_w_down = lin(f"{p}.ffn_down.weight", D, Dff)

    def _declare_kv_rotations(self) -> None:
        """llama.cpp (llama_kv_cache: attn_rot_k/attn_rot_v) rotates Q, K and V by a Walsh-Hadamard
        matrix before they meet a quantized cache, and rotates the attention output back; it spreads
        outliers across a block so Q8_0 loses less. We do the same so the numbers agree."""
        if _is_quantized(self.kv_type_k) and self.d_head % 64 == 0:
            n = 64
            while self.d_head % (n * 2) == 0:
                n *= 2
            self.t_k_hadamard = tnn.tnn_input_2d_f32_persistent(self.sess, n, n)
        if _is_quantized(self.kv_type_v) and self.d_head % 64 == 0:
            self.t_v_hadamard = tnn.tnn_input_2d_f32_persistent(self.sess, 64, 64)

    def _hadamard(self, t, rot, n_heads: int = 1):
        """rot @ t over consecutive blocks of rot's size (t: n_heads contiguous [d_head] vectors)."""
        n = tnn.tnn_tensor_ne(rot, 0)
        t = tnn.tnn_reshape_2d(self.sess, t, n, self.d_head * n_heads // n)
        t = tnn.tnn_mul_mat_hadamard(self.sess, rot, t)
        return tnn.tnn_reshape_2d(self.sess, t, self.d_head, n_heads)

    def _finalize(self) -> None:
        tnn.tnn_finalize_weights(self.sess)
        # the distinct attention windows of the layers (0 = full): one mask input per window
        self.mask_windows = frozenset(self._layer_window(li) for li in range(self.n_layers))
        for rot in (self.t_k_hadamard, self.t_v_hadamard):
            if rot is not None:
                tnn.upload(self.sess, rot, hadamard_matrix(tnn.tnn_tensor_ne(rot, 0)))
        if self.rope_scaling.kind == "llama3" and not self.has_rope_freqs:
            rs = self.rope_scaling
            ff = RopeScaling.compute_llama3_freq_factors(self.d_head, self.rope_base, rs.orig_max_pos,
                                                         rs.factor, rs.low_freq_factor, rs.high_freq_factor)
            tnn.upload(self.sess, self.t_rope_freq_factors, ff)
        self.realized = True

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

    def read_persistent_mat(self, t, rows: int, cols: int) -> np.ndarray:
        """Any persistent F32 tensor back as a (rows, cols) numpy matrix."""
        return tnn.download_to_mat(self.sess, t, rows, cols)

    # ------------------------------------------------------------------ graph builders

    def _rope(self, t, t_pos, layer_idx: int = 0):
        rs = self.rope_scaling
        base = self.rope_base
        if self.rope_base_swa and self._layer_window(layer_idx) > 0:
            base = self.rope_base_swa  # sliding-window layers have their own base (Gemma)
        return tnn.tnn_rope_ext(self.sess, t, t_pos, self.rope_dim, base, rs.freq_scale,
                                rs.ext_factor, rs.attn_factor, rs.beta_fast, rs.beta_slow,
                                self.t_rope_freq_factors, self.rope_mode, rs.orig_max_pos)

    def _softcap(self, t, cap: float):
        """cap * tanh(t / cap); a no-op when cap is 0."""
        if cap <= 0.0:
            return t
        t = tnn.tnn_scale(self.sess, t, _f32_div(1.0, cap))
        t = tnn.tnn_tanh(self.sess, t)
        return tnn.tnn_scale(self.sess, t, cap)

    def _layer_window(self, layer_idx: int) -> int:
        if self.swa_window <= 0:
            return 0
        if self.swa_pattern:
            return self.swa_window if self.swa_pattern[layer_idx] else 0
        if self.swa_alternates and layer_idx % 2 == 1:
            return 0
        return self.swa_window

    def build_decode_step(self, pos: int, n_tokens: int = 1) -> SmolLM2KVStepResult:
        """The compute graph for one decode position (token and position are graph inputs), or, with
        the fused-heads builder, for ``n_tokens`` consecutive positions ending at ``pos`` (a batch)."""
        if not self.realized:
            raise RuntimeError("build_decode_step: realize the cache first")
        if not 0 <= pos < self.max_T:
            raise ValueError(f"position {pos} outside the cache (max_T={self.max_T})")
        if n_tokens != 1 and not (self.fused_heads and self._t_kv_row is not None):
            raise ValueError("build_decode_step: a batch of positions needs the fused-heads builder (step_batch)")
        sess = self.sess
        eps = self.rms_eps
        scale = self.attn_scale if self.attn_scale else inv_sqrt_f32(self.d_head)
        bytes_d_head = self.d_head * 4
        bytes_max_T = self.max_T * 4
        bytes_d_head_k = tnn.tnn_row_size(self.kv_type_k, self.d_head)
        bytes_d_head_v = tnn.tnn_row_size(self.kv_type_v, self.d_head)

        t_token_id = tnn.tnn_input_1d_i32(sess, n_tokens)
        t_pos = tnn.tnn_input_1d_i32_ctx(sess, n_tokens)
        tnn.tnn_set_name(t_token_id, "inp_tokens")
        tnn.tnn_set_name(t_pos, "inp_pos")

        t_x = tnn.tnn_get_rows(sess, self.t_token_embed, t_token_id)
        if self.embed_scale != 1.0:
            t_x = tnn.tnn_scale(sess, t_x, self.embed_scale)
        t_x = self.trace_tap("embed", t_x)

        for li in range(self.n_layers):
            t_x = self.build_block_step(t_x, self.kv_blocks_ffi[li], t_pos, pos, scale, eps, bytes_d_head,
                                        bytes_d_head_k, bytes_d_head_v, bytes_max_T, li)

        t_x_final = tnn.tnn_rms_norm(sess, t_x, self.t_final_norm_gamma, eps)
        t_x_final = self.trace_tap("final_norm", t_x_final)
        w_out = self.t_output if self.has_untied_output else self.t_token_embed
        t_logits = tnn.tnn_matmul(sess, w_out, t_x_final)
        if self.logit_scale != 1.0:  # Granite divides the logits
            t_logits = tnn.tnn_scale(sess, t_logits, _f32_div(1.0, self.logit_scale))
        t_logits = self._softcap(t_logits, self.final_softcap)
        t_logits = self.trace_tap("logits", t_logits)
        tnn.tnn_set_output(t_logits)
        return SmolLM2KVStepResult(t_token_id, t_pos, t_logits)

    def build_block_step(self, t_x, blk, t_pos, pos, scale, eps, bytes_d_head, bytes_d_head_k, bytes_d_head_v,
                         bytes_max_T, layer_idx):
        sess = self.sess
        tag = f"L{layer_idx}."
        t_h = tnn.tnn_rms_norm(sess, t_x, blk.t_rn1_gamma, eps)
        t_h = self.trace_tap(tag + "rn1", t_h)
        if self.fused_heads:
            t_concat = self._attention_fused(t_h, blk, t_pos, pos, scale, bytes_d_head_k, bytes_d_head_v, tag,
                                             layer_idx)
        else:
            t_concat = self._attention_per_head(t_h, blk, t_pos, pos, scale, bytes_d_head, bytes_d_head_k,
                                                bytes_d_head_v, bytes_max_T, tag, layer_idx)
        t_concat = self.trace_tap(tag + "concat", t_concat)
        return self._block_tail(t_x, blk, t_concat, eps, tag, last_layer=layer_idx == self.n_layers - 1)

    def _attention_per_head(self, t_h, blk, t_pos, pos, scale, bytes_d_head, bytes_d_head_k, bytes_d_head_v,
                            bytes_max_T, tag, layer_idx):
        """The seed's attention: every query head its own chain; returns the heads joined [H*d_head, 1]."""
        sess = self.sess
        # K and V of each KV head: project, (bias), (norm), rope K, write into the cache at `pos`.
        k_pre = [self._project(blk.t_w_k[h], blk.t_b_k[h] if self.has_qkv_bias else None, t_h)
                 for h in range(self.n_kv)]
        k_pre[0] = self.trace_tap(tag + "k_pre", k_pre[0])
        if self.has_qk_norm:
            k_pre = self._qk_norm(k_pre, blk.t_k_norm_gamma)
        for hkv in range(self.n_kv):
            t_k_rot = self._rope(k_pre[hkv], t_pos, layer_idx)
            if hkv == 0:
                t_k_rot = self.trace_tap(tag + "k_rot", t_k_rot)
            if self.t_k_hadamard is not None:
                t_k_rot = self._hadamard(t_k_rot, self.t_k_hadamard)
            t_v = self._project(blk.t_w_v[hkv], blk.t_b_v[hkv] if self.has_qkv_bias else None, t_h)
            if hkv == 0:
                t_v = self.trace_tap(tag + "v_new", t_v)
            if self.t_v_hadamard is not None:
                t_v = self._hadamard(t_v, self.t_v_hadamard)
            self._write_kv(blk, hkv, t_k_rot, t_v, pos, bytes_d_head_k, bytes_d_head_v)

        # A whole-vector QK-norm (OLMoE) needs every head's query before any head can go on.
        q_normed = None
        if self.has_qk_norm and self.qk_norm_kind == 2:
            q_normed = self._qk_norm([self._q_projection(t_h, blk, hq) for hq in range(self.n_heads)],
                                     blk.t_q_norm_gamma)
        heads = [self.build_attention_qhead_step(t_h, blk, hq, t_pos, pos, scale, bytes_d_head, bytes_d_head_k,
                                                 bytes_d_head_v, bytes_max_T, tag, hq == 0, layer_idx,
                                                 t_q_normed=None if q_normed is None else q_normed[hq])
                 for hq in range(self.n_heads)]
        t_concat = heads[0]
        for t in heads[1:]:
            t_concat = tnn.tnn_concat(sess, t_concat, t, 0)
        return t_concat

    def _write_kv(self, blk, hkv, t_k, t_v, pos, bytes_d_head_k, bytes_d_head_v):
        """Store KV head ``hkv``'s new K and V ([d_head, 1] each) at ``pos``; cpy quantizes on the way
        in when the cache is Q8_0. Added to the graph now, so they run before attention reads them."""
        sess = self.sess
        k_slot = tnn.tnn_view_2d(sess, blk.t_K[hkv], self.d_head, 1, bytes_d_head_k, pos * bytes_d_head_k)
        if self.v_trans:    # column `pos` of the transposed [max_T, d_head] view
            v_slot = tnn.tnn_view_2d(sess, blk.t_V[hkv], 1, self.d_head, self.max_T * 4, pos * 4)
        else:
            v_slot = tnn.tnn_view_2d(sess, blk.t_V[hkv], self.d_head, 1, bytes_d_head_v, pos * bytes_d_head_v)
        tnn.tnn_add_to_graph(sess, tnn.tnn_cpy(sess, t_k, k_slot))
        tnn.tnn_add_to_graph(sess, tnn.tnn_cpy(sess, t_v, v_slot))

    def _block_tail(self, t_x, blk, t_concat, eps, tag, last_layer=False):
        """Output projection, residual, FFN (dense or routed), residual: the same for every builder."""
        sess = self.sess
        t_attn = tnn.tnn_matmul(sess, blk.t_w_o, t_concat)
        t_attn = self.trace_tap(tag + "attn_out", t_attn)
        if last_layer and self._t_out_rows is not None:
            # llama.cpp (inp_out_ids): the last layer goes on only with the positions whose logits
            # are wanted, from right after the attention output
            t_attn = tnn.tnn_get_rows(sess, t_attn, self._t_out_rows)
            t_x = tnn.tnn_get_rows(sess, t_x, self._t_out_rows)
        if self.has_post_norms:
            t_attn = tnn.tnn_rms_norm(sess, t_attn, blk.t_post_attn_norm_gamma, eps)
            t_attn = self.trace_tap(tag + "post_attn_norm", t_attn)
        if self.residual_scale != 1.0:  # Granite scales each branch before the residual add
            t_attn = tnn.tnn_scale(sess, t_attn, self.residual_scale)
        t_x_attn = tnn.tnn_add(sess, t_x, t_attn)
        t_x_attn = self.trace_tap(tag + "post_attn", t_x_attn)

        t_h2 = tnn.tnn_rms_norm(sess, t_x_attn, blk.t_rn2_gamma, eps)
        t_h2 = self.trace_tap(tag + "rn2", t_h2)
        if self.is_moe:
            t_dn = self.build_moe_ffn(blk, t_h2, tag)
        else:
            t_gate = self.trace_tap(tag + "gate", tnn.tnn_matmul(sess, blk.t_w_gate, t_h2))
            t_up = self.trace_tap(tag + "up", tnn.tnn_matmul(sess, blk.t_w_up, t_h2))
            t_act = self.trace_tap(tag + "silu_gate", self._ffn_act(t_gate))
            t_gated = self.trace_tap(tag + "gated", tnn.tnn_mul(sess, t_act, t_up))
            t_dn = self.trace_tap(tag + "dn", tnn.tnn_matmul(sess, blk.t_w_down, t_gated))
        if self.has_post_norms:
            t_dn = tnn.tnn_rms_norm(sess, t_dn, blk.t_post_ffn_norm_gamma, eps)
            t_dn = self.trace_tap(tag + "post_ffn_norm", t_dn)
        if self.residual_scale != 1.0:
            t_dn = tnn.tnn_scale(sess, t_dn, self.residual_scale)
        t_out = tnn.tnn_add(sess, t_x_attn, t_dn)
        return self.trace_tap(tag + "post_ffn", t_out)

    def _project(self, w, bias, t_h):
        t = tnn.tnn_matmul(self.sess, w, t_h)
        return t if bias is None else tnn.tnn_add(self.sess, t, bias)

    def _q_projection(self, t_h, blk, hq):
        """Query head ``hq`` before norm and rope: W_q[hq] h (+ LoRA) (+ bias)."""
        t_q = tnn.tnn_matmul(self.sess, blk.t_w_q[hq], t_h)
        if self.lora_q_enabled:
            # LoRA before the bias (HF practice): q += B (A h); B starts at zero
            t_a = tnn.tnn_matmul(self.sess, blk.t_w_lora_a_q[hq], t_h)
            t_q = tnn.tnn_add(self.sess, t_q, tnn.tnn_matmul(self.sess, blk.t_w_lora_b_q[hq], t_a))
        if self.has_qkv_bias:
            t_q = tnn.tnn_add(self.sess, t_q, blk.t_b_q[hq])
        return t_q

    def _qk_norm(self, heads: list, gamma) -> list:
        """RMS-normalise per-head vectors [d_head, 1]. kind 1 (Qwen3, Gemma 3): each head on its own,
        one shared [d_head] gamma. kind 2 (OLMoE): llama.cpp normalises the whole projected vector
        with a [n*d_head] gamma, so the heads are joined, normalised, and viewed apart again."""
        sess, eps = self.sess, self.rms_eps
        if self.qk_norm_kind != 2:
            return [tnn.tnn_rms_norm(sess, t, gamma, eps) for t in heads]
        whole = heads[0]
        for t in heads[1:]:
            whole = tnn.tnn_concat(sess, whole, t, 0)
        whole = tnn.tnn_rms_norm(sess, whole, gamma, eps)
        row = self.d_head * 4
        return [tnn.tnn_view_2d(sess, whole, self.d_head, 1, row, h * row) for h in range(len(heads))]

    def _ffn_act(self, t):
        return tnn.tnn_gelu(self.sess, t) if self.ffn_act == "gelu" else tnn.tnn_silu(self.sess, t)

    def build_attention_qhead_step(self, t_h, blk, hq, t_pos, pos, scale, bytes_d_head, bytes_d_head_k,
                                   bytes_d_head_v, bytes_max_T, tag, tap_this_head, layer_idx, t_q_normed=None):
        """One query head against the (already written) K/V of its KV head hq // group_size.

        ``t_q_normed``: this head's query after a whole-vector QK-norm, when the block computed it."""
        hkv = hq // self.group_size
        if t_q_normed is None:
            t_q = self._q_projection(t_h, blk, hq)
            if tap_this_head:
                t_q = self.trace_tap(tag + "q_pre", t_q)
            if self.has_qk_norm:
                t_q = self._qk_norm([t_q], blk.t_q_norm_gamma)[0]
        else:
            t_q = t_q_normed
        t_q = self._rope(t_q, t_pos, layer_idx)
        if tap_this_head:
            t_q = self.trace_tap(tag + "q_rot", t_q)
        t_q, scale = self._finish_q(t_q, scale, 1)
        t_K_hist, t_V_hist, t_mask = self._kv_history(blk, hkv, pos, layer_idx, bytes_d_head_k, bytes_d_head_v)
        t_q = tnn.tnn_reshape_3d(self.sess, t_q, self.d_head, 1, 1)
        return self._attend(t_q, t_K_hist, t_V_hist, t_mask, scale, tag, tap_this_head)

    def _finish_q(self, t_q, scale, n_heads):
        """Gemma's pre-scaled Q (llama.cpp scales Q itself, then attends with scale 1), and the
        Hadamard rotation that matches a quantized K cache. Returns (q, the attention scale)."""
        if self.q_prescale:
            t_q = tnn.tnn_scale(self.sess, t_q, scale)
            scale = 1.0
        if self.t_k_hadamard is not None:
            t_q = self._hadamard(t_q, self.t_k_hadamard, n_heads)
        return t_q, scale

    def _kv_history(self, blk, hkv, pos, layer_idx, bytes_d_head_k, bytes_d_head_v):
        """Views [d_head, length, heads] of the cached K and V (V^T [length, d_head, heads] when the
        cache keeps V transposed) that position ``pos`` attends over,
        for KV head ``hkv`` (heads = 1) or every KV head (``hkv=None``), and the mask
        to apply (None: the views hold exactly the attended positions)."""
        window = self._layer_window(layer_idx)
        if window > 0 and pos + 1 > window:
            hist_start, hist_count = pos + 1 - window, window
        else:
            hist_start, hist_count = 0, pos + 1
        t_mask = self._t_kq_masks.get(window)
        if t_mask is not None:
            # llama.cpp attends over its padded KV length with a -inf mask; reducing over the same
            # length makes the sums (and so the rounding) identical to its
            hist_start, hist_count = 0, self._n_kv_padded(pos)
        heads, first = (self.n_kv, 0) if hkv is None else (1, hkv)

        def hist(layer, row):
            return tnn.tnn_view_3d(self.sess, layer, self.d_head, hist_count, heads, row, self.max_T * row,
                                   (first * self.max_T + hist_start) * row)
        if self.v_trans:    # V^T [length, d_head, heads] straight from the transposed cache
            t_V_hist = tnn.tnn_view_3d(self.sess, blk.t_V_layer, hist_count, self.d_head, heads, self.max_T * 4,
                                       self.max_T * self.d_head * 4, (first * self.d_head * self.max_T + hist_start) * 4)
        else:
            t_V_hist = hist(blk.t_V_layer, bytes_d_head_v)
        return hist(blk.t_K_layer, bytes_d_head_k), t_V_hist, t_mask

    def _attend(self, t_q, t_K_hist, t_V_hist, t_mask, scale, tag, tap):
        """softmax(K q * scale + mask) V, as llama.cpp's build_attn_mha.

        t_q: [d_head, tokens, query heads]; K, V: views [d_head, length, KV heads] (ggml gives query
        head h the KV head h // (query heads / KV heads), llama.cpp's GQA); t_mask: [length, tokens]
        or None. Returns the heads of each token joined: [d_head * query heads, tokens]."""
        sess, Dh = self.sess, self.d_head
        n_tok, n_q = tnn.tnn_tensor_ne(t_q, 1), tnn.tnn_tensor_ne(t_q, 2)
        if self.use_flash_attn:
            # llama.cpp: flash attention reads an F32 cache as F16 (it casts K and V), so do we
            if self.kv_type_k == GGML_TYPE_F32:
                t_K_hist = tnn.tnn_cast(sess, t_K_hist, GGML_TYPE_F16)
            if self.kv_type_v == GGML_TYPE_F32:
                t_V_hist = tnn.tnn_cast(sess, t_V_hist, GGML_TYPE_F16)
            t_out = tnn.tnn_flash_attn_ext(sess, t_q, t_K_hist, t_V_hist, t_mask, scale, 0.0, self.attn_softcap)
            t_head = tnn.tnn_reshape_2d(sess, t_out, Dh, n_q * n_tok)     # out: [d_head, heads, tokens]
            if self.t_v_hadamard is not None:
                t_head = self._hadamard(t_head, self.t_v_hadamard, n_q * n_tok)
            if tap:
                t_head = self.trace_tap(tag + "head0_flash", t_head)
            return tnn.tnn_reshape_2d(sess, t_head, Dh * n_q, n_tok)

        t_scores = tnn.tnn_matmul(sess, t_K_hist, t_q)                  # [length, tokens, heads]
        if tap:
            t_scores = self.trace_tap(tag + "scores", t_scores)
        if t_mask is not None:
            # llama.cpp order: soft-cap the raw scores, then softmax(scores * scale + mask)
            t_attn = tnn.tnn_softmax_ext(sess, self._softcap(t_scores, self.attn_softcap), t_mask, scale, 0.0)
        else:
            t_scaled = self._softcap(tnn.tnn_scale(sess, t_scores, scale), self.attn_softcap)
            t_attn = tnn.tnn_softmax(sess, t_scaled)
        if tap:
            t_attn = self.trace_tap(tag + "softmax", t_attn)
        t_V_T = t_V_hist if self.v_trans else tnn.tnn_transpose(sess, t_V_hist)   # [length, d_head, heads]
        t_head = tnn.tnn_matmul(sess, t_V_T, t_attn)                    # [d_head, tokens, heads]
        if tap:
            t_head = self.trace_tap(tag + "head0", t_head)
        if n_tok > 1:
            t_head = tnn.tnn_cont(sess, tnn.tnn_permute(sess, t_head, 0, 2, 1, 3))
        return tnn.tnn_reshape_2d(sess, t_head, Dh * n_q, n_tok)

    def build_moe_ffn(self, blk, t_h2, tag):
        """Routed FFN, as llama.cpp's build_moe_ffn: softmax router -> the top-k experts in
        descending order -> (renormalised) weights -> SwiGLU per expert -> weighted sum, summed
        expert by expert in that order."""
        sess, K, E, D = self.sess, self.n_experts_used, self.n_experts, self.d_model
        n = tnn.tnn_tensor_ne(t_h2, 1)                                                  # tokens
        t_logits = self.trace_tap(tag + "moe_logits", tnn.tnn_matmul(sess, blk.t_w_router, t_h2))
        t_probs = tnn.tnn_softmax(sess, t_logits)                                       # [E, n]
        t_top = tnn.tnn_argsort_top_k(sess, t_probs, K)                                 # [K, n]
        t_w = tnn.tnn_get_rows(sess, tnn.tnn_reshape_3d(sess, t_probs, 1, E, n), t_top)  # [1, K, n]
        if self.expert_weights_norm:
            t_w2 = tnn.tnn_reshape_2d(sess, t_w, K, n)
            t_sum = tnn.tnn_clamp(sess, tnn.tnn_sum_rows(sess, t_w2), 6.103515625e-5, float("inf"))
            t_w = tnn.tnn_reshape_3d(sess, tnn.tnn_div(sess, t_w2, t_sum), 1, K, n)
        if self.expert_weights_scale not in (0.0, 1.0):
            t_w = tnn.tnn_scale(sess, t_w, self.expert_weights_scale)
        if n > 1:
            t_h2 = tnn.tnn_reshape_3d(sess, t_h2, D, 1, n)
        t_up = tnn.tnn_mul_mat_id(sess, blk.t_w_up_exps, t_h2, t_top)                  # [d_ff, K, n]
        t_gate = tnn.tnn_mul_mat_id(sess, blk.t_w_gate_exps, t_h2, t_top)
        t_act = tnn.tnn_mul(sess, self._ffn_act(t_gate), t_up)
        t_down = tnn.tnn_mul_mat_id(sess, blk.t_w_down_exps, t_act, t_top)             # [d_model, K, n]
        t_down = self.trace_tap(tag + "moe_e_down", t_down)
        t_weighted = tnn.tnn_mul(sess, t_down, t_w)
        row = D * 4
        t_dn = tnn.tnn_view_2d(sess, t_weighted, D, n, row * K, 0)
        for k in range(1, K):
            t_dn = tnn.tnn_add(sess, t_dn, tnn.tnn_view_2d(sess, t_weighted, D, n, row * K, k * row))
        if K == 1:
            t_dn = tnn.tnn_cont(sess, t_dn)
        return self.trace_tap(tag + "moe_out", t_dn)

    def _kq_mask(self, pos: int, window: int, length: int | None = None) -> np.ndarray:
        """0 where position ``pos`` may attend (causal, and inside the sliding window), -inf elsewhere."""
        j = np.arange(self._n_kv_padded(pos) if length is None else length)
        ok = j <= pos
        if window > 0:
            ok &= pos - j < window
        return np.where(ok, 0.0, -np.inf).astype(np.float32)

    def _n_kv_padded(self, pos: int) -> int:
        p = self.kv_pad
        return min(self.max_T, max(p, -(-(pos + 1) // p) * p))

    # ------------------------------------------------------------------ running a step

    def step(self, token_id: int, pos: int) -> np.ndarray:
        """Build, run and read one decode step: logits (vocab,) of ``token_id`` at ``pos``; the cache advances."""
        if not 0 <= int(token_id) < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary (size {self.vocab_size})")
        if self.fused_heads and self.kv_pad and not self._trace:
            return self._step_replayed(int(token_id), pos)
        tnn.tnn_reset_for_rebuild(self.sess)
        self._replay = None
        self._t_kv_row = self._t_v_idx = self._t_out_rows = None
        self._taps = []
        self._t_kq_masks = {}
        if self.kv_pad and not self.use_flash_attn:
            n = self._n_kv_padded(pos)
            for window in self.mask_windows:
                self._t_kq_masks[window] = tnn.tnn_input_2d_f32(self.sess, 1, n)
        res = self.build_decode_step(pos)
        tnn.tnn_realize(self.sess, res.t_logits)
        for window, t_mask in self._t_kq_masks.items():
            tnn.upload(self.sess, t_mask, self._kq_mask(pos, window))
        tnn.upload(self.sess, res.t_token_id, np.array([token_id], np.int32))
        tnn.upload(self.sess, res.t_pos, np.array([pos], np.int32))
        tnn.tnn_compute(self.sess)
        self._collect_trace()
        return tnn.download(self.sess, res.t_logits).reshape(-1)

    def _collect_trace(self) -> None:
        """After a compute in trace mode: keep every tap's values for dump_trace."""
        if self._trace:
            self._last_trace = {name: tnn.download(self.sess, t) for name, t in self._taps}

    def close(self) -> None:
        """Free the session, then the mapping it points into."""
        if self.sess is not None:
            tnn.tnn_session_free(self.sess)
            self.sess = None
        if self.gguf_handle_keepalive is not None:
            tnn.tnn_gguf_free(self.gguf_handle_keepalive)
            self.gguf_handle_keepalive = None
        self.realized = False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _is_quantized(ggml_type: int) -> bool:
    return ggml_type not in (GGML_TYPE_F32, GGML_TYPE_F16, tnn.GGML_TYPE_BF16)


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


def _f32_div(a: float, b: float) -> float:
    """a / b rounded to float32, as llama.cpp computes its scale constants (1.0f / x)."""
    return float(np.float32(a) / np.float32(b))


# The seed's names.
SmolLM2KVFFICacheMetal = SmolLM2KVFFICache
SmolLM2KVBlockFFIMetal = SmolLM2KVBlockFFI
SmolLM2KVStepResultMetal = SmolLM2KVStepResult
