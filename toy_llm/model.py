"""The public API: ``toy_llm.load(...)`` -> :class:`Model` (eval, generate, tokenize).

Scripts, the CLI and our parity checks call exactly this. By default ``Model.eval`` runs the
fused graph, prompts in ubatches of ``n_batch`` = 512 positions as llama.cpp's defaults;
``graph="per_head"`` runs the seed's per-head graph one position at a time.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from . import tinynn as tnn
from .engine.engine import check_token_ids
from .engine.kv_cache import SmolLM2KVFFICache
from .engine.options import LLAMA_N_BATCH, EngineOptions
from .generate import check_speculative, token_stream
from .gguf_load import ModelConfig, load_config
from .sampling import Sampler, SamplerConfig
from .sequences import Sequences
from .tokenizer import Tokenizer


class Model:
    """A loaded model: its config, tokenizer, and the engine cache holding weights + KV."""

    def __init__(self, path: Path, config: ModelConfig, cache: SmolLM2KVFFICache, tokenizer: Tokenizer):
        self.path = path
        self.config = config
        self.cache = cache
        self.tokenizer = tokenizer
        self.seqs = Sequences(self, cache.options.n_seq)   # the KV cache's sequence slots; 0 is eval's
        self.last_stats: dict[str, float] = {}
        self._user_hooks: tuple = ()      # (matcher, Intervention) pairs of the open hooks() blocks
        self._control_hooks: tuple = ()   # the control vector's, as AddVector per layer
        # one thread at a time: a call from a second thread waits for the running one (eval, a whole
        # non-streamed generate, score, ...), so the context never sees two interleaved writers
        self.lock = threading.RLock()
        self.lora = None                  # the LoRA-Q adapter applied (set_lora), and its lora_scale
        self.lora_scale: float | None = None
        self._closed = False

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: the model is closed ({self.path.name}); load it again")

    @property
    def options(self) -> EngineOptions:
        return self.cache.options

    @property
    def n_past(self) -> int:
        """Positions in the context (sequence 0)."""
        return self.seqs.lengths[0]

    @n_past.setter
    def n_past(self, n: int) -> None:
        self.seqs.lengths[0] = n

    # ---------------------------------------------------------------- text

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos=None`` follows the GGUF's add_bos_token; ``special`` parses
        control tokens such as ``<|im_start|>`` (as llama.cpp's parse_special)."""
        add = self.tokenizer.add_bos if add_bos is None else add_bos
        ids = self.tokenizer.encode(text, add_special=False, parse_special=special)
        if add and self.tokenizer.bos_id is not None and self.tokenizer.bos_id >= 0:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from .chat import render_chat

        tpl = self.tokenizer.chat_template
        if not tpl:
            raise ValueError(f"{self.path}: the GGUF has no tokenizer.chat_template")
        tok = self.tokenizer
        return render_chat(tpl, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.token_to_piece(tok.bos_id).decode("utf-8", "replace") if tok.bos_id is not None and tok.bos_id >= 0 else "",
                           eos_token=tok.token_to_piece(tok.eos_id).decode("utf-8", "replace") if tok.eos_id is not None and tok.eos_id >= 0 else "")

    # ---------------------------------------------------------------- compute

    def reset(self) -> None:
        """Forget the context: the next eval starts at position 0."""
        self.n_past = 0

    def eval(self, tokens, all_logits: bool = True) -> np.ndarray:
        """Logits float32 [len(tokens), vocab] of each new position; the cache advances.

        The fused graph evaluates several tokens in ubatches of ``n_batch`` positions, as llama.cpp
        does; ``all_logits=False`` returns only the last position's [1, vocab], and the batches then
        skip the rest of the last layer and the output matrix for the other positions, as llama.cpp
        does for a prompt (generate uses this)."""
        with self.lock:
            self._check_open("eval")
            return self._eval(check_token_ids(tokens, self.config.vocab, "eval"), all_logits)

    def _eval(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        if not tokens:
            raise ValueError("eval: no tokens (an empty input)")
        if self.n_past + len(tokens) > self.cache.max_T:
            raise ValueError(f"eval: context full: n_past={self.n_past} + {len(tokens)} tokens > "
                             f"max_T={self.cache.max_T}")
        n_batch = self.options.n_batch
        if self.options.fused and n_batch > 1 and len(tokens) > 1:
            parts = []
            for i in range(0, len(tokens), n_batch):   # chunks, as llama.cpp's ubatches
                chunk = tokens[i:i + n_batch]
                parts.append(self.cache.step_batch(chunk, self.n_past, all_logits=all_logits))
                self.n_past += len(chunk)
            return np.concatenate(parts) if all_logits else parts[-1]
        if len(tokens) == 1:   # a decode step: its logits as they come, without a second 1 MB copy (Gemma)
            logits = self.cache.step(tokens[0], self.n_past)
            self.n_past += 1
            return logits.reshape(1, -1)
        out = np.empty((len(tokens), self.config.vocab), dtype=np.float32)
        for i, tok in enumerate(tokens):
            out[i] = self.cache.step(tok, self.n_past)
            self.n_past += 1
        return out if all_logits else out[-1:]

    def generate(self, prompt: str | list[int] | list[str | list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 40, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None, stop: list[str] | None = None,
                 stream: bool = False, chat: bool = False, speculative: str | None = None,
                 draft_max: int = 10, draft_model: "Model | None" = None) -> str | Iterator[str]:
        """The continuation of ``prompt`` (not the prompt itself), from an empty cache.

        Stops at an end-of-generation token, at ``max_new_tokens``, or at a ``stop`` string.
        ``chat=True`` wraps a string prompt as one user message in the GGUF's chat template.
        With ``stream=True`` returns an iterator of text pieces. ``speculative="prompt_lookup"``
        drafts up to ``draft_max`` tokens from the context where its last two tokens occurred
        before, and verifies them in one batch (toy_llm.generate); with temperature > 0 the
        speculative sampling rule keeps the sampled distribution unchanged. ``draft_model``
        (another loaded Model sharing the vocabulary, mlx-lm's and llama.cpp's draft model) drafts
        instead with its greedy continuation; ``speculative`` is then "draft_model". ``last_stats``
        counts drafted and accepted tokens. A list of prompts (str or id lists) gives a list of
        texts, decoded together, one sequence each (load with ``n_seq`` >= their number;
        toy_llm.sequences).
        """
        self._check_open("generate")
        if type(max_new_tokens) is not int or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        scfg = SamplerConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed)
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
            # several prompts: one continuation each, decoded together (load with n_seq >= len(prompt))
            if stream or speculative or draft_model is not None:
                raise ValueError("generate: several prompts take neither stream nor speculative")
            with self.lock:
                return self._generate_many(list(prompt), max_new_tokens, scfg, stop or [], chat)
        if draft_model is not None and speculative is None:
            speculative = "draft_model"
        # here, not only in token_stream: a stream then fails before its first piece
        check_speculative(self, speculative, draft_max, draft_model)
        it = self._generate(prompt, max_new_tokens, scfg, stop or [], chat, speculative, draft_max, draft_model)
        if stream:
            return it
        with self.lock:
            return "".join(it)

    def _prompt_ids(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            if chat:
                ids = self.tokenize(self.apply_chat_template([{"role": "user", "content": prompt}]),
                                    add_bos=False, special=True)
            else:
                ids = self.tokenize(prompt)
        else:
            ids = check_token_ids(prompt, self.config.vocab, "generate")
        if not ids:
            raise ValueError("generate: empty prompt")
        if len(ids) > self.cache.max_T:
            raise ValueError(f"generate: the prompt has {len(ids)} tokens, more than the context "
                             f"(max_T={self.cache.max_T})")
        return ids

    def _generate_many(self, prompts: list, max_new_tokens: int, scfg: SamplerConfig, stop: list[str],
                       chat: bool, share_prefix: bool = True) -> list[str]:
        """One continuation per prompt, the sequences decoded together, as llama.cpp's parallel
        example: the prompts' common prefix is evaluated once in sequence 0 and forked into the
        others (``share_prefix``), the rest of every prompt goes in one batch, then each step is
        one batch of one token of every unfinished sequence. Sampler k is seeded ``seed + k``."""
        n_seq = self.seqs.n_seq
        if not 0 < len(prompts) <= n_seq:
            raise ValueError(f"generate: {len(prompts)} prompts for {n_seq} sequence slots (load with n_seq=...)")
        ids = [self._prompt_ids(p, chat) for p in prompts]
        samplers = [Sampler(replace(scfg, seed=None if scfg.seed is None else scfg.seed + k)) for k in range(len(ids))]
        eog = set(self.tokenizer.eog_ids)
        seqs = self.seqs
        seqs.clear()
        t0 = time.perf_counter()
        shared = _common_prefix(ids) if share_prefix and len(ids) > 1 else 0
        logits: list = [None] * len(ids)
        if shared:
            last = seqs.eval(0, ids[0][:shared], all_logits=False)[-1]
            for k in range(1, len(ids)):
                seqs.copy(0, k)
            logits = [last if len(x) == shared else None for x in ids]
        else:
            for _ in range(1, len(ids)):
                seqs.add()      # 1, 2, ...: all are free after clear()
        rest = [(k, x[shared:]) for k, x in enumerate(ids) if len(x) > shared]
        if rest:
            for (k, _), row in zip(rest, seqs.decode(rest)):
                logits[k] = row
        t_prompt = time.perf_counter() - t0
        hist, out = [list(x) for x in ids], [[] for _ in ids]
        active = list(range(len(ids)))
        slot = list(range(len(ids)))          # the sequence each prompt is in
        steps = 0
        t1 = time.perf_counter()
        while active and max_new_tokens > 0:
            going = []
            for k in active:
                tok = samplers[k].sample(logits[k], hist[k])
                if tok in eog:
                    continue
                out[k].append(tok)
                hist[k].append(tok)
                if len(out[k]) < max_new_tokens and seqs.lengths[slot[k]] < self.cache.max_T and \
                        (not stop or _first_stop(self.detokenize(out[k]), stop) is None):
                    going.append(k)
            if not going:
                break
            # keep the unfinished sequences in slots 0..n-1: llama.cpp puts only consecutive
            # sequence ids in one graph, so a gap would split every later step into two graphs
            n = len(going)
            free = sorted(slot[k] for k in active if slot[k] < n and k not in going)
            for k, dst in zip([k for k in going if slot[k] >= n], free):
                seqs.copy(slot[k], dst)
                seqs.drop(slot[k])
                slot[k] = dst
            going.sort(key=slot.__getitem__)
            rows = seqs.decode([(slot[k], [hist[k][-1]]) for k in going])
            steps += 1
            for k, row in zip(going, rows):
                logits[k] = row
            active = going
        dt = time.perf_counter() - t1
        texts = []
        for toks in out:
            text = self.detokenize(toks)
            cut = _first_stop(text, stop)
            texts.append(text if cut is None else text[:cut])
        n_gen = sum(len(o) for o in out)
        self.last_stats = {"prompt_tokens": sum(len(x) for x in ids), "shared_prefix": shared,
                           "prompt_s": t_prompt, "gen_tokens": n_gen, "gen_s": dt,
                           "tok_per_s": n_gen / dt if dt > 0 else 0.0, "decode_steps": steps,
                           "sequences": len(ids)}
        return texts

    def _generate(self, prompt, max_new_tokens, scfg, stop, chat, speculative=None, draft_max=10,
                  draft_model=None) -> Iterator[str]:
        ids = self._prompt_ids(prompt, chat)
        sampler = Sampler(scfg)
        eog = set(self.tokenizer.eog_ids)
        gen_stats: dict = {}
        tokens = token_stream(self, ids, max_new_tokens, sampler, eog, gen_stats, speculative, draft_max,
                              draft_model=draft_model)
        t0 = time.perf_counter()
        first = next(tokens, None)            # the prompt is evaluated on the way to the first token
        t_prompt = time.perf_counter() - t0
        out_ids: list[int] = []
        emitted = ""
        t1 = time.perf_counter()
        for tok in ([] if first is None else itertools.chain([first], tokens)):
            out_ids.append(tok)
            text = self.detokenize(out_ids)
            cut = _first_stop(text, stop)
            if cut is not None:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                emitted = text[:cut]
                gen_stats["stopped"] = "stop"
                break
            # hold back an incomplete UTF-8 sequence and any prefix of a stop string
            safe = len(text.rstrip("\ufffd"))
            safe = min(safe, _stop_safe_len(text, stop))
            if safe > len(emitted):
                yield text[len(emitted):safe]
                emitted = text[:safe]
        if gen_stats.get("stopped") == "context":
            warnings.warn(f"generate: stopped after {len(out_ids)} tokens at the end of the context "
                          f"(max_T={self.cache.max_T}); load with a larger max_T for longer output", stacklevel=3)
        text = self.detokenize(out_ids)
        cut = _first_stop(text, stop)
        final = text if cut is None else text[:cut]
        if len(final) > len(emitted):
            yield final[len(emitted):]
        dt = time.perf_counter() - t1
        self.last_stats = {"prompt_tokens": len(ids), "prompt_s": t_prompt, "gen_tokens": len(out_ids),
                           "gen_s": dt, "tok_per_s": (len(out_ids) / dt) if dt > 0 else 0.0,
                           **gen_stats}

    # ---------------------------------------------------------------- experiments

    def _engine(self):
        self._check_open("hooks")
        return self.cache._engine("hooks")

    def _set_hooks(self) -> None:
        self._engine().set_hooks(self._control_hooks + self._user_hooks)

    def run_with_cache(self, tokens, names=None, all_logits: bool = True):
        """Evaluate ``tokens`` (ids or text) from an empty context; returns ``(logits, cache)``: the
        logits as :meth:`eval` returns them, and ``cache`` {hook point: float32 array [tokens, ...]}
        for the names asked for (None: every hook point; a list of names; or a callable name -> bool).
        Hook point names: README, "Looking inside". Hooks in force (:meth:`hooks`) apply."""
        tokens = self.tokenize(tokens) if isinstance(tokens, str) else [int(t) for t in tokens]
        trace = self._engine().trace
        wanted = names if names is None or callable(names) else set(names).__contains__
        if names is not None and not callable(names):
            from .engine.hook_points import hook_point

            for n in names:
                hook_point(n)   # KeyError naming an unknown hook point
                if n.endswith("attn.hook_pattern") and self.options.flash_attn:
                    raise ValueError(f"{n}: flash attention computes the attention pattern inside one op and "
                                     f"never stores it; load with flash_attn=False (and kv_type='f32') to read it")
        saved = trace.enabled, trace.wanted, trace.history
        trace.enabled, trace.wanted, trace.history = True, wanted, []
        try:
            self.reset()
            logits = self.eval(tokens, all_logits=all_logits)
            graphs = trace.history
        finally:
            trace.enabled, trace.wanted, trace.history = saved
        return logits, _join_traces(graphs)

    def run_with_hooks(self, tokens, hooks, all_logits: bool = True) -> np.ndarray:
        """Evaluate ``tokens`` from an empty context with ``hooks`` in force (as :meth:`hooks`);
        returns the logits as :meth:`eval` does."""
        tokens = self.tokenize(tokens) if isinstance(tokens, str) else [int(t) for t in tokens]
        with self.hooks(*hooks):
            self.reset()
            return self.eval(tokens, all_logits=all_logits)

    @contextmanager
    def hooks(self, *hooks):
        """``with m.hooks((name_or_filter, fn_or_intervention), ...):`` eval, generate and
        run_with_cache inside see the hooks. ``name_or_filter``: a hook point name or a callable
        name -> bool. ``fn(activation [tokens, ...], name) -> array | None`` (None: unchanged) runs
        inside the graph; built-in interventions (toy_llm.engine.interventions: AddVector, Scale,
        ZeroHeads, Patch) run as ggml ops at full speed."""
        from .engine.interventions import Intervention, PythonHook

        pairs = []
        for h in hooks:
            match, what = h
            pairs.append((match, what if isinstance(what, Intervention) else PythonHook(what)))
        saved = self._user_hooks
        self._user_hooks = saved + tuple(pairs)
        try:
            self._set_hooks()
        except BaseException:
            self._user_hooks = saved
            raise
        try:
            yield self
        finally:
            self._user_hooks = saved
            if self.cache.engine is not None:
                self._set_hooks()

    def set_lora(self, adapter=None, scale: float = 1.0) -> None:
        """Apply a LoRA-Q adapter (a path to llama.cpp's LoRA GGUF, or a LoraAdapter) in every later
        eval/generate, in-graph in both graphs (no weight merge): Q = W x + s B (A x) + bias with
        s = float32 ``scale`` * alpha / rank, as llama.cpp's ``lora_scale``. The adapter's tensors
        are declared at load: after ``load(..., lora=...)`` this swaps in any adapter of the same rank
        and layers, changes the scale, or with ``None`` stops applying it; a model loaded without
        ``lora=`` refuses (load it with one)."""
        with self.lock:
            self._check_open("set_lora")
            engine = self.cache._engine("set_lora")
            if adapter is None:
                engine.set_lora_q(None, None)
                self.lora, self.lora_scale = None, None
                return
            ad = _lora_adapter(adapter, self.config)
            slots = self.options.lora_q_slots
            if slots is None:
                raise ValueError("set_lora: this model was loaded without LoRA tensors; load it with "
                                 "toy_llm.load(..., lora=ADAPTER) (then set_lora can swap adapters of the same "
                                 "rank and layers, change the scale, or turn it off)")
            if (ad.rank, tuple(sorted(ad.q))) != slots:
                raise ValueError(f"set_lora: the adapter has rank {ad.rank} on layers {sorted(ad.q)}; this model "
                                 f"was loaded with LoRA tensors of rank {slots[0]} on layers {list(slots[1])}: "
                                 f"load it again with lora= this adapter")
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not np.isfinite(scale):
                raise ValueError(f"set_lora: scale must be a finite number, got {scale!r}")
            engine.set_lora_q(ad, ad.scale(float(scale)))
            self.lora, self.lora_scale = ad, float(scale)

    def set_control_vector(self, path_or_array=None, strength: float = 1.0, layers: tuple[int, int] | None = None):
        """Add a control vector to each layer's output (llama.cpp's build_cvec, at l_out =
        ``blocks.{L}.hook_resid_post``) in every later eval/generate. ``path_or_array``: llama.cpp's
        control-vector GGUF (1-D F32 tensors ``direction.{L}``, L >= 1; a list of paths is summed), or
        an array [n_layers, d_model] indexed by layer; times ``strength``. ``layers=(start, end)``,
        both inclusive, as llama.cpp's il_start / il_end (default: every layer from 1). None clears."""
        self._check_open("set_control_vector")
        from .engine.interventions import AddVector

        if path_or_array is None:
            self._control_hooks = ()
            self._set_hooks()
            return
        L, D = self.config.n_layers, self.config.d_model
        vec = load_control_vector(path_or_array, L, D) * np.float32(strength)
        start, end = layers if layers is not None else (1, L - 1)
        self._control_hooks = tuple((f"blocks.{il}.hook_resid_post", AddVector(vec[il]))
                                    for il in range(max(1, start), min(end, L - 1) + 1) if np.any(vec[il]))
        self._set_hooks()

    def score(self, texts, add_bos: bool | None = None) -> list[np.ndarray]:
        """Per-token log-probabilities log p(token_i | tokens_<i), i >= 1, of each text (toy_llm.scoring)."""
        from .scoring import score

        self._check_open("score")

        return score(self, texts, add_bos=add_bos)

    def perplexity(self, text_or_file, n_ctx: int = 512, progress: bool = False):
        """llama.cpp's ``llama-perplexity`` method: chunks of n_ctx, each chunk's second half scored."""
        from .scoring import perplexity

        self._check_open("perplexity")

        return perplexity(self, text_or_file, n_ctx=n_ctx, progress=progress)

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Free the session and the mapping at once (closing twice is a no-op); any later call raises."""
        with self.lock:
            self._closed = True
            self.cache.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _join_traces(graphs: list[dict]) -> dict:
    """One trace per graph ([its tokens, ...]) joined along tokens; attention patterns of graphs
    over different KV lengths are padded with zeros to the longest."""
    if len(graphs) == 1:
        return graphs[0]
    out = {}
    for name in graphs[0]:
        parts = [g[name] for g in graphs]
        width = max(p.shape[-1] for p in parts)
        if name.endswith("attn.hook_pattern"):
            parts = [np.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - p.shape[-1])]) for p in parts]
        out[name] = np.concatenate(parts, axis=0)
    return out


def _lora_adapter(adapter, cfg: ModelConfig):
    """A LoraAdapter checked against ``cfg``'s model, from a path or a LoraAdapter."""
    from .lora.adapter import LoraAdapter, check_adapter, load_adapter

    if isinstance(adapter, (str, os.PathLike)):
        return load_adapter(adapter, cfg)
    if not isinstance(adapter, LoraAdapter):
        raise TypeError(f"lora: expected a path to a LoRA GGUF or a LoraAdapter, got {type(adapter).__name__}")
    if not adapter.q:
        raise ValueError("lora: the adapter has no layers")
    check_adapter(adapter, cfg)
    return adapter


def load_control_vector(path_or_array, n_layers: int, d_model: int) -> np.ndarray:
    """[n_layers, d_model] float32 from llama.cpp's control-vector GGUF(s) (``direction.{L}``
    tensors, summed over files as llama.cpp's loader does) or from an array of that shape."""
    if isinstance(path_or_array, (str, os.PathLike)) or (isinstance(path_or_array, (list, tuple)) and
                                                          path_or_array and isinstance(path_or_array[0], (str, os.PathLike))):
        paths = [path_or_array] if isinstance(path_or_array, (str, os.PathLike)) else list(path_or_array)
        out = np.zeros((n_layers, d_model), np.float32)
        for path in paths:
            g = tnn.tnn_gguf_load(str(path))
            try:
                data = np.memmap(path, dtype=np.uint8, mode="r")
                found = 0
                for il in range(1, n_layers):
                    idx = tnn.tnn_gguf_find_index(g, f"direction.{il}")
                    if idx < 0:
                        continue
                    typ, nbytes = tnn.tnn_gguf_tensor_type(g, idx), tnn.tnn_gguf_tensor_nbytes(g, idx)
                    if typ != tnn.GGML_TYPE_F32 or nbytes != 4 * d_model:
                        raise ValueError(f"{path}: tensor 'direction.{il}' must be F32 [{d_model}] (d_model), "
                                         f"got type {typ} with {nbytes} bytes")
                    off = tnn.tnn_gguf_tensor_file_offset(g, idx)
                    out[il] += np.frombuffer(data[off:off + nbytes], np.float32)
                    found += 1
                if not found:
                    raise ValueError(f"{path}: no 'direction.L' tensors (L = 1..{n_layers - 1}): not a control vector")
            finally:
                tnn.tnn_gguf_free(g)
        return out
    vec = np.asarray(path_or_array, np.float32)
    if vec.shape != (n_layers, d_model):
        raise ValueError(f"a control vector array must be [n_layers, d_model] = [{n_layers}, {d_model}], "
                         f"got {list(vec.shape)}")
    return vec


def _first_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _common_prefix(seqs: list[list[int]]) -> int:
    """The length of the longest prefix every list shares."""
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != seqs[0][i] for x in seqs[1:]):
            return i
    return n


def _stop_safe_len(text: str, stop: list[str]) -> int:
    """Length of ``text`` that cannot be the start of a stop string still being generated."""
    safe = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                safe = min(safe, len(text) - k)
                break
    return safe


def load(path: str | os.PathLike | None = None, max_T: int = 2048, n_threads: int | None = None,
         backend: str = "cpu", kv_type: str = "f16", flash_attn: bool = False, loader: str = "mmap",
         weight_type: int | None = None, progress: bool = False, graph: str = "fused",
         n_batch: int = LLAMA_N_BATCH, lora=None, lora_scale: float = 1.0, threadpool: bool = False,
         n_seq: int = 1, tiles: bool = True) -> Model:
    """Load a GGUF (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).

    ``graph="fused"`` (default) builds llama.cpp's graph, all heads of a layer in one tensor, and
    evaluates prompts in ubatches of ``n_batch`` positions (llama.cpp's default, 512: its logits then
    equal llama.cpp's with the same n_batch = n_ubatch); ``graph="per_head"`` builds the seed's
    per-head graph, one position per graph. ``loader="mmap"`` points weights into the mapped file
    (no copy); ``loader="copy"`` takes the seed's legacy path (``realize_for`` + ``load_weights``)
    with 2-D weights at ``weight_type`` (default: the file's own type; 0 = F32, 8 = Q8_0).
    ``kv_type="q8_0"`` also turns flash attention on, as in the seed. ``lora``: a LoRA-Q adapter
    (llama.cpp LoRA GGUF path or a LoraAdapter) applied at ``lora_scale`` (see Model.set_lora).
    ``tiles=False`` multiplies Q4_1, Q5_0 and Q8_0 weights with ggml_mul_mat instead of the tiled
    kernels (the same numbers, slower for batches; README, "Speed").
    """
    n_threads = os.cpu_count() if n_threads is None else n_threads   # 0 is refused, not read as "all"
    opts = EngineOptions(backend=backend, n_threads=n_threads, kv_type=kv_type,
                         flash_attn=flash_attn, graph=graph, n_batch=n_batch, loader=loader, weight_type=weight_type,
                         threadpool=threadpool, n_seq=n_seq, tiles=tiles)
    if type(max_T) is not int or max_T < 1:
        raise ValueError(f"max_T must be a positive int, got {max_T!r}")
    if path is None:
        from .fetch import default_model_path

        path = default_model_path()
    path = Path(path)
    from .gguf_meta import GGUFMeta

    with GGUFMeta(path) as meta:   # one parse of the header serves the config, the tokenizer and the weights
        cfg = load_config(meta)
        tok = Tokenizer.from_gguf(meta)
        adapter = None if lora is None else _lora_adapter(lora, cfg)
        if adapter is not None:   # its tensors are declared with the weights
            opts = replace(opts, lora_q_slots=(adapter.rank, tuple(sorted(adapter.q))))
        cache = SmolLM2KVFFICache(options=opts)
        cache.apply_config(cfg)
        max_T = min(max_T, cfg.context_length) if cfg.context_length else max_T
        if loader == "mmap":   # the engine owns the handle from here on
            cache.realize_for_mmap(meta.detach(), cfg, max_T, cfg.untied_output, cfg.qkv_bias)
    if loader != "mmap":
        cache.realize_for(max_T, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv, cfg.n_layers, cfg.vocab,
                          cfg.rope_base, cfg.rms_eps, cfg.untied_output, cfg.qkv_bias, d_head=cfg.head_dim)
        try:
            cache.load_weights(str(path), progress=progress)
        except BaseException:
            cache.close()
            raise
    model = Model(path, cfg, cache, tok)
    if adapter is not None:
        try:
            model.set_lora(adapter, lora_scale)
        except BaseException:
            model.close()
            raise
    return model
