"""The generation loop: sample, evaluate, repeat; optionally with prompt-lookup speculation.

Prompt lookup (Saxena 2023; llama-cpp-python's ``LlamaPromptLookupDecoding``) drafts the next
tokens by finding the context's last n-gram earlier in the context and copying what followed it.
Unlike llama-cpp-python, generation drafts only from matches of at least two tokens
(``ngram_min=2``): a lone recurring token (",", " the") is mostly a coincidence, and on a CPU each
drafted position costs about half a decode step whether or not it is accepted (on the bench's
task: Gemma 3 accepts 90% of its drafts instead of 47%).
The drafts are verified in one batched graph with the token just sampled: row i of its logits is
the distribution after draft i, so every accepted draft saves one sequential decode step. A
rejected draft's KV rows are left behind the rewound position and overwritten by the next batch
(attention only reads positions below the one being computed).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .sampling import Sampler

SPECULATIVE = (None, "prompt_lookup", "draft_model")


def prompt_lookup_draft(history: list[int], draft_max: int, ngram_max: int = 2, ngram_min: int = 1) -> list[int]:
    """Up to ``draft_max`` tokens that followed the first earlier occurrence of the context's last
    n-gram, longest n-gram (``ngram_max`` down to ``ngram_min``) first; [] when none recurs. With
    ``ngram_min=1`` this is llama-cpp-python's ``find_candidate_pred_tokens``: the two draft the
    same tokens."""
    if draft_max <= 0:
        return []
    ids = np.asarray(history, dtype=np.int64)
    n = ids.size
    for size in range(min(ngram_max, n - 1), max(ngram_min, 1) - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids, size)
        for idx in np.nonzero((windows == ids[-size:]).all(axis=1))[0]:
            start = int(idx) + size
            if start < n:                 # the trailing n-gram itself has nothing after it
                return ids[start:min(start + draft_max, n)].tolist()
    return []


class ModelDrafter:
    """Drafts from a second, smaller model sharing the vocabulary (speculative="draft_model"): its
    greedy continuation of the context, one token per step of its own. Its KV cache follows the
    context: after a verify step it is rewound to the prefix it shares with the context and fed
    the accepted tokens. Greedy drafts are a deterministic proposal, so the acceptance rule of
    prompt lookup applies unchanged (and keeps the sampled distribution)."""

    def __init__(self, draft) -> None:
        self.model = draft
        self.cached: list[int] = []   # the tokens in the draft model's cache, in order

    def __call__(self, history: list[int], k: int) -> list[int]:
        m = self.model
        keep = 0
        for a, b in zip(self.cached, history):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(history) - 1)            # the last token is evaluated again for its logits
        k = min(k, m.cache.max_T - len(history))       # its cache holds the context and the drafts but the last
        if k <= 0:
            return []
        m.n_past = keep                                # a rewind: rows past it are overwritten
        logits = m.eval(history[keep:], all_logits=False)[-1]
        self.cached = list(history)
        out = [int(logits.argmax())]
        while len(out) < k:
            logits = m.eval(out[-1:], all_logits=False)[-1]
            self.cached.append(out[-1])
            out.append(int(logits.argmax()))
        return out


def check_speculative(model, speculative: str | None, draft_max: int, draft_model=None, ngram_max: int = 2,
                      ngram_min: int = 2) -> None:
    """ValueError for speculation settings that cannot run (before any token is generated)."""
    if speculative not in SPECULATIVE:
        raise ValueError(f"speculative must be one of {SPECULATIVE}, got {speculative!r}")
    if (speculative == "draft_model") != (draft_model is not None):
        raise ValueError('a draft_model goes with speculative="draft_model", and only with it')
    if type(draft_max) is not int or draft_max < 1:
        raise ValueError(f"draft_max must be a positive int, got {draft_max!r}")
    if not (type(ngram_min) is int and type(ngram_max) is int and 1 <= ngram_min <= ngram_max):
        raise ValueError(f"need ints 1 <= ngram_min <= ngram_max, got ngram_min={ngram_min!r}, "
                         f"ngram_max={ngram_max!r}")
    if draft_model is not None:
        if draft_model is model:
            raise ValueError("draft_model: the draft model must be another Model (its KV cache is its own)")
        draft_model._check_open("generate (draft_model)")
        if draft_model.config.vocab != model.config.vocab or not model.tokenizer.same_vocabulary(draft_model.tokenizer):
            raise ValueError(f"draft_model: {draft_model.path} does not share the vocabulary of {model.path}")


def token_stream(model, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler, eog: set[int],
                 stats: dict, speculative: str | None = None, draft_max: int = 10,
                 ngram_max: int = 2, ngram_min: int = 2, draft_model=None) -> Iterator[int]:
    """Token ids of the continuation of ``prompt_ids`` (evaluated from an empty context). ``stats``
    receives: stopped ("eog" | "max_new_tokens" | "context"), drafted, accepted, verify_steps."""
    check_speculative(model, speculative, draft_max, draft_model, ngram_max, ngram_min)
    stats.update(stopped="max_new_tokens", drafted=0, accepted=0, verify_steps=0)
    if max_new_tokens == 0:
        return
    history = list(prompt_ids)
    if speculative == "draft_model":
        drafter = ModelDrafter(draft_model)
    else:   # (looked up at each call: tests replace it)
        drafter = lambda h, k: prompt_lookup_draft(h, k, ngram_max, ngram_min)   # noqa: E731
    for tok in _decided(model, history, len(prompt_ids) + max_new_tokens, sampler, stats,
                        draft_max if speculative else 0, drafter):
        if tok in eog:
            stats["stopped"] = "eog"
            return
        yield tok
        history.append(tok)
        if len(history) - len(prompt_ids) >= max_new_tokens:
            return


def _decided(model, history: list[int], max_len: int, sampler: Sampler, stats: dict, draft_max: int,
             drafter) -> Iterator[int]:
    """Each next token as it is decided (the caller appends it to ``history`` before asking for the
    next): sampled from the last logits, or an accepted draft. The context never holds more than
    ``max_len`` tokens; past the cache's end it stops with ``stats["stopped"] = "context"``."""
    max_T = model.cache.max_T
    model.reset()
    tok = sampler.sample(model.eval(history, all_logits=False)[-1], history)   # not yet in the KV cache
    while True:
        yield tok
        if model.n_past >= max_T:
            stats["stopped"] = "context"
            return
        room = min(max_len - len(history), max_T - model.n_past - 1)   # drafts that can still be used
        draft = drafter(history, min(draft_max, room)) if draft_max and room > 0 else []
        base = model.n_past
        rows = model.eval([tok] + draft)             # row i: the distribution after tok, draft[:i]
        stats["verify_steps"] += 1
        stats["drafted"] += len(draft)
        accepted = 0
        for i, d in enumerate(draft):
            ok, tok = sampler.accept_draft(rows[i], history, d)
            if not ok:
                break
            accepted += 1
            stats["accepted"] += 1
            model.n_past = base + 1 + accepted       # drop the rejected drafts' positions
            yield d
        else:
            tok = sampler.sample(rows[len(draft)], history)
        model.n_past = base + 1 + accepted
