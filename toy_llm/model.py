"""The public API: ``toy_llm.load(...)`` -> :class:`Model` (eval, generate, tokenize).

Scripts, the CLI and our parity checks call exactly this. By default ``Model.eval`` runs the
fused graph, prompts in ubatches of ``n_batch`` = 512 positions as llama.cpp's defaults;
``graph="per_head"`` runs the seed's per-head graph one position at a time.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from . import tinynn as tnn
from .engine.kv_cache import SmolLM2KVFFICache
from .engine.options import LLAMA_N_BATCH, EngineOptions
from .gguf_load import ModelConfig, load_config
from .sampling import Sampler, SamplerConfig
from .tokenizer import Tokenizer


class Model:
    """A loaded model: its config, tokenizer, and the engine cache holding weights + KV."""

    def __init__(self, path: Path, config: ModelConfig, cache: SmolLM2KVFFICache, tokenizer: Tokenizer):
        self.path = path
        self.config = config
        self.cache = cache
        self.tokenizer = tokenizer
        self.n_past = 0
        self.last_stats: dict[str, float] = {}
        self._user_hooks: tuple = ()      # (matcher, Intervention) pairs of the open hooks() blocks
        self._control_hooks: tuple = ()   # the control vector's, as AddVector per layer

    @property
    def options(self) -> EngineOptions:
        return self.cache.options

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
        tokens = [int(t) for t in tokens]
        if self.n_past + len(tokens) > self.cache.max_T:
            raise ValueError(f"context full: n_past={self.n_past} + {len(tokens)} tokens > max_T={self.cache.max_T}")
        n_batch = self.options.n_batch
        if self.options.fused and n_batch > 1 and len(tokens) > 1:
            parts = []
            for i in range(0, len(tokens), n_batch):   # chunks, as llama.cpp's ubatches
                chunk = tokens[i:i + n_batch]
                parts.append(self.cache.step_batch(chunk, self.n_past, all_logits=all_logits))
                self.n_past += len(chunk)
            return np.concatenate(parts) if all_logits else parts[-1]
        out = np.empty((len(tokens), self.config.vocab), dtype=np.float32)
        for i, tok in enumerate(tokens):
            out[i] = self.cache.step(tok, self.n_past)
            self.n_past += 1
        return out if all_logits else out[-1:]

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 40, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                 repeat_last_n: int = 64, seed: int | None = None, stop: list[str] | None = None,
                 stream: bool = False, chat: bool = False) -> str | Iterator[str]:
        """The continuation of ``prompt`` (not the prompt itself), from an empty cache.

        Stops at an end-of-generation token, at ``max_new_tokens``, or at a ``stop`` string.
        ``chat=True`` wraps a string prompt as one user message in the GGUF's chat template.
        With ``stream=True`` returns an iterator of text pieces.
        """
        it = self._generate(prompt, max_new_tokens, SamplerConfig(
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n, seed=seed), stop or [], chat)
        return it if stream else "".join(it)

    def _generate(self, prompt, max_new_tokens, scfg, stop, chat) -> Iterator[str]:
        if isinstance(prompt, str):
            if chat:
                ids = self.tokenize(self.apply_chat_template([{"role": "user", "content": prompt}]),
                                    add_bos=False, special=True)
            else:
                ids = self.tokenize(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("generate: empty prompt")
        sampler = Sampler(scfg)
        eog = set(self.tokenizer.eog_ids)
        self.reset()
        t0 = time.perf_counter()
        logits = self.eval(ids, all_logits=False)[-1]
        t_prompt = time.perf_counter() - t0
        history = list(ids)
        out_ids: list[int] = []
        emitted = ""
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            tok = sampler.sample(logits, history)
            if tok in eog:
                break
            out_ids.append(tok)
            history.append(tok)
            text = self.detokenize(out_ids)
            cut = _first_stop(text, stop)
            if cut is not None:
                if cut > len(emitted):
                    yield text[len(emitted):cut]
                emitted = text[:cut]
                break
            # hold back an incomplete UTF-8 sequence and any prefix of a stop string
            safe = len(text.rstrip("\ufffd"))
            safe = min(safe, _stop_safe_len(text, stop))
            if safe > len(emitted):
                yield text[len(emitted):safe]
                emitted = text[:safe]
            if len(out_ids) == max_new_tokens or self.n_past >= self.cache.max_T:
                break
            logits = self.eval([tok])[-1]
        text = self.detokenize(out_ids)
        cut = _first_stop(text, stop)
        final = text if cut is None else text[:cut]
        if len(final) > len(emitted):
            yield final[len(emitted):]
        dt = time.perf_counter() - t1
        self.last_stats = {"prompt_tokens": len(ids), "prompt_s": t_prompt, "gen_tokens": len(out_ids),
                           "gen_s": dt, "tok_per_s": (len(out_ids) / dt) if dt > 0 else 0.0}

    # ---------------------------------------------------------------- experiments

    def _engine(self):
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

    def set_control_vector(self, path_or_array=None, strength: float = 1.0, layers: tuple[int, int] | None = None):
        """Add a control vector to each layer's output (llama.cpp's build_cvec, at l_out =
        ``blocks.{L}.hook_resid_post``) in every later eval/generate. ``path_or_array``: llama.cpp's
        control-vector GGUF (1-D F32 tensors ``direction.{L}``, L >= 1; a list of paths is summed), or
        an array [n_layers, d_model] indexed by layer; times ``strength``. ``layers=(start, end)``,
        both inclusive, as llama.cpp's il_start / il_end (default: every layer from 1). None clears."""
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

        return score(self, texts, add_bos=add_bos)

    def perplexity(self, text_or_file, n_ctx: int = 512, progress: bool = False):
        """llama.cpp's ``llama-perplexity`` method: chunks of n_ctx, each chunk's second half scored."""
        from .scoring import perplexity

        return perplexity(self, text_or_file, n_ctx=n_ctx, progress=progress)

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
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
         n_batch: int = LLAMA_N_BATCH) -> Model:
    """Load a GGUF (default: SmolLM2-135M-Instruct Q4_1, fetched on first use).

    ``graph="fused"`` (default) builds llama.cpp's graph, all heads of a layer in one tensor, and
    evaluates prompts in ubatches of ``n_batch`` positions (llama.cpp's default, 512: its logits then
    equal llama.cpp's with the same n_batch = n_ubatch); ``graph="per_head"`` builds the seed's
    per-head graph, one position per graph. ``loader="mmap"`` points weights into the mapped file
    (no copy); ``loader="copy"`` takes the seed's legacy path (``realize_for`` + ``load_weights``)
    with 2-D weights at ``weight_type`` (default: the file's own type; 0 = F32, 8 = Q8_0).
    ``kv_type="q8_0"`` also turns flash attention on, as in the seed.
    """
    opts = EngineOptions(backend=backend, n_threads=n_threads or os.cpu_count(), kv_type=kv_type,
                         flash_attn=flash_attn, graph=graph, n_batch=n_batch, loader=loader, weight_type=weight_type)
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
    return Model(path, cfg, cache, tok)
