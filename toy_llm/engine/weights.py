"""The model's persistent weights: where they come from, and the one declaration of them.

Two sources, the seed's two realize paths:

* :class:`MmapWeights` (``realize_for_mmap``): every tensor points into the GGUF's mapped pages,
  no copy (the seed's BYO-pointer path). Matmul weights of the types ggml repacks on this CPU are
  copied into ggml's interleaved layout, as llama.cpp does.
* :class:`CopyWeights` (``realize_for`` + ``load_weights``): tensors in the session's own buffer
  (the file's own types, or F32 / Q8_0), filled from the file afterwards with ggml's own
  (de)quantizer.

:func:`declare_weights` declares every tensor once, from either source. Each layer's Q/K/V is one
whole matrix; the per-head graph's heads (``t_w_q[h]``, ...) are views of its rows, so no weight
is stored twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

import numpy as np

from .. import tinynn as tnn
from ..gguf_load import ModelConfig, RopeScaling
from ..gguf_meta import GGUFLoadError


class MissingTensorError(GGUFLoadError, KeyError):
    """A tensor the architecture needs is absent from the GGUF (a GGUFLoadError; a KeyError too, as before)."""

    def __str__(self) -> str:  # KeyError quotes its arg; keep the sentence readable
        return str(self.args[0])


@dataclass(frozen=True)
class Slice:
    """GGUF tensor ``name`` as a [rows, cols] matrix (rows = 1: a vector of ``cols``), or, with
    ``ne``, a whole 3-D expert stack."""

    name: str
    rows: int
    cols: int
    ne: tuple[int, int, int] | None = None


# ggml types a matmul weight / embedding table may have: those with CPU dot-product kernels
# (F32, F16, BF16, the Q*_0/1 and K-quants, IQ*, TQ*, MXFP4); not the integer, F64 or Q8_K/Q8_1
# activation types
WEIGHT_TYPES = frozenset((0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 29, 30, 34, 35,
                          39))


def config_note(cfg: ModelConfig) -> str:
    """The dimensions tensor shapes follow from, with the keys they come from (for shape errors)."""
    a = cfg.arch
    note = (f"d_model {cfg.d_model} '{a}.embedding_length', n_heads {cfg.n_heads} '{a}.attention.head_count', "
            f"n_kv {cfg.n_kv} '{a}.attention.head_count_kv', head size {cfg.head_dim}, d_ff {cfg.d_ff} "
            f"'{a}.{'expert_' if cfg.is_moe and cfg.arch == 'qwen3moe' else ''}feed_forward_length', "
            f"n_vocab {cfg.vocab} (token_embd.weight)")
    return note + (f", n_experts {cfg.n_experts} '{a}.expert_count'" if cfg.is_moe else "")


def check_file_tensor(path: str, s: Slice, kind: str, typ: int, shape: tuple, note: str = "") -> None:
    """The file's tensor ``s.name`` (ggml ``typ``, ``shape`` in ne order, trailing 1s dropped) is what
    the config implies: else GGUFLoadError naming the tensor, the expected and the found shape / type."""
    want = list(s.ne) if s.ne is not None else [s.cols, s.rows]
    while len(want) > 1 and want[-1] == 1:
        want.pop()
    found = list(shape)
    if found != want:
        raise GGUFLoadError(f"{path}: tensor '{s.name}' has shape {found}, expected {want} (from the config: "
                            f"{note or 'see toy_llm.gguf_load.ModelConfig'})")
    ok = WEIGHT_TYPES if kind in ("linear", "embed") else (tnn.GGML_TYPE_F32,)
    if typ not in ok:
        name = tnn.tnn_type_name(typ) if 0 <= typ < 2**31 else ""   # "" for an unknown type id
        raise GGUFLoadError(f"{path}: tensor '{s.name}' has ggml type {typ} ({name or 'unknown'}), expected "
                            + ("F32" if kind not in ("linear", "embed") else
                               "a float or block-quantized weight type (F32, F16, BF16, Q4_0, ..., Q6_K, IQ*)"))


class MmapWeights:
    """Weights that point into the mapped GGUF (host backends: no copy)."""

    config_note = ""   # set by declare_weights: the dims behind each expected shape

    def __init__(self, sess, gguf_handle, path: str):
        self.sess, self.g, self.path = sess, gguf_handle, path
        tnn.tnn_session_attach_weight_mmap(sess, tnn.tnn_gguf_mmap_base(gguf_handle),
                                           tnn.tnn_gguf_mmap_size(gguf_handle))

    def tensor(self, s: Slice, kind: str):
        """``kind``: 'linear' (a matmul weight: may be repacked), 'embed' or 'f32'."""
        idx = tnn.tnn_gguf_find_index(self.g, s.name)
        if idx < 0:
            raise MissingTensorError(f"{self.path}: missing tensor '{s.name}'")
        typ = tnn.tnn_gguf_tensor_type(self.g, idx)
        off = tnn.tnn_gguf_tensor_file_offset(self.g, idx)
        nbytes = tnn.tnn_gguf_tensor_nbytes(self.g, idx)
        nd = tnn.tnn_gguf_tensor_ndim(self.g, idx)
        check_file_tensor(self.path, s, kind, typ, tuple(tnn.tnn_gguf_tensor_ne(self.g, idx, d) for d in range(nd)),
                          self.config_note)
        try:
            ne = s.ne or (s.cols, s.rows, 1)
            want = tnn.tnn_row_size(typ, ne[0]) * ne[1] * ne[2]
            if want != nbytes:  # the metadata's dims do not fit this tensor
                raise tnn.TinyNNError(f"holds {nbytes} bytes, the config implies {want} (shape {list(ne)})")
            if s.ne is not None:
                return tnn.tnn_input_3d_weight_mmap(self.sess, *s.ne, typ, off)
            if s.rows == 1 and kind == "f32":
                return tnn.tnn_input_1d_persistent_mmap(self.sess, s.cols, typ, off)
            if kind == "linear":
                return tnn.tnn_input_2d_weight_mmap(self.sess, s.rows, s.cols, typ, off)
            return tnn.tnn_input_2d_persistent_mmap(self.sess, s.rows, s.cols, typ, off)
        except tnn.TinyNNError as e:
            raise tnn.TinyNNError(f"{self.path}: tensor '{s.name}': {e}") from e


class CopyWeights:
    """Weights in the session's own buffer, filled from the file by :meth:`load`."""

    config_note = ""

    def __init__(self, sess, weight_type: int, embed_type: int = tnn.GGML_TYPE_F32,
                 file_types: dict[str, int] | None = None):
        """``file_types`` (name -> ggml type): keep each linear weight and the embedding in its own
        type from the file (a byte copy), instead of ``weight_type`` / ``embed_type``."""
        self.sess, self.weight_type, self.embed_type = sess, weight_type, embed_type
        self.file_types = file_types
        self.pending: list[tuple[object, Slice, str]] = []   # (tensor, slice, kind)

    def tensor(self, s: Slice, kind: str):
        wtype = {"linear": self.weight_type, "embed": self.embed_type}.get(kind, tnn.GGML_TYPE_F32)
        if self.file_types is not None and kind in ("linear", "embed"):
            wtype = self.file_types.get(s.name, wtype)   # (absent: load() names it, with the file)
        if s.ne is not None:
            t = tnn.tnn_input_3d_weight_typed(self.sess, *s.ne, wtype)
        elif s.rows == 1 and kind == "f32":
            t = tnn.tnn_input_1d_f32_persistent(self.sess, s.cols)
        elif kind == "linear":
            t = tnn.tnn_input_2d_weight_typed(self.sess, s.rows, s.cols, wtype)
        else:
            t = tnn.tnn_input_2d_persistent_typed(self.sess, s.rows, s.cols, wtype)
        self.pending.append((t, s, kind))
        return t

    def load(self, path: str, progress: bool = False) -> None:
        """Fill every declared tensor from ``path``, converting types where they differ. The tensor
        index comes from the shim's gguf reader (offsets checked against the file), the bytes from a
        read-only map of the file: nothing is parsed twice, and no copy is made beside the upload."""
        g = tnn.tnn_gguf_load(str(path))
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r")
            items = self.pending
            if progress:
                from tqdm import tqdm

                items = tqdm(items, desc=f"copying weights from {path}", unit="tensor")
            for t, s, kind in items:
                idx = tnn.tnn_gguf_find_index(g, s.name)
                if idx < 0:
                    raise MissingTensorError(f"{path}: missing tensor '{s.name}'")
                off, nbytes = tnn.tnn_gguf_tensor_file_offset(g, idx), tnn.tnn_gguf_tensor_nbytes(g, idx)
                typ, nd = tnn.tnn_gguf_tensor_type(g, idx), tnn.tnn_gguf_tensor_ndim(g, idx)
                check_file_tensor(path, s, kind, typ, tuple(tnn.tnn_gguf_tensor_ne(g, idx, d) for d in range(nd)),
                                  self.config_note)
                self._fill(path, t, s, tnn.tnn_gguf_tensor_type(g, idx), data[off:off + nbytes])
            del data
        finally:
            tnn.tnn_gguf_free(g)
        self.pending = []

    def _fill(self, path, t, s: Slice, src_type: int, raw: np.ndarray) -> None:
        dst_type = tnn.tnn_tensor_type(t)
        try:
            if dst_type == src_type:
                tnn.upload(self.sess, t, raw)
            else:
                n = int(tnn.tnn_tensor_ne(t, 0) * tnn.tnn_tensor_ne(t, 1) * tnn.tnn_tensor_ne(t, 2))
                f32 = tnn.dequantize(src_type, raw, n)
                if dst_type == tnn.GGML_TYPE_F32:
                    tnn.upload(self.sess, t, f32)
                else:
                    tnn.upload(self.sess, t, tnn.quantize(dst_type, f32.reshape(-1, int(tnn.tnn_tensor_ne(t, 0)))))
        except tnn.TinyNNError as e:
            raise tnn.TinyNNError(f"{path}: tensor '{s.name}': {e}") from e


# One transformer block's persistent tensors, under the seed's names: one handle each ...
_BLOCK_TENSORS = (
    "t_rn1_gamma t_rn2_gamma t_post_attn_norm_gamma t_post_ffn_norm_gamma t_q_norm_gamma t_k_norm_gamma "
    "t_w_q_all t_w_k_all t_w_v_all t_b_q_all t_b_k_all t_b_v_all "   # whole Q/K/V (None in per-head files)
    "t_w_o t_w_gate t_w_up t_w_down t_w_router t_w_gate_exps t_w_up_exps t_w_down_exps "
    "t_K_layer t_V_layer "                                            # the layer's KV cache (cache.py)
    "t_lora_q_a t_lora_q_b").split()   # an inference LoRA-Q adapter: A [R, d_model], B [n_heads * d_head, R]
# ... and one per head: views of the whole Q/K/V rows and bias, the cache's per-KV-head views,
# and the LoRA-Q adapters with their AdamW moments
_BLOCK_HEAD_LISTS = ("t_w_q t_b_q t_w_k t_w_v t_b_k t_b_v t_K t_V t_w_lora_a_q t_w_lora_b_q "
                     "t_w_lora_a_q_m t_w_lora_a_q_v t_w_lora_b_q_m t_w_lora_b_q_v "
                     "t_lora_q_b_heads").split()   # per-head views of t_lora_q_b's rows
SmolLM2KVBlockFFI = make_dataclass(
    "SmolLM2KVBlockFFI",
    [(n, object, None) for n in _BLOCK_TENSORS] + [(n, list, field(default_factory=list)) for n in _BLOCK_HEAD_LISTS],
    namespace={"__doc__": "One transformer block's persistent tensors (the seed's names). ``t_w_q[h]`` etc. are "
                          "views of the whole ``t_w_q_all`` (one copy of each weight); ``t_K`` / ``t_V`` are the "
                          "KV cache's per-head views, kept on the block as the seed does.",
               "__module__": __name__})
LayerWeights = SmolLM2KVBlockFFI


@dataclass
class ModelWeights:
    """Every persistent weight of a model: the globals and one :class:`LayerWeights` per layer."""

    token_embd: object
    output_norm: object
    output: object                 # None: tied, the embedding table is the output matrix
    rope_freqs: object             # None, the file's rope_freqs.weight, or llama3 factors computed at finalize
    layers: list[LayerWeights]
    per_head_file: bool            # the file stores attn_q/k/v per head (the seed's toy checkpoints)
    lora_rank: int = 0
    # the inference LoRA-Q adapter's scale (float32 lora_scale * alpha / rank), None: not applied
    lora_q_scale: float | None = None

    @property
    def out_matrix(self):
        return self.token_embd if self.output is None else self.output

    def after_finalize(self, sess, cfg: ModelConfig) -> None:
        """Fill what is computed rather than read: Llama 3's rope factors when the file has none."""
        rs = cfg.rope_scaling
        if self.rope_freqs is not None and not cfg.has_rope_freqs:
            tnn.upload(sess, self.rope_freqs, RopeScaling.compute_llama3_freq_factors(
                cfg.head_dim, cfg.rope_base, rs.orig_max_pos, rs.factor, rs.low_freq_factor, rs.high_freq_factor))


def _head_views(sess, whole, n_heads: int, d_head: int) -> list:
    """Each head's d_head rows of a whole [n_heads * d_head, d_model] projection."""
    typ, cols = tnn.tnn_tensor_type(whole), tnn.tnn_tensor_ne(whole, 0)
    nb1 = tnn.tnn_row_size(typ, cols)
    return [tnn.tnn_view_2d_persistent(sess, whole, cols, d_head, nb1, h * d_head * nb1) for h in range(n_heads)]


def _bias_pieces(sess, bias, n_heads: int, d_head: int) -> list:
    """Each head's [d_head, 1] piece of a whole [n_heads * d_head] bias."""
    row = tnn.tnn_row_size(tnn.tnn_tensor_type(bias), d_head)
    return [tnn.tnn_view_2d_persistent(sess, bias, d_head, 1, row, h * row) for h in range(n_heads)]


def declare_weights(sess, src, cfg: ModelConfig, lora_rank: int = 0, lora_adamw: bool = False,
                    lora_q_slots: tuple | None = None) -> ModelWeights:
    """Declare every persistent weight of ``cfg``'s model from ``src`` (MmapWeights | CopyWeights),
    the per-Q-head LoRA slots when ``lora_rank`` > 0, and an inference LoRA-Q adapter's F32 A and
    B for ``lora_q_slots`` = (rank, layers) (filled later, see Engine.set_lora_q)."""
    D, Dh, Dff, H, G = cfg.d_model, cfg.head_dim, cfg.d_ff, cfg.n_heads, cfg.n_kv
    src.config_note = config_note(cfg)
    vec = lambda name, n: src.tensor(Slice(name, 1, n), "f32")  # noqa: E731
    lin = lambda name, rows, cols: src.tensor(Slice(name, rows, cols), "linear")  # noqa: E731

    rope_freqs = None
    if cfg.has_rope_freqs:   # the file's own rope frequency factors (Llama 3 conversions)
        rope_freqs = vec("rope_freqs.weight", Dh // 2)
    elif cfg.rope_scaling.kind == "llama3":   # computed from the scaling keys after finalize
        rope_freqs = tnn.tnn_rope_freq_factors_alloc(sess, Dh)
    w = ModelWeights(token_embd=src.tensor(Slice("token_embd.weight", cfg.vocab, D), "embed"),
                     output_norm=vec("output_norm.weight", D),
                     output=lin("output.weight", cfg.vocab, D) if cfg.untied_output else None,
                     rope_freqs=rope_freqs, layers=[], per_head_file=cfg.per_head_qkv, lora_rank=lora_rank)
    f32 = lambda rows, cols: tnn.tnn_input_2d_f32_persistent(sess, rows, cols)  # noqa: E731

    for il in range(cfg.n_layers):
        p, blk = f"blk.{il}", LayerWeights()
        blk.t_rn1_gamma = vec(f"{p}.attn_norm.weight", D)
        blk.t_rn2_gamma = vec(f"{p}.ffn_norm.weight", D)
        if cfg.post_norms:
            blk.t_post_attn_norm_gamma = vec(f"{p}.post_attention_norm.weight", D)
            blk.t_post_ffn_norm_gamma = vec(f"{p}.post_ffw_norm.weight", D)
        if cfg.qk_norm_kind:
            whole = cfg.qk_norm_kind == 2
            blk.t_q_norm_gamma = vec(f"{p}.attn_q_norm.weight", H * Dh if whole else Dh)
            blk.t_k_norm_gamma = vec(f"{p}.attn_k_norm.weight", G * Dh if whole else Dh)
        if cfg.per_head_qkv:   # the seed's toy checkpoints: one tensor per head, no whole matrix
            blk.t_w_q = [lin(f"{p}.attn_q.head_{h}.weight", Dh, D) for h in range(H)]
            blk.t_w_k = [lin(f"{p}.attn_k.head_{h}.weight", Dh, D) for h in range(G)]
            blk.t_w_v = [lin(f"{p}.attn_v.head_{h}.weight", Dh, D) for h in range(G)]
        else:
            blk.t_w_q_all = lin(f"{p}.attn_q.weight", H * Dh, D)
            blk.t_w_k_all = lin(f"{p}.attn_k.weight", G * Dh, D)
            blk.t_w_v_all = lin(f"{p}.attn_v.weight", G * Dh, D)
            blk.t_w_q = _head_views(sess, blk.t_w_q_all, H, Dh)
            blk.t_w_k = _head_views(sess, blk.t_w_k_all, G, Dh)
            blk.t_w_v = _head_views(sess, blk.t_w_v_all, G, Dh)
        if cfg.qkv_bias:
            blk.t_b_q_all = vec(f"{p}.attn_q.bias", H * Dh)
            blk.t_b_k_all = vec(f"{p}.attn_k.bias", G * Dh)
            blk.t_b_v_all = vec(f"{p}.attn_v.bias", G * Dh)
            blk.t_b_q = _bias_pieces(sess, blk.t_b_q_all, H, Dh)
            blk.t_b_k = _bias_pieces(sess, blk.t_b_k_all, G, Dh)
            blk.t_b_v = _bias_pieces(sess, blk.t_b_v_all, G, Dh)
        if lora_rank:
            r = lora_rank
            blk.t_w_lora_a_q = [f32(r, D) for _ in range(H)]
            blk.t_w_lora_b_q = [f32(Dh, r) for _ in range(H)]
            if lora_adamw:
                blk.t_w_lora_a_q_m = [f32(r, D) for _ in range(H)]
                blk.t_w_lora_a_q_v = [f32(r, D) for _ in range(H)]
                blk.t_w_lora_b_q_m = [f32(Dh, r) for _ in range(H)]
                blk.t_w_lora_b_q_v = [f32(Dh, r) for _ in range(H)]
            for t in blk.t_w_lora_a_q + blk.t_w_lora_b_q:
                tnn.tnn_set_param(t)
        if lora_q_slots is not None and il in lora_q_slots[1]:
            R = lora_q_slots[0]
            blk.t_lora_q_a = f32(R, D)
            blk.t_lora_q_b = f32(H * Dh, R)
            blk.t_lora_q_b_heads = _head_views(sess, blk.t_lora_q_b, H, Dh)
        blk.t_w_o = lin(f"{p}.attn_output.weight", D, H * Dh)
        if cfg.is_moe:
            E = cfg.n_experts
            blk.t_w_router = lin(f"{p}.ffn_gate_inp.weight", E, D)
            blk.t_w_gate_exps = src.tensor(Slice(f"{p}.ffn_gate_exps.weight", 0, 0, ne=(D, Dff, E)), "linear")
            blk.t_w_up_exps = src.tensor(Slice(f"{p}.ffn_up_exps.weight", 0, 0, ne=(D, Dff, E)), "linear")
            blk.t_w_down_exps = src.tensor(Slice(f"{p}.ffn_down_exps.weight", 0, 0, ne=(Dff, D, E)), "linear")
        else:
            blk.t_w_gate = lin(f"{p}.ffn_gate.weight", Dff, D)
            blk.t_w_up = lin(f"{p}.ffn_up.weight", Dff, D)
            blk.t_w_down = lin(f"{p}.ffn_down.weight", D, Dff)
        w.layers.append(blk)
    return w
