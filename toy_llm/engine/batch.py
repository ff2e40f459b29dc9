"""How a batch of tokens from several sequences is cut into graphs (ubatches), as llama.cpp's
``llama_batch_allocr::split_equal(n_ubatch, sequential=true)`` cuts one for a cache with a stream
per sequence: a ubatch takes consecutive sequence ids (the first unused token's, then +1, +1, ...
in batch order) and the same number of tokens of each, stream-major. Cutting the same way gives
every token the same graph shape as in llama.cpp, which is what makes the logits equal."""
from __future__ import annotations


def split_equal(seqs: list[int], n_ubatch: int) -> list[list[int]]:
    """The ubatches of a batch whose token i belongs to sequence ``seqs[i]``: lists of batch
    indices, each ``ns`` runs of equal length, one per sequence s0, s0+1, ..., in that order."""
    by_seq: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_seq.setdefault(s, []).append(i)
    taken = {s: 0 for s in by_seq}      # tokens of each sequence already in a ubatch
    used = [False] * len(seqs)
    out = []
    while not all(used):
        chosen: list[int] = []
        for i, s in enumerate(seqs):    # the sequences of this ubatch
            if used[i] or s in chosen:
                continue
            if not chosen or s == chosen[-1] + 1:
                chosen.append(s)
                if len(chosen) > n_ubatch:
                    break
        per_seq: list[list[int]] = [[] for _ in chosen]
        while all(taken[s] < len(by_seq[s]) for s in chosen):
            for k, s in enumerate(chosen):
                i = by_seq[s][taken[s]]
                per_seq[k].append(i)
                used[i] = True
                taken[s] += 1
            if (len(per_seq[0]) + 1) * len(chosen) > n_ubatch:
                break
        out.append([i for run in per_seq for i in run])
    return out
