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
    HookPoint("attn.hook_pattern", "[tokens, n_heads, kv_len]", "attention probabilities over the attended "
              "cache positions (plain attention only; kv_len is padded to 256 behind the mask, masked "
              "positions are 0); read-only", lambda c: (c.n_heads, -1)),
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
    HookPoint("hook_lens_logits", "[tokens, vocab]", "logit lens: the layer's output (resid_post) through the final "
              "norm and the output matrix; computed only when asked for; read-only", lambda c: (c.vocab,)),
    HookPoint("ln_final.hook_normalized", "[tokens, d_model]", "final norm output", _d, False),
    HookPoint("hook_logits", "[tokens, vocab]", "logits (after Granite's scale and Gemma 2's soft-cap)",
              lambda c: (c.vocab,), False),
)
_BY_NAME = {h.name: h for h in HOOK_POINTS}
READ_ONLY = ("attn.hook_pattern", "hook_lens_logits")
ON_DEMAND = ("hook_lens_logits",)   # extra work beside the graph: only when a name or filter asks for it


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
    """The tap every builder names its tensors through: ``tap(t, name, layer=None, head=None)`` and,
    for the per-head graph's pieces, ``tap.heads(pieces, name, layer)``.

    * Hooks (``hooks``: (matcher, Intervention) pairs, a matcher being a full name or a callable
      name -> bool) are applied as the graph is built; the tap returns the replacement.
    * Tracing (``enabled``, names chosen by ``wanted``) keeps each tapped tensor alive (set_output)
      so :meth:`collect` can read it after compute, after the hooks.
    With neither, the tap returns the tensor untouched: no node, no cost."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.enabled = False
        self.wanted: Callable[[str], bool] | None = None     # None: every name
        self.hooks: tuple = ()
        self.taps: list[tuple[str, int | None, object]] = []
        self.last: dict[str, np.ndarray] = {}
        self.history: list[dict[str, np.ndarray]] | None = None   # run_with_cache: every graph's trace
        self.sess = None
        self.inputs = None

    def begin(self, sess, inputs) -> None:
        """A new graph is being built over ``inputs`` (interventions declare their inputs there)."""
        self.sess, self.inputs, self.taps = sess, inputs, []

    def clear(self) -> None:
        self.taps = []

    def reads(self, name: str, layer: int | None = None) -> bool:
        """Will this graph keep ``name`` (tracing, and wanted)? For taps that cost a node to read."""
        full = hook_name(name, layer)
        if full.endswith(ON_DEMAND):   # computed only when named: not part of "every hook point"
            return self.enabled and self.wanted is not None and self.wanted(full)
        return self.enabled and (self.wanted is None or self.wanted(full))

    def _matching(self, full: str) -> list:
        """The interventions for ``full``; a filter (callable) skips read-only hook points, a name
        that names one is refused in _apply."""
        read_only = full.endswith(READ_ONLY)
        return [iv for match, iv in self.hooks
                if (not read_only and match(full) if callable(match) else match == full)]

    def _apply(self, t, full: str, ivs: list):
        if full.endswith(READ_ONLY):
            raise ValueError(f"{full} is read-only (it is computed beside the graph for reading: hook the "
                             f"tensors it is computed from instead)")
        per_token = hook_point(full).per_token(self.cfg)
        for iv in ivs:
            t = iv.build(self, self.inputs, t, full, per_token)
        return t

    def _keep(self, t, full: str, head: int | None) -> None:
        if self.enabled and (self.wanted is None or self.wanted(full)):
            tnn.tnn_set_name(t, full if head is None else f"{full}.{head}")
            tnn.tnn_set_output(t)
            self.taps.append((full, head, t))

    def __call__(self, t, name: str, layer: int | None = None, head: int | None = None):
        full = hook_name(name, layer)
        ivs = self._matching(full) if self.hooks else []
        if ivs:
            t = self._apply(t, full, ivs)
        self._keep(t, full, head)
        return t

    def heads(self, pieces: list, name: str, layer: int):
        """The per-head graph's pieces of one hook point ([d_head, 1] per head): traced piece by
        piece; hooked as one [heads * d_head, 1] tensor (joined, changed, viewed apart again), so a
        hook sees the same [tokens, heads, d_head] activation in both graphs."""
        full = hook_name(name, layer)
        ivs = self._matching(full) if self.hooks else []
        if not ivs:
            for h, p in enumerate(pieces):
                self._keep(p, full, h)
            return pieces
        sess, d_head = self.sess, self.cfg.head_dim
        joined = pieces[0]
        for p in pieces[1:]:
            joined = tnn.tnn_concat(sess, joined, p, 0)
        joined = self._apply(joined, full, ivs)
        self._keep(joined, full, None)
        row = d_head * 4
        return [tnn.tnn_view_2d(sess, joined, d_head, 1, row, h * row) for h in range(len(pieces))]

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
                arr = np.stack([a.reshape(-1, int(np.prod(per_token[1:]) if per_token[1:] != (-1,) else a.size))
                                for _, a in sorted(ps, key=lambda p: p[0])], axis=1)
            out[full] = arr.reshape((-1,) + tuple(arr.shape[-1] if d == -1 else d for d in per_token))
        self.last = out
        if self.history is not None:
            self.history.append(out)
