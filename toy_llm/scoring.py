"""Scoring text with a loaded model: per-token log-probabilities and llama-perplexity's perplexity.

    import toy_llm
    from toy_llm.scoring import score, perplexity

    m = toy_llm.load()
    lp = score(m, ["The capital of France is Paris."])[0]   # log p(t_i | t_<i), i >= 1
    r = perplexity(m, "wiki.test.raw", n_ctx=512, progress=True)
    print(f"PPL = {r.ppl:.4f} +/- {r.ppl_stderr:.5f}")       # llama-perplexity's "Final estimate"

Both functions take a :class:`toy_llm.model.Model` and only call its public API (``tokenize``,
``reset``, ``eval``); the log-softmax is computed in float64 from the engine's float32 logits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

__all__ = ["PerplexityResult", "perplexity", "score", "token_logprobs"]

# float64 scratch per block of rows in token_logprobs: 2**23 elements = 64 MiB (32 rows of Gemma 3's
# 262,144-token vocabulary), so scoring 512 positions never holds a [512, vocab] float64 copy.
_BLOCK_ELEMS = 1 << 23


def token_logprobs(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """float64 log-softmax(logits[i])[targets[i]] for each row i of ``logits`` [n, vocab].

    Numerically stable (max-shifted log-sum-exp, all in float64), computed in blocks of rows so the
    float64 scratch stays small for large vocabularies."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [n, vocab], got shape {logits.shape}")
    targets = np.asarray(targets, dtype=np.int64)
    n, vocab = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"{n} rows of logits but {targets.size} targets")
    if n and (targets.min() < 0 or targets.max() >= vocab):
        raise ValueError(f"target token ids must be in [0, {vocab})")
    out = np.empty(n, dtype=np.float64)
    step = max(1, _BLOCK_ELEMS // max(vocab, 1))
    for i in range(0, n, step):
        x = logits[i:i + step].astype(np.float64)
        mx = x.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))
        out[i:i + step] = x[np.arange(len(x)), targets[i:i + step]] - lse
    return out


def _ids(m, text, add_bos) -> list[int]:
    if isinstance(text, str):
        return m.tokenize(text, add_bos=add_bos)
    if isinstance(text, (bytes, bytearray)):
        raise TypeError("score: pass text as str (or a list of token ids), not bytes")
    return [int(t) for t in text]


def score(m, texts: Sequence[Union[str, Sequence[int]]], add_bos: bool | None = None) -> list[np.ndarray]:
    """Per-token log-probabilities of each text: ``out[k][i - 1] = log p(tok_i | tok_<i)`` for
    i = 1 .. n-1 of text k's n tokens (float64; a text of 0 or 1 tokens gives an empty array).

    ``texts``: a sequence of str (tokenized with ``m.tokenize(text, add_bos=add_bos)``; ``None``
    follows the GGUF's add_bos_token) or of token-id lists (used as given; ``add_bos`` does not
    apply). A single str is accepted as a one-element list. Each text is evaluated from an empty
    context, independently of the others; the model's context is empty afterwards. A model
    loaded with ``n_seq`` > 1 evaluates up to n_seq texts at once, each in its own sequence. A text longer
    than the context (``m.cache.max_T``) raises ValueError.
    """
    if isinstance(texts, str):
        texts = [texts]
    all_ids = [_ids(m, t, add_bos) for t in texts]
    for k, ids in enumerate(all_ids):
        if len(ids) > m.cache.max_T:
            raise ValueError(f"score: text {k} has {len(ids)} tokens, more than the context of "
                             f"{m.cache.max_T} (m.cache.max_T)")
    if m.seqs.n_seq > 1:
        return _score_batched(m, all_ids)
    out = []
    try:
        for ids in all_ids:
            if len(ids) < 2:
                out.append(np.empty(0, dtype=np.float64))
                continue
            m.reset()
            # every token, the last too: a ubatch's length changes its kernels' roundings, and
            # llama.cpp scoring a text evaluates all of it
            logits = m.eval(ids, all_logits=True)
            out.append(token_logprobs(logits[:-1], ids[1:]))
    finally:
        m.reset()
    return out


def _score_batched(m, all_ids: list[list[int]]) -> list[np.ndarray]:
    """A model loaded with n_seq > 1 scores up to n_seq texts per llama_batch, text j of a group in
    sequence j (m.seqs.decode; llama.cpp cuts such a batch into graphs of as many tokens of each
    consecutive sequence, so the logits are those of llama.cpp decoding the same batch)."""
    out: list = [np.empty(0, dtype=np.float64)] * len(all_ids)
    todo = [k for k, ids in enumerate(all_ids) if len(ids) >= 2]
    seqs = m.seqs
    try:
        for g in range(0, len(todo), seqs.n_seq):
            group = todo[g:g + seqs.n_seq]
            seqs.clear()
            for _ in group[1:]:
                seqs.add()
            rows = seqs.decode([(j, all_ids[k]) for j, k in enumerate(group)], all_logits=True)
            for k, logits in zip(group, rows):
                out[k] = token_logprobs(logits[:-1], all_ids[k][1:])
    finally:
        seqs.clear()
    return out


@dataclass(frozen=True)
class PerplexityResult:
    """llama-perplexity's figures.

    ppl            exp(nll): "Final estimate: PPL = ..."
    nll            mean negative log-likelihood (nats) over the scored tokens
    nll_stderr     its standard error, sqrt((<nll^2> - <nll>^2) / (count - 1)), as llama-perplexity
                   computes it (NaN where that variance is not positive, where it prints an error)
    ppl_stderr     nll_stderr * ppl: the "+/- ..." llama-perplexity prints after the PPL
    n_chunks       chunks evaluated (n_tokens // n_ctx)
    n_tokens_scored  count: n_chunks * (n_ctx - n_ctx // 2 - 1)
    chunk_ppl      each chunk's own perplexity, exp(mean nll of that chunk)
    running_ppl    the running estimate after each chunk, exp(nll so far / count so far): the
                   "[1]x,[2]y,..." line llama-perplexity prints
    n_ctx          the chunk length used
    n_tokens       tokens in the whole tokenized text (BOS included when the model adds it)
    """

    ppl: float
    nll: float
    nll_stderr: float
    ppl_stderr: float
    n_chunks: int
    n_tokens_scored: int
    chunk_ppl: tuple[float, ...]
    running_ppl: tuple[float, ...]
    n_ctx: int
    n_tokens: int


def _read_text(text_or_file) -> str:
    if isinstance(text_or_file, os.PathLike):
        path = Path(text_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"perplexity: no such file: {path}")
    elif isinstance(text_or_file, str):
        if "\n" in text_or_file or not os.path.isfile(text_or_file):
            return text_or_file
        path = Path(text_or_file)
    else:
        raise TypeError(f"perplexity: text_or_file must be a str or a path, got {type(text_or_file).__name__}")
    # As llama.cpp's `-f`: the file's bytes as they are (no newline translation), less one trailing '\n'.
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"perplexity: {path} is not valid UTF-8: {e}") from None
    return text[:-1] if text.endswith("\n") else text


def perplexity(m, text_or_file: Union[str, os.PathLike], n_ctx: int = 512, progress: bool = False) -> PerplexityResult:
    """Perplexity of a text by llama.cpp's ``llama-perplexity`` method (``perplexity()`` in
    tools/perplexity/perplexity.cpp, default settings, no ``--ppl-stride``).

    The whole text is tokenized once (with BOS when the model adds one); it must give at least
    2 * n_ctx tokens. It is cut into n_tokens // n_ctx chunks of n_ctx tokens (the rest is unused);
    each chunk is evaluated from an empty context, its first token replaced by BOS when the model
    adds BOS, and only its second half is scored: the logits of positions n_ctx//2 .. n_ctx-2
    predicting the token after each. ppl = exp(mean nll) over all scored tokens.

    ``text_or_file``: the text itself, or a file (a ``pathlib.Path``, or a str naming an existing
    file) read as UTF-8 like ``llama-perplexity -f`` (one trailing newline dropped).
    ``progress=True`` shows a tqdm bar over the chunks. The model's context is empty afterwards.
    """
    if type(n_ctx) is not int:
        raise TypeError(f"perplexity: n_ctx must be an int, got {n_ctx!r}")
    if n_ctx < 3:
        raise ValueError(f"perplexity: n_ctx must be >= 3 (n_ctx - n_ctx//2 - 1 tokens of each chunk are "
                         f"scored), got {n_ctx}")
    if n_ctx > m.cache.max_T:
        raise ValueError(f"perplexity: n_ctx={n_ctx} exceeds the model's context of {m.cache.max_T} tokens "
                         f"(m.cache.max_T); load it with max_T >= {n_ctx}")
    tok = m.tokenizer
    if getattr(tok, "add_eos", False):
        raise ValueError("perplexity: the vocabulary adds EOS to every text, which llama-perplexity does not "
                         "support (GGML_ASSERT(!llama_vocab_get_add_eos(vocab)))")
    text = _read_text(text_or_file)
    tokens = m.tokenize(text)            # add_bos=None: as the model adds it (common_tokenize(..., true))
    n_tokens = len(tokens)
    if n_tokens < 2 * n_ctx:
        raise ValueError(f"perplexity: you need at least {2 * n_ctx} tokens to evaluate perplexity with a "
                         f"context of {n_ctx}; the text tokenizes to only {n_tokens} tokens")

    add_bos = bool(tok.add_bos) and tok.bos_id is not None and tok.bos_id >= 0
    n_chunk = n_tokens // n_ctx
    first = n_ctx // 2
    nll_sum = 0.0
    nll2_sum = 0.0
    count = 0
    chunk_ppl: list[float] = []
    running_ppl: list[float] = []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_chunk, desc="perplexity", unit="chunk")
    try:
        for i in range(n_chunk):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            if add_bos:
                chunk[0] = tok.bos_id
            m.reset()
            # the whole chunk, as llama.cpp evaluates it (ubatches of n_batch positions; the last
            # position's logits are not scored, but leaving it out would change the ubatch's roundings)
            logits = m.eval(chunk, all_logits=True)
            lp = token_logprobs(logits[first:n_ctx - 1], chunk[first + 1:])
            del logits
            v = -lp
            nll_sum += float(v.sum())
            nll2_sum += float((v * v).sum())
            count += len(v)
            chunk_ppl.append(math.exp(float(v.mean())))
            running_ppl.append(math.exp(nll_sum / count))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ppl=f"{running_ppl[-1]:.4f}")
    finally:
        if bar is not None:
            bar.close()
        m.reset()

    # llama-perplexity's final estimate, step for step
    nll = nll_sum / count
    nll2 = nll2_sum / count
    ppl = math.exp(nll)
    var = nll2 - nll * nll
    nll_stderr = math.sqrt(var / (count - 1)) if var > 0 else float("nan")
    return PerplexityResult(ppl=ppl, nll=nll, nll_stderr=nll_stderr, ppl_stderr=nll_stderr * ppl,
                            n_chunks=n_chunk, n_tokens_scored=count, chunk_ppl=tuple(chunk_ppl),
                            running_ppl=tuple(running_ppl), n_ctx=n_ctx, n_tokens=n_tokens)
