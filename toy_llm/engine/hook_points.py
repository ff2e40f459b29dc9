"""The names of the tensors a forward pass exposes: one table, the same in both graphs.

Names follow TransformerLens (``blocks.{L}.hook_resid_pre``, ``blocks.{L}.attn.hook_q``, ...);
the parity tool maps them to llama.cpp's ``cb`` names. Every builder names its tensors through
one tap, ``tap(t, name, layer=None, head=None)``; the per-head graph taps each head's piece with
its index and the trace joins them, so a name has the same shape whichever graph ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import tinynn as tnn
from ..gguf_load import ModelConfig


@dataclass(frozen=True)
class HookPoint:
    name: str                                        # per-layer names are "blocks.{L}." + name
    shape: str                                       # as read back, numpy order
    meaning: str
    per_token: Callable[[ModelConfig], tuple]        # the shape after the leading [tokens]
    per_layer: bool = True


def _d(c):
    return (c.d_model,)


HOOK_POINTS: tuple[HookPoint, ...] = (
    HookPoint("hook_embed", "[tokens, d_model]", "token embedding (times the embedding scale)", _d, False),
    HookPoint("hook_resid_pre", "[tokens, d_model]", "residual stream entering the layer", _d),
    HookPoint("ln1.hook_normalized", "[tokens, d_model]", "attention-norm output (the attention's input)", _d),
    HookPoint("attn.hook_q", "[tokens, n_heads, d_head]", "queries after QK-norm and rope",
              lambda c: (c.n_heads, c.head_dim)),
    HookPoint("attn.hook_k", "[tokens, n_kv_heads, d_head]", "keys after QK-norm and rope (as cached)",
              lambda c: (c.n_kv, c.head_dim)),
    HookPoint("attn.hook_v", "[tokens, n_kv_heads, d_head]", "values (as cached)", lambda c: (c.n_kv, c.head_dim)),
    HookPoint("attn.hook_z", "[tokens, n_heads, d_head]", "each head's attention output, before the output "
              "projection (llama.cpp's kqv_out)", lambda c: (c.n_heads, c.head_dim)),
    HookPoint("hook_attn_out", "[tokens, d_model]", "attention output projection (before Gemma's post-norm)", _d),
    HookPoint("ln1_post.hook_normalized", "[tokens, d_model]", "post-attention norm (Gemma)", _d),
    HookPoint("hook_resid_mid", "[tokens, d_model]", "residual stream after attention (llama.cpp's ffn_inp)", _d),
    HookPoint("ln2.hook_normalized", "[tokens, d_model]", "FFN-norm output (the FFN's input)", _d),
    HookPoint("mlp.hook_pre", "[tokens, d_ff]", "gate projection, before the activation", lambda c: (c.d_ff,)),
    HookPoint("mlp.hook_pre_linear", "[tokens, d_ff]", "up projection", lambda c: (c.d_ff,)),
    HookPoint("mlp.hook_post", "[tokens, d_ff]", "act(gate) * up, the down projection's input",
              lambda c: (c.d_ff,)),
    HookPoint("mlp.hook_router_logits", "[tokens, n_experts]", "MoE router logits", lambda c: (c.n_experts,)),
    HookPoint("mlp.hook_expert_out", "[tokens, n_experts_used, d_model]", "MoE: each chosen expert's output, "
              "before weighting, in routing order", lambda c: (c.n_experts_used, c.d_model)),
    HookPoint("hook_mlp_out", "[tokens, d_model]", "FFN (or MoE) output (before Gemma's post-norm)", _d),
    HookPoint("ln2_post.hook_normalized", "[tokens, d_model]", "post-FFN norm (Gemma)", _d),
    HookPoint("hook_resid_post", "[tokens, d_model]", "residual stream leaving the layer (llama.cpp's l_out)", _d),
    HookPoint("ln_final.hook_normalized", "[tokens, d_model]", "final norm output", _d, False),
    HookPoint("hook_logits", "[tokens, vocab]", "logits (after Granite's scale and Gemma 2's soft-cap)",
              lambda c: (c.vocab,), False),
)
_BY_NAME = {h.name: h for h in HOOK_POINTS}


def hook_name(name: str, layer: int | None = None) -> str:
    """The full name of a hook point: "blocks.3.attn.hook_q", "hook_logits"."""
    return name if layer is None else f"blocks.{layer}.{name}"


def hook_point(full_name: str) -> HookPoint:
    """The table row of a full name; KeyError names the unknown hook."""
    parts = full_name.split(".", 2)
    base = parts[2] if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() else full_name
    if base not in _BY_NAME:
        raise KeyError(f"unknown hook point '{full_name}' (see toy_llm.engine.hook_points.HOOK_POINTS)")
    return _BY_NAME[base]


class Trace:
    """The tap every builder names its tensors through. Off: returns the tensor untouched (no cost).
    On: keeps each tapped tensor alive (set_output) so :meth:`collect` can read it after compute."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.enabled = False
        self.taps: list[tuple[str, int | None, object]] = []
        self.last: dict[str, np.ndarray] = {}

    def __call__(self, t, name: str, layer: int | None = None, head: int | None = None):
        if self.enabled:
            full = hook_name(name, layer)
            tnn.tnn_set_name(t, full if head is None else f"{full}.{head}")
            tnn.tnn_set_output(t)
            self.taps.append((full, head, t))
        return t

    def clear(self) -> None:
        self.taps = []

    def collect(self, sess) -> None:
        """After a compute: every tapped name as float32 [tokens, ...] (per-head pieces joined)."""
        pieces: dict[str, list] = {}
        for full, head, t in self.taps:
            pieces.setdefault(full, []).append((head, tnn.download(sess, t)))
        out = {}
        for full, ps in pieces.items():
            per_token = hook_point(full).per_token(self.cfg)
            if ps[0][0] is None:
                arr = ps[-1][1]
            else:   # one piece per head, in head order: [tokens, heads, ...]
                arr = np.stack([a.reshape(-1, int(np.prod(per_token[1:]))) for _, a in sorted(ps, key=lambda p: p[0])],
                               axis=1)
            out[full] = arr.reshape((-1,) + tuple(per_token))
        self.last = out
