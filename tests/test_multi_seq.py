"""Several sequences in one KV cache (m.seqs, generate([...]), batched score), against llama.cpp's
low-level llama_batch API with one seq_id per token and n_seq_max sequences: the same batches and
the same sequence copies on both sides, every logit compared."""
from __future__ import annotations

import os

import numpy as np
import pytest

import toy_llm
from toy_llm.engine.batch import split_equal
from toy_llm.testing import synthetic

from test_errors import MODEL

lc = pytest.importorskip("llama_cpp", reason="the llama-cpp-python oracle is installed by `make test`")

N_SEQ, SEQ_LEN = 4, 256
PROMPTS = ["The capital of France is", "Water boils at", "The largest planet of the solar system is",
           "Once upon a time"]


class BatchOracle:
    """llama.cpp with n_seq_max sequences (its default: one KV stream per sequence), F16 KV,
    n_batch = n_ubatch = 512, no flash attention: as toy_llm.load(..., n_seq=...)'s defaults."""

    def __init__(self, path, n_seq: int, seq_len: int, n_threads: int, kv_type: str = "f16"):
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        p = lc.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_seq * seq_len, 512, 512, n_seq
        p.n_threads = p.n_threads_batch = n_threads
        p.type_k = p.type_v = {"f16": 1, "q8_0": 8}[kv_type]
        p.flash_attn_type = int(kv_type == "q8_0")    # a quantized V needs flash attention, as ours
        self.ctx = lc.llama_init_from_model(self.model, p)
        self.mem = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.lengths = [0] * n_seq

    def decode(self, batch, last_only: bool = False) -> list[np.ndarray]:
        """One llama_batch of [(seq, tokens), ...]; per entry the logits [n, vocab] of its tokens
        (``last_only``: of its last token, [vocab])."""
        n = sum(len(t) for _, t in batch)
        b = lc.llama_batch_init(n, 0, 1)
        try:
            i, rows = 0, []
            for s, toks in batch:
                for j, t in enumerate(toks):
                    want = not last_only or j == len(toks) - 1
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, self.lengths[s] + j, 1, want
                    b.seq_id[i][0] = s
                    if want:
                        rows.append(i)
                    i += 1
                self.lengths[s] += len(toks)
            b.n_tokens = n
            assert lc.llama_decode(self.ctx, b) == 0
            got = {r: np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, r), shape=(self.n_vocab,)).copy()
                   for r in rows}
        finally:
            lc.llama_batch_free(b)
        out, i = [], 0
        for _, toks in batch:
            idx = range(i, i + len(toks))
            out.append(got[idx[-1]] if last_only else np.stack([got[r] for r in idx]))
            i += len(toks)
        return out

    def copy(self, src: int, dst: int):
        lc.llama_memory_seq_cp(self.mem, src, dst, -1, -1)
        self.lengths[dst] = self.lengths[src]

    def close(self):
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def _run_script(path, script, n_threads: int, n_seq: int = N_SEQ, kv_type: str = "f16"):
    """Run ``script`` on both: ("batch", [(seq, tokens)]) decodes one batch, every token's logits;
    ("copy", src, dst) forks; ("greedy", seqs, steps) decodes ``steps`` batches of one token of
    each of ``seqs``, feeding llama.cpp's argmax to both. Returns (ours, theirs) logits pairs."""
    ref = BatchOracle(path, n_seq, SEQ_LEN, n_threads, kv_type)
    m = toy_llm.load(path, max_T=SEQ_LEN, n_threads=n_threads, n_seq=n_seq, kv_type=kv_type)
    pairs, last = [], {}
    try:
        for op in script:
            if op[0] == "batch":
                for s, _ in op[1]:
                    while s not in m.seqs.in_use():
                        m.seqs.add()
                theirs = ref.decode(op[1])
                ours = m.seqs.decode(op[1], all_logits=True)
                pairs += list(zip(ours, theirs))
                last.update({s: int(t[-1].argmax()) for (s, _), t in zip(op[1], theirs)})
            elif op[0] == "copy":
                ref.copy(op[1], op[2])
                m.seqs.copy(op[1], op[2])
            else:
                _, seqs, steps = op
                for _ in range(steps):
                    batch = [(s, [last[s]]) for s in seqs]
                    theirs = ref.decode(batch)
                    ours = m.seqs.decode(batch, all_logits=True)
                    pairs += list(zip(ours, theirs))
                    last.update({s: int(t[-1].argmax()) for s, t in zip(seqs, theirs)})
    finally:
        ref.close()
        m.close()
    return pairs


def _report(what, pairs):
    d = max(float(np.abs(o - t).max()) for o, t in pairs)
    agree = np.mean(np.concatenate([o.argmax(-1) == t.argmax(-1) for o, t in pairs]))
    n = sum(len(o) for o, _ in pairs)
    print(f"\n{what}: max |dlogit| = {d:.3g}, argmax {100 * agree:.1f}% over {n} tokens")
    return d, agree


def _scripts(ids):
    """The batch layouts compared: each prompt alone, then decode steps of all; every prompt in
    one batch (unequal lengths: cut into several graphs), then decode steps with sequence 1
    finished and the rest out of order (a graph each: a graph's sequences are consecutive ids),
    then all four again; a shared prefix evaluated in sequence 0 and copied into the others."""
    n = len(ids)
    alone = [("batch", [(s, x)]) for s, x in enumerate(ids)] + [("greedy", list(range(n)), 5)]
    together = [("batch", [(s, x) for s, x in enumerate(ids)]), ("greedy", [3, 0, 2], 3),
                ("greedy", [0, 1, 2, 3], 2)]
    prefix = ids[0][:3]
    fork = [("batch", [(0, prefix)])] + [("copy", 0, s) for s in range(1, n)] + \
        [("batch", [(s, x[3:] or x[-1:]) for s, x in enumerate(ids)]), ("greedy", list(range(n)), 3)]
    return {"alone": alone, "together": together, "fork": fork}


@pytest.fixture(scope="module")
def smol_ids():
    with toy_llm.load(MODEL, max_T=64, n_threads=1) as m:
        return [m.tokenize(p) for p in PROMPTS]


@pytest.mark.parametrize("layout", ["alone", "together", "fork"])
def test_smollm2_sequences_match_llama_batch(smol_ids, layout):
    pairs = _run_script(MODEL, _scripts(smol_ids)[layout], os.cpu_count())
    d, agree = _report(f"SmolLM2 Q4_1, 4 sequences ({layout}) vs llama_batch", pairs)
    assert agree == 1.0 and d == 0.0


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("mseq")
    return {arch: synthetic.write_model(d / f"{arch}.gguf", arch) for arch in ("llama", "gemma3", "qwen3")}


SYNTH_IDS = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 200, 300], [5, 6, 7, 2], [5, 6, 7] + [42] * 7]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("layout", ["alone", "together", "fork"])
def test_synthetic_sequences_match_llama_batch(synth, arch, layout):
    pairs = _run_script(synth[arch], _scripts(SYNTH_IDS)[layout], 2)
    d, agree = _report(f"synthetic {arch}, 4 sequences ({layout}) vs llama_batch", pairs)
    assert agree == 1.0 and d == 0.0


@pytest.mark.parametrize("layout", ["together", "fork"])
def test_q8_0_cache_sequences_match_llama_batch(synth, layout):
    """A Q8_0 cache (flash attention, Hadamard-rotated K/V) with several streams."""
    pairs = _run_script(synth["llama"], _scripts(SYNTH_IDS)[layout], 2, kv_type="q8_0")
    d, agree = _report(f"synthetic llama, Q8_0 KV + flash attention, 4 sequences ({layout}) vs llama_batch", pairs)
    assert agree == 1.0 and d == 0.0


@pytest.mark.parametrize("stop", [None, "."])
def test_generate_many_matches_llama_batch(stop):
    """generate([...]) end to end, greedy: the shared prefix once in sequence 0 and copied, the rest
    of the prompts in one batch, then one batch per step, finished sequences' slots refilled by
    moving the last one down (with stop=".", sequences finish at different steps); llama.cpp
    doing the same gives the same texts."""
    prompts = ["The capital of France is", "The capital of Italy is", "The capital of Spain is", "The capital of"]
    n_new = 12
    with toy_llm.load(MODEL, max_T=SEQ_LEN, n_threads=os.cpu_count(), n_seq=N_SEQ) as m:
        ours = m.generate(prompts, max_new_tokens=n_new, stop=[stop] if stop else None)
        stats = dict(m.last_stats)
        ids = [m.tokenize(p) for p in prompts]
        eog = set(m.tokenizer.eog_ids)
        detok = m.detokenize
    shared = stats["shared_prefix"]
    assert shared == len(ids[3]) and shared >= 3
    ref = BatchOracle(MODEL, N_SEQ, SEQ_LEN, os.cpu_count())
    moves = 0
    try:
        last = ref.decode([(0, ids[0][:shared])], last_only=True)[0]
        for s in range(1, N_SEQ):
            ref.copy(0, s)
        logits = {k: last for k in range(N_SEQ)}
        rest = [(k, x[shared:]) for k, x in enumerate(ids) if len(x) > shared]
        logits.update({k: r for (k, _), r in zip(rest, ref.decode(rest, last_only=True))})
        out, active, slot = [[] for _ in ids], list(range(N_SEQ)), list(range(N_SEQ))
        while active:
            going = []
            for k in active:
                tok = int(logits[k].argmax())
                if tok in eog:
                    continue
                out[k].append(tok)
                if len(out[k]) < n_new and not (stop and stop in detok(out[k])):
                    going.append(k)
            if not going:
                break
            free = sorted(slot[k] for k in active if slot[k] < len(going) and k not in going)
            for k, dst in zip([k for k in going if slot[k] >= len(going)], free):
                ref.copy(slot[k], dst)
                lc.llama_memory_seq_rm(ref.mem, slot[k], -1, -1)
                slot[k] = dst
                moves += 1
            going.sort(key=slot.__getitem__)
            rows = ref.decode([(slot[k], [out[k][-1]]) for k in going], last_only=True)
            logits.update(dict(zip(going, rows)))
            active = going
    finally:
        ref.close()
    theirs = [detok(o) for o in out]
    if stop:
        theirs = [t[:t.index(stop)] if stop in t else t for t in theirs]
        assert moves > 0
    print(f"\ngenerate([4 prompts], stop={stop!r}) vs llama_batch: {sum(a == b for a, b in zip(ours, theirs))}/4 "
          f"texts equal, shared prefix {shared} tokens, {stats['decode_steps']} decode steps, {moves} slot moves; "
          f"{ours}")
    assert ours == theirs


def test_batched_score_matches_llama_batch(smol_ids):
    """score() with n_seq > 1: the texts in one batch, a sequence each; llama.cpp decoding that
    batch gives the same log-probabilities."""
    with toy_llm.load(MODEL, max_T=SEQ_LEN, n_threads=os.cpu_count(), n_seq=N_SEQ) as m:
        got = m.score(smol_ids)
    ref = BatchOracle(MODEL, N_SEQ, SEQ_LEN, os.cpu_count())
    try:
        rows = ref.decode(list(enumerate(smol_ids)))
    finally:
        ref.close()
    worst = 0.0
    for ids, lp, logits in zip(smol_ids, got, rows):
        x = logits[:-1].astype(np.float64)
        want = x[np.arange(len(ids) - 1), ids[1:]] - (np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1))
        worst = max(worst, float(np.abs(lp - want).max()))
    print(f"\nbatched score, 4 texts in one batch vs llama_batch: max |dlogprob| = {worst:.3g}")
    assert worst < 1e-9


def test_generate_many_is_each_prompt_alone(synth):
    """F32 weights and no shared prefix: a batch of sequences gives each the text it gets alone."""
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300], [1, 2], [42] * 7]
    with toy_llm.load(synth["llama"], max_T=64, n_threads=1, n_seq=4) as m:
        many = m.generate(prompts, max_new_tokens=12)
        assert m.last_stats["sequences"] == 4 and m.last_stats["decode_steps"] <= 11
        assert m.last_stats["shared_prefix"] == 0
        alone = [m.generate(p, max_new_tokens=12) for p in prompts]
    assert many == alone


def test_split_equal_cuts_as_llama_cpp():
    """llama_batch_allocr::split_equal(sequential): consecutive sequence ids from the first unused
    token's, as many tokens of each as the shortest has (and n_ubatch allows), stream-major."""
    assert split_equal([0, 1, 2, 3], 512) == [[0, 1, 2, 3]]
    assert split_equal([3, 0, 2], 512) == [[0], [1], [2]]          # 3, then 0, then 2: none consecutive
    assert split_equal([2, 3, 0, 1], 512) == [[0, 1], [2, 3]]
    assert split_equal([0, 0, 0, 1, 2, 2], 512) == [[0, 3, 4], [1, 2], [5]]
    assert split_equal([0] * 5 + [1] * 5, 4) == [[0, 1, 5, 6], [2, 3, 7, 8], [4, 9]]


def test_sequences_are_checked(synth):
    with toy_llm.load(synth["llama"], max_T=32, n_threads=1, n_seq=2) as m:
        e = m.cache.engine
        with pytest.raises(ValueError, match="outside the cache's 2 sequences"):
            e.step_batch([1, 2], 0, seq=2)
        with pytest.raises(ValueError, match="not consecutive"):
            e.step_seqs([1, 2], [3, 3], [1, 1])
        with pytest.raises(ValueError, match="3 prompts for 2 sequence slots"):
            m.generate([[1], [2], [3]])
        with pytest.raises(ValueError, match="sequence 1 is not in use"):
            m.seqs.decode([(1, [3])])
        s = m.seqs.add()
        assert s == 1
        with pytest.raises(RuntimeError, match="all 2 sequences are in use"):
            m.seqs.add()
        with pytest.raises(ValueError, match="appears twice"):
            m.seqs.decode([(1, [3]), (1, [4])])
        m.seqs.eval(1, list(range(30)))
        with pytest.raises(ValueError, match="sequence 1 is full"):
            m.seqs.decode([(1, [3, 4, 5])])
        m.seqs.drop(1)
        assert m.seqs.fork(0) == 1 and m.seqs.lengths[1] == m.n_past
    with pytest.raises(ValueError, match="n_seq"):
        toy_llm.load(synth["llama"], n_seq=2, graph="per_head")


def test_cli_generates_several_prompts_together(synth, capsys):
    from toy_llm.cli import main as cli_main

    prompts = ["The river", "A small"]
    assert cli_main(["generate", *prompts, "-n", "6", "-m", str(synth["llama"]), "--max-t", "64", "-t", "1"]) == 0
    printed = capsys.readouterr()
    with toy_llm.load(synth["llama"], max_T=64, n_threads=1, n_seq=2) as m:
        texts = m.generate(prompts, max_new_tokens=6)
    assert printed.out.splitlines()[0] == f"[0] {prompts[0]}{texts[0]}".splitlines()[0]
    assert f"[1] {prompts[1]}" in printed.out and "2 sequences" in printed.err
