"""Read a GGUF's metadata once into a frozen :class:`ModelConfig`.

This is the only module that knows GGUF key names and per-architecture quirks;
graph code reads the flags here, never keys or arch names (DESIGN.md). The
values mirror what llama.cpp derives in ``llama-model.cpp`` / ``src/models/*``
and ``llama-context.cpp`` for the same file.

The file is read through :mod:`toy_llm.gguf_meta` (ggml's own GGUF reader, via
libtinynn): a key of the wrong type raises :class:`GGUFLoadError` naming the file,
the key and both types.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .ggml_types import GGML_TYPE_F32
from .gguf_meta import GGUFLoadError, open_meta

__all__ = ["GGUFLoadError", "ModelConfig", "RopeScaling", "load_config", "detect_weight_type", "SUPPORTED_ARCHS"]

ROPE_NORMAL, ROPE_NEOX = 0, 2   # ggml_rope_ext modes (ggml.h GGML_ROPE_TYPE_*)

# Architectures the engine builds graphs for, and their rope layout. llama.cpp's
# converter permutes Q/K rows for llama-family files so ggml's NORMAL mode
# applies; qwen2/qwen3/gemma keep HF's half-split layout (NEOX).
ROPE_MODE_BY_ARCH = {
    "llama": ROPE_NORMAL, "granite": ROPE_NORMAL, "mixtral": ROPE_NORMAL, "olmoe": ROPE_NEOX,
    "qwen2": ROPE_NEOX, "qwen3": ROPE_NEOX, "qwen2moe": ROPE_NEOX, "qwen3moe": ROPE_NEOX,
    "gemma2": ROPE_NEOX, "gemma3": ROPE_NEOX,
}
SUPPORTED_ARCHS = tuple(ROPE_MODE_BY_ARCH)


# llama.cpp passes norm_w=true to build_moe_ffn for these archs (renormalise the top-k weights),
# whatever the GGUF says; OLMoE and Qwen2-MoE keep the raw softmax weights.
MOE_RENORM_BY_ARCH = {"llama": True, "mixtral": True, "qwen3moe": True, "granite": True,
                      "olmoe": False, "qwen2moe": False}


def inv_sqrt_f32(n: float) -> float:
    """1.0f / sqrtf(float(n)), as llama.cpp computes scales (float32 rounding at each step)."""
    return float(np.float32(1.0) / np.sqrt(np.float32(n)))


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling as ggml_rope_ext takes it (llama.cpp's cparams after defaults)."""

    kind: str = "none"              # none | linear | yarn | llama3
    factor: float = 1.0
    freq_scale: float = 1.0
    ext_factor: float = 0.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    orig_max_pos: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    @classmethod
    def none(cls) -> "RopeScaling":
        return cls()

    @staticmethod
    def compute_llama3_freq_factors(d_head: int, rope_base: float, orig_max_pos: int, factor: float,
                                    low_freq_factor: float, high_freq_factor: float) -> np.ndarray:
        """Per-frequency divisors of Llama 3's rope scaling (what the converter stores as rope_freqs.weight)."""
        low_wavelen = orig_max_pos / low_freq_factor
        high_wavelen = orig_max_pos / high_freq_factor
        out = np.empty(d_head // 2, dtype=np.float32)
        for i in range(d_head // 2):
            freq = 1.0 / (rope_base ** (2.0 * i / d_head))
            wavelen = 2.0 * math.pi / freq
            if wavelen < high_wavelen:
                out[i] = 1.0
            elif wavelen > low_wavelen:
                out[i] = factor
            else:
                smooth = (orig_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
                out[i] = 1.0 / ((1.0 - smooth) / factor + smooth)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter and arch flag the graph builders need, read once."""

    path: str
    arch: str
    d_model: int
    d_ff: int
    n_heads: int
    n_kv: int
    head_dim: int
    n_layers: int
    vocab: int
    context_length: int
    rope_base: float
    rope_dim: int
    rope_mode: int
    rope_scaling: RopeScaling
    rms_eps: float
    weight_type: int                    # dominant type of the 2-D linear weights
    untied_output: bool
    qkv_bias: bool
    qk_norm_kind: int                   # 0 none, 1 per-head gamma [head_dim], 2 whole-vector gamma
    post_norms: bool                    # Gemma sandwich norms
    swa_window: int                     # 0: no sliding window
    swa_pattern: tuple[bool, ...] = ()  # per layer: True where the layer uses the window
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embed_scale: float = 1.0
    attn_scale: float = 0.0             # 0: 1/sqrt(head_dim)
    q_prescale: bool = False            # Gemma: Q is multiplied by attn_scale before attention
    rope_base_swa: float = 0.0          # rope base of sliding-window layers (0: same as rope_base)
    ffn_act: str = "silu"               # silu | gelu (tanh)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_weights_norm: bool = False
    expert_weights_scale: float = 0.0   # 0 or 1: no scaling of the routed weights
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    has_rope_freqs: bool = False
    per_head_qkv: bool = False          # attn_q/k/v stored one tensor per head (the seed's toy checkpoints)
    tensor_types: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    # per layer, derived from the fields above in __post_init__ (llama.cpp's is_swa / freq_base_l)
    layer_window: tuple[int, ...] = field(init=False)       # attention window; 0 = the whole context
    layer_rope_base: tuple[float, ...] = field(init=False)  # rope base (Gemma: local layers have their own)

    def __post_init__(self) -> None:
        windows = tuple(self.swa_window if self.swa_window > 0 and (not self.swa_pattern or self.swa_pattern[il])
                        else 0 for il in range(self.n_layers))
        bases = tuple(self.rope_base_swa if self.rope_base_swa and w > 0 else self.rope_base for w in windows)
        object.__setattr__(self, "layer_window", windows)
        object.__setattr__(self, "layer_rope_base", bases)

    @classmethod
    def from_dims(cls, d_model: int, d_ff: int, n_heads: int, n_kv: int, n_layers: int, vocab: int,
                  rope_base: float, rms_eps: float, untied: bool, qkv_bias: bool, head_dim: int | None = None,
                  base: "ModelConfig | None" = None) -> "ModelConfig":
        """The seed's ``realize_for`` arguments as a config: ``base``'s arch flags (a plain llama
        without one) with these dimensions."""
        from dataclasses import replace

        dims = dict(d_model=d_model, d_ff=d_ff, n_heads=n_heads, n_kv=n_kv, n_layers=n_layers, vocab=vocab,
                    rope_base=rope_base, rms_eps=rms_eps, untied_output=untied, qkv_bias=qkv_bias,
                    head_dim=head_dim or d_model // n_heads)
        if base is not None:
            if base.swa_pattern and len(base.swa_pattern) != n_layers:
                raise ValueError(f"realize_for: n_layers={n_layers} but the applied config has "
                                 f"{len(base.swa_pattern)} layers")
            return replace(base, **dims)
        return cls(path="", arch="llama", context_length=0, rope_dim=dims["head_dim"], rope_mode=ROPE_NORMAL,
                   rope_scaling=RopeScaling.none(), weight_type=GGML_TYPE_F32, qk_norm_kind=0, post_norms=False,
                   swa_window=0, **dims)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def kq_scale(self) -> float:
        """The attention scale, rounded as llama.cpp computes it (in float32)."""
        return self.attn_scale if self.attn_scale else inv_sqrt_f32(self.head_dim)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


def _weight_type(tensors) -> int:
    c = Counter(t.type for name, t in tensors.items()
                if name.startswith("blk.") and name.endswith(".weight") and len(t.shape) == 2)
    if not c:
        return GGML_TYPE_F32
    return c.most_common(1)[0][0]


def detect_weight_type(path_or_reader) -> int:
    """The most common ggml type among the 2-D ``blk.*`` weights (what the seed calls weight_type).
    ``path_or_reader``: a path, a :class:`~toy_llm.gguf_meta.GGUFMeta` or a ``gguf.GGUFReader``."""
    with open_meta(path_or_reader) as m:
        return _weight_type(m.tensors)


def load_config(path_or_reader) -> ModelConfig:
    """Read ``path``'s metadata into a :class:`ModelConfig`; unsupported arch, missing key or a key of
    the wrong type -> GGUFLoadError. ``path_or_reader``: a path, a
    :class:`~toy_llm.gguf_meta.GGUFMeta` (left open) or a ``gguf.GGUFReader``."""
    with open_meta(path_or_reader) as m:
        return _config(m)


def _config(m) -> ModelConfig:
    path = os.path.abspath(m.path) if m.path != "<gguf.GGUFReader>" else m.path
    arch = m.get_str("general.architecture", None)
    if arch is None:
        raise GGUFLoadError(f"{path}: missing key 'general.architecture'")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFLoadError(f"{path}: key 'general.architecture' is {arch!r}: unsupported architecture "
                            f"(supported: {', '.join(SUPPORTED_ARCHS)})")

    def req(key):
        return m.get_int(f"{arch}.{key}")

    def opt_int(key, default):
        return m.get_int(f"{arch}.{key}", default)

    def opt_float(key, default):
        return m.get_float(f"{arch}.{key}", default)

    def bad(key, value, expected):
        return GGUFLoadError(f"{path}: key '{arch}.{key}' is {value!r}, expected {expected}")

    def in_range(key, value, lo, hi=None):
        if value < lo or (hi is not None and value > hi):
            raise bad(key, value, f">= {lo}" if hi is None else f"in [{lo}, {hi}]")
        return value

    def finite(key, value, lo=None, positive=False):
        if not math.isfinite(value) or (positive and value <= 0) or (lo is not None and value < lo):
            raise bad(key, value, "a finite float" + (" > 0" if positive else f" >= {lo}" if lo is not None else ""))
        return value

    tensors = m.tensors
    if "token_embd.weight" not in tensors:
        raise GGUFLoadError(f"{path}: missing tensor 'token_embd.weight'")
    embd_shape = tensors["token_embd.weight"].shape
    d_model = in_range("embedding_length", req("embedding_length"), 1)
    if len(embd_shape) != 2 or embd_shape[0] != d_model or embd_shape[1] < 1:
        raise GGUFLoadError(f"{path}: tensor 'token_embd.weight' has shape {list(embd_shape)}, expected "
                            f"[{d_model}, n_vocab] ('{arch}.embedding_length' = {d_model})")
    vocab = int(embd_shape[1])
    n_heads = in_range("attention.head_count", req("attention.head_count"), 1, d_model)
    n_kv = in_range("attention.head_count_kv", opt_int("attention.head_count_kv", n_heads), 1, n_heads)
    if n_heads % n_kv:
        raise GGUFLoadError(f"{path}: key '{arch}.attention.head_count' ({n_heads}) is not a multiple of "
                            f"'{arch}.attention.head_count_kv' ({n_kv})")
    if f"{arch}.attention.key_length" not in m and d_model % n_heads:
        raise GGUFLoadError(f"{path}: key '{arch}.embedding_length' ({d_model}) is not a multiple of "
                            f"'{arch}.attention.head_count' ({n_heads}), and there is no "
                            f"'{arch}.attention.key_length' to give the head size")
    head_dim = in_range("attention.key_length", opt_int("attention.key_length", d_model // n_heads), 1)
    n_layers = _check_layers(path, arch, in_range("block_count", req("block_count"), 1), tensors)
    d_ff = opt_int("feed_forward_length", 0) or opt_int("expert_feed_forward_length", 0)
    n_experts = in_range("expert_count", opt_int("expert_count", 0), 0, 1 << 16)
    if n_experts:
        d_ff = opt_int("expert_feed_forward_length", d_ff)
        in_range("expert_used_count", opt_int("expert_used_count", 0), 1, n_experts)
    key_ff = "expert_feed_forward_length" if n_experts and f"{arch}.expert_feed_forward_length" in m \
        else "feed_forward_length"
    in_range(key_ff, d_ff, 1)
    _check_layer0_shapes(path, tensors, {
        "attn_q": ((d_model, n_heads * head_dim), ("embedding_length", "attention.head_count x head size")),
        "attn_k": ((d_model, n_kv * head_dim), ("embedding_length", "attention.head_count_kv x head size")),
        "attn_v": ((d_model, n_kv * head_dim), ("embedding_length", "attention.head_count_kv x head size")),
        "attn_output": ((n_heads * head_dim, d_model), ("attention.head_count x head size", "embedding_length")),
        **({"ffn_gate_inp": ((d_model, n_experts), ("embedding_length", "expert_count")),
            "ffn_gate_exps": ((d_model, d_ff, n_experts), ("embedding_length", key_ff, "expert_count")),
            "ffn_up_exps": ((d_model, d_ff, n_experts), ("embedding_length", key_ff, "expert_count")),
            "ffn_down_exps": ((d_ff, d_model, n_experts), (key_ff, "embedding_length", "expert_count"))}
           if n_experts else
           {"ffn_gate": ((d_model, d_ff), ("embedding_length", key_ff)),
            "ffn_up": ((d_model, d_ff), ("embedding_length", key_ff)),
            "ffn_down": ((d_ff, d_model), (key_ff, "embedding_length"))})}, arch,
        dict(embedding_length=d_model, expert_count=n_experts, **{key_ff: d_ff}), head_dim)
    in_range("context_length", opt_int("context_length", 2048), 0, 2**31 - 1)
    finite("attention.layer_norm_rms_epsilon", opt_float("attention.layer_norm_rms_epsilon", 1e-5), lo=0.0)
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "attention.scale", "expert_weights_scale"):
        finite(key, opt_float(key, 0.0), lo=0.0)
    for key in ("embedding_scale", "residual_scale", "logit_scale"):
        finite(key, opt_float(key, 1.0), positive=True)
    in_range("attention.sliding_window", opt_int("attention.sliding_window", 0), 0)

    rope_base = finite("rope.freq_base", opt_float("rope.freq_base", 10000.0), positive=True)
    rope_dim = opt_int("rope.dimension_count", head_dim)
    if not 0 < rope_dim <= head_dim or rope_dim % 2:
        raise bad("rope.dimension_count", rope_dim, f"even and in [2, {head_dim}] (the head size)")
    _check_tokenizer_keys(m, path, vocab)
    scaling = _rope_scaling(m, arch, head_dim, rope_base, "rope_freqs.weight" in tensors)

    qk_norm_kind = 0
    if "blk.0.attn_q_norm.weight" in tensors:
        n = tensors["blk.0.attn_q_norm.weight"].n_elements
        qk_norm_kind = 1 if n == head_dim else 2

    is_gemma = arch in ("gemma2", "gemma3")
    swa_window, swa_pattern = _swa(m, arch, n_layers)
    rope_base_swa = 0.0
    if swa_window:
        # llama.cpp: gemma2 defaults the local base to the global one, gemma3 to 10000
        rope_base_swa = opt_float("rope.freq_base_swa", rope_base if arch == "gemma2" else 10000.0)

    attn_scale = opt_float("attention.scale", 0.0)
    if is_gemma:
        # llama.cpp: 1/sqrt(head_dim), or 1/sqrt(d_model/n_heads) for the 27B models; applied to Q
        big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
        attn_scale = inv_sqrt_f32(d_model // n_heads if big else head_dim)

    return ModelConfig(
        path=str(path), arch=arch, d_model=d_model, d_ff=d_ff, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim,
        n_layers=n_layers, vocab=vocab, context_length=opt_int("context_length", 2048),
        rope_base=rope_base, rope_dim=rope_dim, rope_mode=ROPE_MODE_BY_ARCH[arch], rope_scaling=scaling,
        rms_eps=opt_float("attention.layer_norm_rms_epsilon", 1e-5),
        weight_type=_weight_type(tensors),
        untied_output="output.weight" in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm_kind=qk_norm_kind,
        post_norms="blk.0.post_attention_norm.weight" in tensors,
        swa_window=swa_window, swa_pattern=swa_pattern,
        attn_softcap=opt_float("attn_logit_softcapping", 0.0) if arch == "gemma2" else 0.0,
        final_softcap=opt_float("final_logit_softcapping", 0.0) if arch == "gemma2" else 0.0,
        embed_scale=float(np.sqrt(np.float32(d_model))) if is_gemma else opt_float("embedding_scale", 1.0),
        attn_scale=attn_scale, q_prescale=is_gemma, rope_base_swa=rope_base_swa,
        ffn_act="gelu" if is_gemma else "silu",
        n_experts=n_experts, n_experts_used=opt_int("expert_used_count", 0),
        expert_weights_norm=n_experts > 0 and MOE_RENORM_BY_ARCH.get(arch, False),
        expert_weights_scale=opt_float("expert_weights_scale", 0.0),
        residual_scale=opt_float("residual_scale", 1.0),
        logit_scale=opt_float("logit_scale", 1.0),
        has_rope_freqs="rope_freqs.weight" in tensors,
        per_head_qkv="blk.0.attn_q.head_0.weight" in tensors,
        tensor_types={name: t.type for name, t in tensors.items()},
    )


_LAYER_NAME = re.compile(r"blk\.(\d+)\.")


def _check_layers(path: str, arch: str, n_layers: int, tensors) -> int:
    """block_count against the layers the tensor table has (before anything is made per layer)."""
    present = {int(mt.group(1)) for name in tensors if (mt := _LAYER_NAME.match(name))}
    top = max(present, default=-1)
    if n_layers > top + 1:
        raise GGUFLoadError(f"{path}: key '{arch}.block_count' is {n_layers}, but the file has tensors for "
                            f"{'layers 0..' + str(top) if present else 'no layer'} only "
                            f"(missing tensor 'blk.{top + 1}.attn_norm.weight')")
    if top >= n_layers:
        extra = next(name for name in tensors if name.startswith(f"blk.{top}."))
        raise GGUFLoadError(f"{path}: tensor '{extra}' is for layer {top}, beyond '{arch}.block_count' = {n_layers}")
    missing = sorted(set(range(n_layers)) - present)
    if missing:
        raise GGUFLoadError(f"{path}: no tensors for layer {missing[0]} (missing tensor "
                            f"'blk.{missing[0]}.attn_norm.weight'; '{arch}.block_count' = {n_layers})")
    return n_layers


def _check_layer0_shapes(path: str, tensors, want: dict, arch: str, values: dict, head_dim: int) -> None:
    """Layer 0's matrices against the dimensions the keys give, before any buffer is sized from them
    (a block_count or feed_forward_length the tensors do not have is named here, with its key);
    every tensor's shape is checked again where it is declared (engine/weights.py). ``want``:
    name -> (ne, the key each dim comes from)."""
    for name, (ne, keys) in want.items():
        t = tensors.get(f"blk.0.{name}.weight")
        if t is None:
            continue   # per-head files (attn_q.head_0...), or missing: named where declared
        ne = tuple(ne)
        while len(ne) > 1 and ne[-1] == 1:
            ne = ne[:-1]
        if t.shape != ne:
            why = ", ".join(f"'{arch}.{k}' = {values[k]}" if k in values else f"'{arch}.{k.split(' x ')[0]}' x "
                            f"head size {head_dim}" for k in keys)
            raise GGUFLoadError(f"{path}: tensor 'blk.0.{name}.weight' has shape {list(t.shape)}, expected "
                                f"{list(ne)} (from {why})")


# special token id keys (llama.cpp's LLM_KV_TOKENIZER_*_ID)
SPECIAL_TOKEN_ID_KEYS = tuple(f"tokenizer.ggml.{n}_token_id" for n in (
    "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask", "cls", "prefix", "suffix", "middle",
    "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"))


def _check_tokenizer_keys(m, path: str, vocab: int) -> None:
    """The vocabulary's arrays agree with the embedding, and every special token id lies inside it."""
    n_tokens = vocab
    if "tokenizer.ggml.tokens" in m:
        tokens_n = _array_len(m, "tokenizer.ggml.tokens")
        if tokens_n != vocab:
            raise GGUFLoadError(f"{path}: key 'tokenizer.ggml.tokens' has {tokens_n} tokens, but tensor "
                                f"'token_embd.weight' has {vocab} rows (expected equal)")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in m:
            n = _array_len(m, key)
            if n != n_tokens:
                raise GGUFLoadError(f"{path}: key '{key}' has {n} entries, expected {n_tokens} (one per token)")
    for key in SPECIAL_TOKEN_ID_KEYS:
        v = m.get_int(key, None)
        if v is not None and not 0 <= v < n_tokens:
            raise GGUFLoadError(f"{path}: key '{key}' is {v}, outside the vocabulary [0, {n_tokens})")


def _array_len(m, key: str) -> int:
    t = m.type_of(key)
    if not t.startswith("arr"):
        raise GGUFLoadError(f"{path_of(m)}: key '{key}' has type {t}, expected an array")
    return m.array_len(key)


def path_of(m) -> str:
    return os.path.abspath(m.path) if m.path != "<gguf.GGUFReader>" else m.path


def _swa(m, arch: str, n_layers: int) -> tuple[int, tuple[bool, ...]]:
    """Sliding window and which layers use it (llama.cpp's load_swa_pattern / set_swa_pattern)."""
    window = m.get_int(f"{arch}.attention.sliding_window", 0)
    if not window or arch not in ("gemma2", "gemma3"):
        return 0, ()
    key = f"{arch}.attention.sliding_window_pattern"
    if key in m and m.type_of(key).startswith("arr"):
        return window, tuple(bool(x) for x in m.get_array(key)[:n_layers])
    n = m.get_int(key, 2 if arch == "gemma2" else 6)
    return window, tuple(n == 0 or il % n < n - 1 for il in range(n_layers))


def _rope_scaling(m, arch: str, head_dim: int, rope_base: float, has_rope_freqs: bool) -> RopeScaling:
    def opt_float(key, default):
        return m.get_float(f"{arch}.{key}", default)

    def opt_int(key, default):
        return m.get_int(f"{arch}.{key}", default)

    kind = m.get_str(f"{arch}.rope.scaling.type", "none")
    for key in ("rope.scaling.factor", "rope.scaling.attn_factor", "rope.scaling.yarn_beta_fast",
                "rope.scaling.yarn_beta_slow", "rope.scaling.low_freq_factor", "rope.scaling.high_freq_factor"):
        v = opt_float(key, 0.0)
        if not math.isfinite(v) or v < 0:
            raise GGUFLoadError(f"{m.path}: key '{arch}.{key}' is {v!r}, expected a finite float >= 0")
    if not 0 <= opt_int("rope.scaling.original_context_length", 0) < 2**31:
        raise GGUFLoadError(f"{m.path}: key '{arch}.rope.scaling.original_context_length' is outside [0, 2^31)")
    factor = opt_float("rope.scaling.factor", 0.0) or 1.0
    orig = opt_int("rope.scaling.original_context_length", 0) or opt_int("context_length", 0)
    beta_fast = opt_float("rope.scaling.yarn_beta_fast", 32.0)
    beta_slow = opt_float("rope.scaling.yarn_beta_slow", 1.0)
    attn_factor = opt_float("rope.scaling.attn_factor", 1.0)
    if has_rope_freqs and kind == "none":
        kind = "llama3"   # the converter writes Llama 3's factors as a tensor
    if kind == "linear":
        return RopeScaling(kind="linear", factor=factor, freq_scale=1.0 / factor, attn_factor=attn_factor,
                           beta_fast=beta_fast, beta_slow=beta_slow, orig_max_pos=orig)
    if kind == "yarn":
        # llama-context.cpp: ext_factor 1; attn_factor = mscale(factor) / (1 + 0.1 ln factor) * rope_attn_factor
        mscale = 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0
        return RopeScaling(kind="yarn", factor=factor, freq_scale=1.0 / factor, ext_factor=1.0,
                           attn_factor=mscale / (1.0 + 0.1 * math.log(factor)) * attn_factor,
                           beta_fast=beta_fast, beta_slow=beta_slow, orig_max_pos=orig)
    if kind == "llama3":
        return RopeScaling(kind="llama3", factor=factor, orig_max_pos=orig,
                           low_freq_factor=opt_float("rope.scaling.low_freq_factor", 1.0),
                           high_freq_factor=opt_float("rope.scaling.high_freq_factor", 4.0),
                           beta_fast=beta_fast, beta_slow=beta_slow)
    return RopeScaling(beta_fast=beta_fast, beta_slow=beta_slow, orig_max_pos=orig)
