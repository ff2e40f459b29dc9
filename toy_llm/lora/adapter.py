"""A LoRA-Q adapter and its file format: llama.cpp's LoRA GGUF (``src/llama-adapter.cpp``).

File: metadata ``general.type = "adapter"``, ``general.architecture`` = the base model's arch,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (F32); per adapted layer two F32 tensors
``blk.N.attn_q.weight.lora_a`` with ggml ne = [n_in, R] (numpy (R, n_in)) and
``blk.N.attn_q.weight.lora_b`` with ne = [R, n_out] (numpy (n_out, R)). llama.cpp adds
``scale * B (A x)`` to ``W x`` before the bias, ``scale = lora_scale * alpha / R`` in float32
(``alpha == 0`` means ``scale = lora_scale``), R = ``lora_b.ne[0]``.

A per-head adapter (the seed's layout: per query head A_h (r, D), B_h (Dh, r)) is the same thing
with a stacked A (H*r, D) and a block-diagonal B (H*Dh, H*r); ``alpha = alpha_h * H`` keeps
``alpha / R == alpha_h / r``.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..ggml_types import GGML_TYPE_F32
from ..gguf_meta import GGUFLoadError

__all__ = ["LoraAdapter", "load_adapter", "lora_scale", "check_adapter"]

_Q_NAME = "blk.{}.attn_q.weight"


def lora_scale(alpha: float, rank: int, user_scale: float) -> float:
    """llama.cpp's ``llama_adapter_lora_weight::get_scale`` in float32:
    ``alpha ? adapter_scale * alpha / rank : adapter_scale``."""
    f = np.float32
    if f(alpha) == 0:
        return float(f(user_scale))
    return float(f(f(user_scale) * f(alpha)) / f(rank))


@dataclass
class LoraAdapter:
    """LoRA on attn_q: per layer ``(A, B)``, A float32 (R, n_in), B float32 (n_out, R)."""

    arch: str
    alpha: float
    q: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self):
        q = {}
        for il, (a, b) in sorted(self.q.items()):
            a = np.ascontiguousarray(a, dtype=np.float32)
            b = np.ascontiguousarray(b, dtype=np.float32)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"LoraAdapter: layer {il}: A {a.shape} and B {b.shape} are not (R, n_in) "
                                 f"and (n_out, R)")
            q[int(il)] = (a, b)
        ranks = {b.shape[1] for _, b in q.values()}
        if len(ranks) > 1:
            raise ValueError(f"LoraAdapter: layers have different ranks {sorted(ranks)}")
        self.q = q

    @property
    def rank(self) -> int:
        """R (llama.cpp: ``lora_b.ne[0]``); 0 for an empty adapter."""
        for _, b in self.q.values():
            return int(b.shape[1])
        return 0

    def scale(self, lora_scale_: float = 1.0) -> float:
        """The factor llama.cpp applies to ``B (A x)``: float32 ``lora_scale * alpha / rank``."""
        return lora_scale(self.alpha, self.rank, lora_scale_)

    @classmethod
    def from_per_head(cls, arch: str, a_heads, b_heads, alpha_h: float) -> "LoraAdapter":
        """Per-head adapters -> one stacked A (H*r, D) and a block-diagonal B (H*Dh, H*r) per layer.
        ``a_heads[il]``: (H, r, D); ``b_heads[il]``: (H, Dh, r) (dicts or sequences indexed by layer);
        alpha = alpha_h * H, so alpha / R == alpha_h / r."""
        layers = sorted(a_heads.keys()) if isinstance(a_heads, dict) else list(range(len(a_heads)))
        q, n_head = {}, None
        for il in layers:
            a = np.asarray(a_heads[il], dtype=np.float32)
            b = np.asarray(b_heads[il], dtype=np.float32)
            if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
                raise ValueError(f"from_per_head: layer {il}: A {a.shape} is not (H, r, D) or B {b.shape} is "
                                 f"not (H, Dh, r) with the same H and r")
            H, r, D = a.shape
            Dh = b.shape[1]
            if n_head is not None and H != n_head:
                raise ValueError(f"from_per_head: layer {il} has {H} heads, earlier layers {n_head}")
            n_head = H
            big_b = np.zeros((H * Dh, H * r), dtype=np.float32)
            for h in range(H):
                big_b[h * Dh:(h + 1) * Dh, h * r:(h + 1) * r] = b[h]
            q[int(il)] = (a.reshape(H * r, D).copy(), big_b)
        return cls(arch=arch, alpha=float(np.float32(alpha_h) * np.float32(n_head or 1)), q=q)

    def to_per_head(self, n_head: int):
        """The inverse of :meth:`from_per_head`: ``(a_heads, b_heads, alpha_h)`` with
        ``a_heads[il]`` (H, r, D) and ``b_heads[il]`` (H, Dh, r). Refuses a B that is not
        block-diagonal (an adapter that mixes heads has no per-head form)."""
        R = self.rank
        if n_head <= 0 or R % n_head:
            raise ValueError(f"to_per_head: rank {R} is not a multiple of n_head={n_head}")
        r = R // n_head
        a_heads, b_heads = {}, {}
        for il, (a, b) in self.q.items():
            n_out = b.shape[0]
            if n_out % n_head:
                raise ValueError(f"to_per_head: layer {il}: B has {n_out} rows, not a multiple of {n_head} heads")
            Dh = n_out // n_head
            blocks = np.stack([b[h * Dh:(h + 1) * Dh, h * r:(h + 1) * r] for h in range(n_head)])
            rebuilt = np.zeros_like(b)
            for h in range(n_head):
                rebuilt[h * Dh:(h + 1) * Dh, h * r:(h + 1) * r] = blocks[h]
            if not np.array_equal(rebuilt, b):
                raise ValueError(f"to_per_head: layer {il}: B is not block-diagonal over {n_head} heads of rank {r}")
            a_heads[il] = a.reshape(n_head, r, a.shape[1]).copy()
            b_heads[il] = blocks
        return a_heads, b_heads, float(np.float32(self.alpha) / np.float32(n_head))

    def save(self, path) -> None:
        """Write llama.cpp's LoRA GGUF (see the module docstring)."""
        import gguf

        w = gguf.GGUFWriter(str(path), self.arch)   # writes general.architecture
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(self.alpha))
        for il, (a, b) in sorted(self.q.items()):
            name = _Q_NAME.format(il)
            w.add_tensor(name + ".lora_a", a)   # numpy (R, n_in) = ggml ne [n_in, R]
            w.add_tensor(name + ".lora_b", b)   # numpy (n_out, R) = ggml ne [R, n_out]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


_TENSOR_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(lora_a|lora_b)$")


def load_adapter(path, model_config=None) -> LoraAdapter:
    """Read a LoRA GGUF: ours (:meth:`LoraAdapter.save`) or an attn_q adapter written by
    llama.cpp's ``convert_lora_to_gguf.py`` (``--outtype f32``). Checked as llama.cpp checks it
    (general.type, adapter.type, lora_a/lora_b pairs, A's ne[1] == B's ne[0]) and more: every
    tensor F32, every pair on ``blk.N.attn_q.weight`` (adapters of other matrices are refused,
    since applying only part of an adapter would silently change what it computes; ``*_norm.weight``
    tensors are skipped, as llama.cpp skips them). With ``model_config`` (the base model's
    ModelConfig) the arch, layer indices and shapes are checked against that model. Raises
    :class:`GGUFLoadError` naming the file and the key or tensor."""
    from ..gguf_meta import GGUFMeta

    path = str(path)
    with GGUFMeta(path) as m:
        gtype = m.get_str("general.type", "")
        if gtype != "adapter":
            raise GGUFLoadError(f"{path}: general.type is {gtype!r}, expected 'adapter' (is this a model, "
                                f"not a LoRA adapter?)")
        atype = m.get_str("adapter.type", "")
        if atype != "lora":
            raise GGUFLoadError(f"{path}: adapter.type is {atype!r}, expected 'lora'")
        arch = m.get_str("general.architecture", None)
        if not arch:
            raise GGUFLoadError(f"{path}: missing key 'general.architecture'")
        alpha = float(m.get_float("adapter.lora.alpha", 0.0))
        if "adapter.alora.invocation_tokens" in m:
            raise GGUFLoadError(f"{path}: key 'adapter.alora.invocation_tokens': activated LoRA (aLoRA) "
                                f"adapters are not supported")
        infos = m.tensors
    pairs: dict[int, dict[str, str]] = {}
    refused = []
    for name, info in infos.items():
        if name.endswith("_norm.weight"):
            warnings.warn(f"{path}: skipping tensor '{name}' (norm adapters are not applied, as llama.cpp "
                          f"skips them)", stacklevel=2)
            continue
        mt = _TENSOR_RE.match(name)
        if mt is None:
            if name.endswith((".lora_a", ".lora_b")):
                refused.append(name)
                continue
            raise GGUFLoadError(f"{path}: tensor '{name}' has an unexpected suffix (expected .lora_a / .lora_b)")
        il, target, part = int(mt.group(1)), mt.group(2), mt.group(3)
        if target != "attn_q.weight":
            refused.append(name)
            continue
        if info.type != GGML_TYPE_F32:
            raise GGUFLoadError(f"{path}: tensor '{name}' has type {_type_label(info.type)}, expected F32 "
                                f"(convert_lora_to_gguf.py: use --outtype f32)")
        if len(info.shape) != 2:
            raise GGUFLoadError(f"{path}: tensor '{name}' has shape {list(info.shape)}, expected 2 dims")
        pairs.setdefault(il, {})[part] = name
    if refused:
        raise GGUFLoadError(f"{path}: only attn_q adapters are supported; the file also adapts "
                            f"{', '.join(sorted(refused))}")
    for il, p in sorted(pairs.items()):
        for part in ("lora_a", "lora_b"):
            if part not in p:
                raise GGUFLoadError(f"{path}: tensor '{_Q_NAME.format(il)}.{part}' is missing "
                                    f"(LoRA pair for '{_Q_NAME.format(il)}' is missing one component)")
        sa, sb = infos[p["lora_a"]].shape, infos[p["lora_b"]].shape   # ggml ne: A [n_in, R], B [R, n_out]
        if sa[1] != sb[0]:
            raise GGUFLoadError(f"{path}: tensor '{p['lora_a']}' has ne {list(sa)} and '{p['lora_b']}' ne "
                                f"{list(sb)}: A's ne[1] (rank) must equal B's ne[0]")
    if not pairs:
        raise GGUFLoadError(f"{path}: no LoRA tensors (expected blk.N.attn_q.weight.lora_a / .lora_b)")
    ranks = {infos[p["lora_b"]].shape[0] for p in pairs.values()}
    if len(ranks) > 1:
        raise GGUFLoadError(f"{path}: layers have different ranks {sorted(ranks)}")
    if model_config is not None:
        _check_against(path, arch, pairs, infos, model_config)

    data = np.memmap(path, dtype=np.uint8, mode="r")
    q = {}
    for il, p in sorted(pairs.items()):
        ab = []
        for part in ("lora_a", "lora_b"):
            info = infos[p[part]]
            n0, n1 = info.shape
            raw = data[info.offset:info.offset + info.nbytes]
            if raw.size != n0 * n1 * 4:
                raise GGUFLoadError(f"{path}: tensor '{p[part]}' holds {raw.size} bytes, shape {list(info.shape)} "
                                    f"F32 needs {n0 * n1 * 4}")
            ab.append(np.frombuffer(raw.tobytes(), dtype="<f4").reshape(n1, n0))
        q[il] = (ab[0], ab[1])
    del data
    return LoraAdapter(arch=arch, alpha=alpha, q=q)


def _type_label(t: int) -> str:
    """ggml type id -> its name, for messages."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(t).name
    except (ImportError, ValueError):
        return f"ggml type {t}"


def _check_against(path: str, arch: str, pairs, infos, cfg) -> None:
    """The adapter fits ``cfg``'s model: same arch, layers that exist, A [d_model, R], B [R, H*Dh]."""
    if arch != cfg.arch:
        raise GGUFLoadError(f"{path}: key 'general.architecture' is '{arch}', the model's is '{cfg.arch}'")
    n_in, n_out = cfg.d_model, cfg.n_heads * cfg.head_dim
    for il, p in sorted(pairs.items()):
        if not 0 <= il < cfg.n_layers:
            raise GGUFLoadError(f"{path}: tensor '{p['lora_a']}': the model has {cfg.n_layers} layers")
        sa, sb = infos[p["lora_a"]].shape, infos[p["lora_b"]].shape
        if sa[0] != n_in:
            raise GGUFLoadError(f"{path}: tensor '{p['lora_a']}' has ne {list(sa)}, expected [{n_in}, R] "
                                f"(the model's d_model is {n_in})")
        if sb[1] != n_out:
            raise GGUFLoadError(f"{path}: tensor '{p['lora_b']}' has ne {list(sb)}, expected [R, {n_out}] "
                                f"(the model's attn_q has {n_out} rows)")


def check_adapter(adapter: LoraAdapter, cfg, source: str = "<LoraAdapter>") -> None:
    """An in-memory adapter fits ``cfg``'s model (as :func:`load_adapter` checks a file)."""
    if adapter.arch != cfg.arch:
        raise GGUFLoadError(f"{source}: adapter arch '{adapter.arch}', the model's is '{cfg.arch}'")
    n_in, n_out = cfg.d_model, cfg.n_heads * cfg.head_dim
    for il, (a, b) in adapter.q.items():
        name = _Q_NAME.format(il)
        if not 0 <= il < cfg.n_layers:
            raise GGUFLoadError(f"{source}: tensor '{name}.lora_a': the model has {cfg.n_layers} layers")
        if a.shape[1] != n_in:
            raise GGUFLoadError(f"{source}: tensor '{name}.lora_a' has shape {a.shape}, expected (R, {n_in})")
        if b.shape[0] != n_out:
            raise GGUFLoadError(f"{source}: tensor '{name}.lora_b' has shape {b.shape}, expected ({n_out}, R)")
