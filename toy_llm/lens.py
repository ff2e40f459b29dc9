"""Pictures of what a model does, as numpy results: the logit lens and attention patterns.
Plots of them (PNG) are in toy_llm.plots (the optional ``plot`` extra, matplotlib)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogitLens:
    """Each layer's output read through the final norm and the output matrix (nostalgebraist's
    logit lens), computed in the graph with the model's own kernels: ``top_ids`` / ``top_probs``
    [layers, tokens, k]; the last layer's row is the model's own prediction."""

    tokens: list[int]
    pieces: list[str]            # each input token as text
    top_ids: np.ndarray          # int [n_layers, n_tokens, k]
    top_probs: np.ndarray        # float64, softmax of the lens logits
    top_pieces: list[list[list[str]]]

    @property
    def n_layers(self) -> int:
        return self.top_ids.shape[0]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def logit_lens(m, text_or_tokens, top_k: int = 5) -> LogitLens:
    """The logit lens of ``text_or_tokens`` on model ``m`` (from an empty context)."""
    tokens = m.tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else [int(t) for t in text_or_tokens]
    L = m.config.n_layers
    _, cache = m.run_with_cache(tokens, names=[f"blocks.{il}.hook_lens_logits" for il in range(L)])
    ids, probs = [], []
    for il in range(L):
        p = _softmax(cache[f"blocks.{il}.hook_lens_logits"])
        top = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
        ids.append(top)
        probs.append(np.take_along_axis(p, top, -1))
    ids = np.stack(ids)
    pieces = [m.detokenize([t]) for t in tokens]
    top_pieces = [[[m.detokenize([int(t)]) for t in row] for row in layer] for layer in ids]
    return LogitLens(tokens, pieces, ids, np.stack(probs), top_pieces)


def attention_patterns(m, text_or_tokens, layer: int) -> tuple[list[str], np.ndarray]:
    """(token pieces, [n_heads, tokens, tokens]) attention probabilities of ``layer`` (plain
    attention: a model loaded with flash attention has none to show)."""
    tokens = m.tokenize(text_or_tokens) if isinstance(text_or_tokens, str) else [int(t) for t in text_or_tokens]
    if not 0 <= layer < m.config.n_layers:
        raise ValueError(f"layer {layer} outside 0..{m.config.n_layers - 1}")
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = m.run_with_cache(tokens, names=[name])
    n = len(tokens)
    return [m.detokenize([t]) for t in tokens], cache[name][:, :, :n].transpose(1, 0, 2)
