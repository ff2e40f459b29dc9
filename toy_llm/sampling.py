"""Next-token sampling with llama.cpp's default sampler chain semantics.

Order (common/sampling.cpp): repetition penalty -> top-k -> top-p -> min-p -> temperature
-> random draw.  ``temperature == 0`` is greedy decoding (argmax after the penalty), as in
llama.cpp where a non-positive temperature keeps only the most likely token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["SamplerConfig", "Sampler"]


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.0
    top_k: int = 40  # <= 0 disables
    top_p: float = 1.0  # >= 1 disables
    min_p: float = 0.0  # <= 0 disables
    repeat_penalty: float = 1.0  # 1 disables
    repeat_last_n: int = 64  # 0 disables, -1 = all previous tokens
    seed: int | None = None  # None: fresh OS entropy

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repeat_penalty > 0.0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}")


class Sampler:
    """Stateful only in its random generator: the same seed gives the same sequence."""

    def __init__(self, cfg: SamplerConfig | None = None) -> None:
        self.cfg = cfg or SamplerConfig()
        self._rng = np.random.default_rng(self.cfg.seed)

    def distribution(self, logits: np.ndarray, prev_tokens: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The chain's candidates and their probabilities (ids, probs; probs sum to 1): what
        :meth:`sample` draws from. Greedy (temperature 0) is the argmax with probability 1."""
        cfg = self.cfg
        logits = np.array(logits, dtype=np.float64).reshape(-1)  # copy: penalties edit it
        if logits.size == 0:
            raise ValueError("empty logits")
        _apply_repeat_penalty(logits, prev_tokens, cfg.repeat_penalty, cfg.repeat_last_n)
        if cfg.temperature <= 0.0:
            return np.array([int(np.argmax(logits))]), np.ones(1)  # first maximum, like llama.cpp's greedy sampler

        ids, kept = _sorted_candidates(logits)
        ids, kept = _top_k(ids, kept, cfg.top_k)
        ids, kept = _top_p(ids, kept, cfg.top_p)
        ids, kept = _min_p(ids, kept, cfg.min_p)
        return ids, _softmax(kept / cfg.temperature)

    def draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        """One token from (ids, probs) by inverse CDF; the clamp guards against cumsum rounding."""
        if len(ids) == 1:
            return int(ids[0])
        idx = int(np.searchsorted(np.cumsum(probs), self._rng.random() * probs.sum(), side="right"))
        return int(ids[min(idx, len(ids) - 1)])

    def sample(self, logits: np.ndarray, prev_tokens: Sequence[int] = ()) -> int:
        return self.draw(*self.distribution(logits, prev_tokens))

    def accept_draft(self, logits: np.ndarray, prev_tokens: Sequence[int], draft: int) -> tuple[bool, int]:
        """Speculative sampling's rule for a draft that proposes one token with certainty (prompt
        lookup): accept it with probability p(draft); otherwise draw from p with the draft removed,
        renormalised (max(0, p - q) for q a point mass). The emitted token is then distributed
        exactly as :meth:`sample`'s (Leviathan et al. 2023). Returns (accepted, token)."""
        ids, probs = self.distribution(logits, prev_tokens)
        hit = np.nonzero(ids == draft)[0]
        p_draft = float(probs[hit[0]]) if hit.size else 0.0
        if p_draft >= 1.0 or (p_draft > 0.0 and self._rng.random() < p_draft):
            return True, int(draft)
        if hit.size:
            probs = probs.copy()
            probs[hit[0]] = 0.0
        return False, self.draw(ids, probs)


def _apply_repeat_penalty(logits: np.ndarray, prev_tokens: Sequence[int],
                          penalty: float, last_n: int) -> None:
    """llama.cpp semantics: each distinct recent token once; dividing a negative logit
    would make it *more* likely, so negative (and zero) logits are multiplied instead."""
    if penalty == 1.0 or last_n == 0 or len(prev_tokens) == 0:
        return
    recent = prev_tokens if last_n < 0 else prev_tokens[-last_n:]
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.size)]
    vals = logits[ids]
    logits[ids] = np.where(vals <= 0, vals * penalty, vals / penalty)


def _sorted_candidates(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # stable: on equal logits the lower token id ranks first
    order = np.argsort(-logits, kind="stable")
    return order, logits[order]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[0] if x.size else x)  # candidates are sorted: x[0] is the max
    return e / e.sum()


def _top_k(ids: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k <= 0 or k >= len(ids):
        return ids, logits
    return ids[:k], logits[:k]


def _top_p(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Smallest prefix whose probability mass reaches p (at least one token)."""
    if p >= 1.0:
        return ids, logits
    cum = np.cumsum(_softmax(logits))
    keep = int(np.searchsorted(cum, p, side="left")) + 1
    keep = min(max(keep, 1), len(ids))
    return ids[:keep], logits[:keep]


def _min_p(ids: np.ndarray, logits: np.ndarray, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep tokens with p_i >= min_p * p_max, i.e. logit_i >= logit_max + log(min_p)."""
    if min_p <= 0.0:
        return ids, logits
    mask = logits >= logits[0] + np.log(min_p)
    mask[0] = True
    return ids[mask], logits[mask]
