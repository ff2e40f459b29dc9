"""Sequences: the sequence slots of a model's KV cache (llama.cpp's ``seq_id``), for several
contexts in one model: ``toy_llm.load(path, n_seq=8)`` then ``m.seqs``.

Each sequence has a stream of ``max_T`` cells of its own (llama.cpp's default non-unified
cache, one stream per sequence). Sequence 0 is the context ``Model.eval`` and ``generate`` use.

    s = m.seqs.add()                      # a free sequence, empty
    m.seqs.eval(s, ids)                   # its prompt (ubatches of n_batch, as Model.eval)
    t = m.seqs.fork(s)                    # a copy of its cache: the prefix is not evaluated again
    rows = m.seqs.decode([(s, [a]), (t, [b])])   # one batch, both sequences: [vocab] each
    m.seqs.drop(t)

``decode`` is llama.cpp's ``llama_decode`` of one ``llama_batch`` with one seq_id per token; it
is cut into graphs as llama.cpp cuts it (``engine.batch.split_equal``), so every logit equals
llama.cpp's for the same batch.
"""
from __future__ import annotations

import operator
import weakref

import numpy as np

from .engine.engine import check_token_ids


class Sequences:
    """The sequence slots of one model (see the module docstring)."""

    def __init__(self, model, n_seq: int):
        # a weak reference: the model holds this object, and a cycle would keep a closed model's
        # tokenizer and tables alive until the cycle collector runs (tests/test_leaks.py)
        self._model_ref = weakref.ref(model)
        self.n_seq = n_seq
        self.lengths = [0] * n_seq        # positions held by each sequence
        self._used = [True] + [False] * (n_seq - 1)

    @property
    def _model(self):
        m = self._model_ref()
        if m is None:
            raise RuntimeError("seqs: its model is gone")
        return m

    def _engine(self, what: str):
        self._model._check_open(what)
        return self._model.cache._engine(what)

    def _seq(self, seq, what: str, used: bool = True) -> int:
        seq = operator.index(seq)
        if not 0 <= seq < self.n_seq:
            raise ValueError(f"{what}: sequence {seq} outside 0..{self.n_seq - 1} (load with n_seq=...)")
        if used and not self._used[seq]:
            raise ValueError(f"{what}: sequence {seq} is not in use (seqs.add() or seqs.fork() first)")
        return seq

    def in_use(self) -> list[int]:
        return [s for s in range(self.n_seq) if self._used[s]]

    def add(self) -> int:
        """A free sequence, empty, now in use."""
        for s in range(self.n_seq):
            if not self._used[s]:
                self._used[s], self.lengths[s] = True, 0
                return s
        raise RuntimeError(f"seqs.add: all {self.n_seq} sequences are in use (drop one, or load with a larger n_seq)")

    def drop(self, seq: int) -> None:
        """Forget ``seq`` (llama_memory_seq_rm of all its positions); it is free for add(). Sequence 0
        stays in use, empty."""
        seq = self._seq(seq, "seqs.drop", used=False)
        self.lengths[seq] = 0
        self._used[seq] = seq == 0

    def clear(self) -> None:
        """Drop every sequence."""
        for s in range(self.n_seq):
            self.drop(s)

    def copy(self, src: int, dst: int) -> None:
        """Make ``dst`` a copy of ``src`` (its cache and length; llama_memory_seq_cp), in use."""
        with self._model.lock:
            src = self._seq(src, "seqs.copy")
            dst = self._seq(dst, "seqs.copy", used=False)
            self._engine("seqs.copy").copy_seq(src, dst, self.lengths[src])
            self._used[dst], self.lengths[dst] = True, self.lengths[src]

    def fork(self, src: int = 0) -> int:
        """A new sequence continuing from ``src``'s cache (add + copy)."""
        with self._model.lock:
            src = self._seq(src, "seqs.fork")
            dst = self.add()
            try:
                self.copy(src, dst)
            except BaseException:
                self.drop(dst)
                raise
            return dst

    def eval(self, seq: int, tokens, all_logits: bool = True) -> np.ndarray:
        """Append ``tokens`` to ``seq`` in ubatches of n_batch positions (as Model.eval): logits
        [n, vocab], or the last position's [1, vocab] with ``all_logits=False``."""
        with self._model.lock:
            seq = self._seq(seq, "seqs.eval")
            eng = self._engine("seqs.eval")
            tokens = check_token_ids(tokens, self._model.config.vocab, "seqs.eval")
            if not tokens:
                raise ValueError("seqs.eval: no tokens (an empty input)")
            self._room(seq, len(tokens), "seqs.eval")
            nb, parts = self._model.options.n_batch, []
            for i in range(0, len(tokens), nb):
                chunk = tokens[i:i + nb]
                parts.append(eng.step_batch(chunk, self.lengths[seq], all_logits=all_logits, seq=seq))
                self.lengths[seq] += len(chunk)
            return np.concatenate(parts) if all_logits else parts[-1]

    def _room(self, seq: int, n: int, what: str) -> None:
        if self.lengths[seq] + n > self._model.cache.max_T:
            raise ValueError(f"{what}: sequence {seq} is full: {self.lengths[seq]} + {n} tokens > "
                             f"max_T={self._model.cache.max_T}")

    def decode(self, batch, all_logits: bool = False) -> list[np.ndarray]:
        """One llama_batch: ``batch`` is [(seq, tokens), ...], each sequence once, its tokens
        appended at its next positions. Returns, per entry, the last token's logits [vocab]
        (``all_logits``: every token's [n, vocab])."""
        with self._model.lock:
            eng = self._engine("seqs.decode")
            entries, seen = [], set()
            for seq, tokens in batch:
                seq = self._seq(seq, "seqs.decode")
                if seq in seen:
                    raise ValueError(f"seqs.decode: sequence {seq} appears twice in one batch (join its tokens)")
                seen.add(seq)
                tokens = check_token_ids(tokens, self._model.config.vocab, "seqs.decode")
                if not tokens:
                    raise ValueError(f"seqs.decode: no tokens for sequence {seq}")
                self._room(seq, len(tokens), "seqs.decode")
                entries.append((seq, tokens))
            if not entries:
                raise ValueError("seqs.decode: an empty batch")
            ids, pos, seqs, want = [], [], [], []
            for seq, tokens in entries:
                n = len(tokens)
                ids += tokens
                pos += range(self.lengths[seq], self.lengths[seq] + n)
                seqs += [seq] * n
                want += [True] * n if all_logits else [False] * (n - 1) + [True]
            rows = eng.step_seqs(ids, pos, seqs, logits=want)
            out, at = [], 0
            for seq, tokens in entries:
                k = len(tokens) if all_logits else 1
                out.append(rows[at:at + k] if all_logits else rows[at])
                at += k
                self.lengths[seq] += len(tokens)
            return out
