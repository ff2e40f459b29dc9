"""LoRA-Q fine-tuning: ``toy_llm.lora.train(model, data, ...) -> LoraAdapter``.

The seed's engine class drives it: a second session over the model's file, with the per-head
LoRA-Q slots and their AdamW moments (``enable_lora_q(r)``, ``enable_lora_q_adamw()``), the seed's
init (``upload_lora_q_init(seed, init_scale)``: A ~ N(0, init_scale^2), B = 0, so step 0 is the
base model), then one training graph per step (engine/train_graph.py): teacher-forced forward
over the examples packed into one sequence (each attends only to itself), cross-entropy on the
chosen positions, ggml's backward, global-norm clipping, AdamW. The result is exported through
:meth:`LoraAdapter.from_per_head` (llama.cpp's LoRA GGUF layout).

Data: a list of strings (every next token is a target), of ``(prompt, completion)`` pairs (only
the completion's tokens are), or a path: ``.txt`` (one example per line) or ``.jsonl``
(``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` per line).
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import tinynn as tnn
from ..engine import train_graph
from ..engine.kv_cache import SmolLM2KVFFICache
from ..engine.ops import f32_div
from ..engine.options import EngineOptions
from ..gguf_load import ModelConfig, load_config
from .adapter import LoraAdapter

__all__ = ["train", "LoraTrainer", "Example", "load_examples", "tokenize_examples"]


@dataclass(frozen=True)
class Example:
    """One tokenized example: ``tokens``, and the indices i whose next token tokens[i + 1] is a target."""

    tokens: tuple[int, ...]
    rows: tuple[int, ...]


# ---------------------------------------------------------------------------------------------- data

def load_examples(data) -> list:
    """``data`` as a list of strings and (prompt, completion) pairs (a path is read: .txt / .jsonl)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"training data: no such file: {path} (a string is a path; pass a list of "
                                    f"strings for text)")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            out = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    out.append(rec["text"])
                elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and \
                        isinstance(rec.get("completion"), str):
                    out.append((rec["prompt"], rec["completion"]))
                else:
                    raise ValueError(f'{path}:{n}: want {{"text": str}} or {{"prompt": str, "completion": str}}, '
                                     f"got {line[:80]!r}")
        elif path.suffix == ".txt":
            out = [line for line in text.splitlines() if line.strip()]
        else:
            raise ValueError(f"training data: {path}: want a .txt (one example per line) or .jsonl file")
        if not out:
            raise ValueError(f"training data: {path} holds no examples")
        return out
    out = []
    for i, ex in enumerate(data):
        if isinstance(ex, str):
            out.append(ex)
        elif isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(s, str) for s in ex):
            out.append((ex[0], ex[1]))
        elif isinstance(ex, dict) and ("text" in ex or ("prompt" in ex and "completion" in ex)):
            out.append(ex["text"] if "text" in ex else (ex["prompt"], ex["completion"]))
        else:
            raise TypeError(f"training data: example {i} must be a string or a (prompt, completion) pair, "
                            f"got {type(ex).__name__}")
    if not out:
        raise ValueError("training data: no examples")
    return out


def tokenize_examples(tokenize, examples, max_len: int) -> list[Example]:
    """Token ids and loss rows of each example (``tokenize(text, add_bos)``), cut to ``max_len`` tokens."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, tuple):
            p = list(tokenize(ex[0], None))
            c = list(tokenize(ex[1], False))
            ids = (p + c)[:max_len]
            rows = [j for j in range(max(len(p) - 1, 0), len(ids) - 1)]
        else:
            ids = list(tokenize(ex, None))[:max_len]
            rows = list(range(len(ids) - 1))
        if not rows:
            raise ValueError(f"training data: example {i} has nothing to predict (it tokenizes to {len(ids)} "
                             f"token(s){'' if isinstance(ex, str) else ', or an empty completion'})")
        out.append(Example(tuple(ids), tuple(rows)))
    return out


def pack(examples: list[Example], max_tokens: int) -> list[list[Example]]:
    """Examples packed, in order, into sequences of at most ``max_tokens`` tokens (one step each)."""
    packs, cur, n = [], [], 0
    for ex in examples:
        if cur and n + len(ex.tokens) > max_tokens:
            packs.append(cur)
            cur, n = [], 0
        cur.append(ex)
        n += len(ex.tokens)
    if cur:
        packs.append(cur)
    return packs


def _packed_inputs(group: list[Example]):
    tokens, positions, segments, rows, targets = [], [], [], [], []
    for s, ex in enumerate(group):
        base = len(tokens)
        tokens += ex.tokens
        positions += range(len(ex.tokens))
        segments += [s] * len(ex.tokens)
        rows += [base + r for r in ex.rows]
        targets += [ex.tokens[r + 1] for r in ex.rows]
    return tokens, positions, segments, rows, targets


# ---------------------------------------------------------------------------------------------- trainer

class LoraTrainer:
    """Per-head LoRA-Q adapters on one model file, trained step by step on the seed's engine class."""

    def __init__(self, path, cfg: ModelConfig | None = None, rank: int = 8, alpha: float = 16.0, *,
                 max_len: int = 256, n_threads: int | None = None, seed: int = 0, init_scale: float = 0.01,
                 adamw: train_graph.AdamW | None = None, max_grad_norm: float | None = 1.0,
                 weights: str = "f32"):
        self.path = str(path)
        self.cfg = cfg or load_config(self.path)
        train_graph.check_trainable(self.cfg)   # before anything is allocated
        if type(rank) is not int or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
        self.rank, self.alpha, self.max_len = rank, float(alpha), int(max_len)
        self.adamw = adamw or train_graph.AdamW()
        self.max_grad_norm = max_grad_norm
        # the applied scale, in float32 as llama.cpp computes alpha / rank
        self.lora_scale = f32_div(self.alpha, rank)
        # The backward pass multiplies by every frozen weight through out_prod, whose quantized
        # kernel dequantizes a weight row once per token (slow: ~40 s a step for SmolLM2-135M on 2
        # cores), so by default the weights are copied to F32 (4 bytes a parameter) with ggml's
        # dequantizer; weights="file" maps the file's own types instead (little memory, slow).
        # Not repacked either way: out_prod reads the plain layout. The K/V cache is never touched
        # by the training graph (kept small, F32).
        if weights not in ("f32", "file"):
            raise ValueError(f"weights must be 'f32' or 'file', got {weights!r}")
        cfg = self.cfg
        if weights == "f32":
            opts = EngineOptions(backend="cpu", n_threads=n_threads, graph="per_head", kv_type="f32",
                                 repack_weights=False, loader="copy", weight_type=tnn.GGML_TYPE_F32)
        else:
            opts = EngineOptions(backend="cpu", n_threads=n_threads, graph="per_head", kv_type="f32",
                                 repack_weights=False, loader="mmap")
        self.cache = SmolLM2KVFFICache(options=opts)
        self.cache.enable_lora_q(rank)
        self.cache.enable_lora_q_adamw()
        max_T = max(16, self.max_len)
        if weights == "f32":
            self.cache.apply_config(cfg)
            self.cache.realize_for(max_T, cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv, cfg.n_layers, cfg.vocab,
                                   cfg.rope_base, cfg.rms_eps, cfg.untied_output, cfg.qkv_bias, d_head=cfg.head_dim)
            self.cache.load_weights(self.path)
        else:
            g = tnn.tnn_gguf_load(self.path)
            self.cache.realize_for_mmap(g, cfg, max_T, cfg.untied_output, cfg.qkv_bias)
        self.cache.upload_lora_q_init(seed, init_scale)
        self.zero_moments()
        self.t = 0                      # AdamW steps taken
        self._graph = None
        self._shape = None

    @property
    def sess(self):
        return self.cache.sess

    def zero_moments(self) -> None:
        """AdamW starts from m = v = 0 (the seed zeroes them after realize)."""
        for blk in self.cache.kv_blocks_ffi:
            for t in blk.t_w_lora_a_q_m + blk.t_w_lora_a_q_v + blk.t_w_lora_b_q_m + blk.t_w_lora_b_q_v:
                tnn.upload(self.sess, t, np.zeros(tnn.shape_of(t), np.float32))
        self.t = 0

    def _graph_for(self, n_tokens: int, n_rows: int, optimizer: bool = True, keep_grads: bool = False):
        shape = (n_tokens, n_rows, optimizer, keep_grads)
        if self._shape != shape:
            self._graph = self.cache.build_lora_train_step(n_tokens, n_rows, self.lora_scale, optimizer=optimizer,
                                                           keep_grads=keep_grads)
            self._shape = shape
        return self._graph

    def step(self, group: list[Example], lr: float | None = None) -> dict:
        """One AdamW step on the examples of ``group`` packed into one sequence: {"loss", "grad_norm",
        "tokens"} (the loss and norm before the update)."""
        tokens, positions, segments, rows, targets = _packed_inputs(group)
        g = self._graph_for(len(tokens), len(rows))
        self.t += 1
        g.upload(self.sess, self.cfg, tokens, rows, targets, positions, segments)
        tnn.upload(self.sess, g.adamw_params, self.adamw.params(self.t, lr))
        tnn.upload(self.sess, g.max_grad_norm, np.array([self.max_grad_norm or np.inf], np.float32))
        tnn.tnn_compute(self.sess)
        return {"loss": float(tnn.download(self.sess, g.loss)[0]),
                "grad_norm": float(tnn.download(self.sess, g.grad_norm)[0]), "tokens": len(tokens)}

    def gradients(self, group: list[Example]):
        """(loss, {(layer, head, "a" | "b"): gradient}) of ``group`` without a step."""
        tokens, positions, segments, rows, targets = _packed_inputs(group)
        g = self._graph_for(len(tokens), len(rows), optimizer=False, keep_grads=True)
        g.upload(self.sess, self.cfg, tokens, rows, targets, positions, segments)
        tnn.tnn_compute(self.sess)
        grads = {(il, hq, w): tnn.download(self.sess, gt) for (il, hq, w, _), gt in zip(g.params, g.grads)}
        return float(tnn.download(self.sess, g.loss)[0]), grads

    def logits(self, tokens) -> np.ndarray:
        """[n, vocab] logits of ``tokens`` (one sequence) with the current adapters, from the training
        graph's forward pass."""
        handles = train_graph.build_forward(self.cache.engine.context(), len(tokens), self.lora_scale)
        self._shape = None
        return train_graph.run_forward(self.sess, handles, tokens, self.cfg)

    def per_head(self):
        """(a_heads, b_heads): a_heads[il] (H, r, D), b_heads[il] (H, Dh, r), read from the session."""
        a_heads, b_heads = {}, {}
        for il, blk in enumerate(self.cache.kv_blocks_ffi):
            a_heads[il] = np.stack([tnn.download(self.sess, t) for t in blk.t_w_lora_a_q])
            b_heads[il] = np.stack([tnn.download(self.sess, t) for t in blk.t_w_lora_b_q])
        return a_heads, b_heads

    def set_per_head(self, a_heads, b_heads) -> None:
        for il, blk in enumerate(self.cache.kv_blocks_ffi):
            for hq in range(self.cfg.n_heads):
                tnn.upload(self.sess, blk.t_w_lora_a_q[hq], np.asarray(a_heads[il][hq], np.float32))
                tnn.upload(self.sess, blk.t_w_lora_b_q[hq], np.asarray(b_heads[il][hq], np.float32))

    def adapter(self) -> LoraAdapter:
        """The adapters in llama.cpp's layout (stacked A, block-diagonal B, alpha = alpha * n_head)."""
        a_heads, b_heads = self.per_head()
        return LoraAdapter.from_per_head(self.cfg.arch, a_heads, b_heads, self.alpha)

    def close(self) -> None:
        self._graph = None
        self._shape = None
        self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _model_path_and_tokenizer(model):
    """(path, config, tokenize(text, add_bos)) of a loaded Model or a GGUF path."""
    if isinstance(model, (str, os.PathLike)):
        from ..model import load

        m = load(model, max_T=64, n_threads=1)
        try:
            return str(m.path), m.config, m.tokenize, m
        except BaseException:
            m.close()
            raise
    if not hasattr(model, "tokenize") or not hasattr(model, "path"):
        raise TypeError(f"train: model must be a toy_llm Model or a GGUF path, got {type(model).__name__}")
    return str(model.path), model.config, model.tokenize, None


def train(model, data, rank: int = 8, alpha: float = 16.0, steps: int = 100, lr: float = 1e-3, *,
          weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          max_grad_norm: float | None = 1.0, warmup_steps: int = 0, max_len: int = 256,
          batch_tokens: int | None = None, seed: int = 0, init_scale: float = 0.01, n_threads: int | None = None,
          progress: bool = True, history: list | None = None) -> LoraAdapter:
    """Fine-tune per-head LoRA-Q adapters of ``model`` (a loaded Model or a GGUF path) on ``data``.

    ``rank`` r and ``alpha`` per head (applied scale alpha / r); ``steps`` AdamW steps at ``lr``
    (linear warm-up over ``warmup_steps``), decoupled ``weight_decay``, gradient clipping to a global
    norm of ``max_grad_norm`` (None: off). Each step trains on ``batch_tokens`` tokens (default
    ``max_len``) of examples packed into one sequence, each example cut to ``max_len`` tokens, the
    batches taken in turn. ``history``: a list that receives one dict per step (loss, grad_norm,
    tokens, seconds). Returns the adapter (LoraAdapter: ``.save(path)`` writes llama.cpp's format).
    """
    if type(steps) is not int or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if type(max_len) is not int or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
    examples = load_examples(data)
    path, cfg, tokenize, owned = _model_path_and_tokenizer(model)
    try:
        train_graph.check_trainable(cfg)
        if n_threads is None and owned is None:
            n_threads = model.options.n_threads
        toks = tokenize_examples(lambda s, bos: tokenize(s, add_bos=bos), examples, max_len)
    finally:
        if owned is not None:
            owned.close()
    packs = pack(toks, batch_tokens or max_len)
    adamw = train_graph.AdamW(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    with LoraTrainer(path, cfg, rank, alpha, max_len=max(max_len, batch_tokens or 0), n_threads=n_threads,
                     seed=seed, init_scale=init_scale, adamw=adamw, max_grad_norm=max_grad_norm) as tr:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc="lora train", unit="step")
        t_start, n_tok = time.perf_counter(), 0
        try:
            for i in range(steps):
                step_lr = lr * min(1.0, (i + 1) / warmup_steps) if warmup_steps else lr
                t0 = time.perf_counter()
                rec = tr.step(packs[i % len(packs)], step_lr)
                rec["seconds"] = time.perf_counter() - t0
                n_tok += rec["tokens"]
                if history is not None:
                    history.append(rec)
                if not np.isfinite(rec["loss"]):
                    raise FloatingPointError(f"lora train: the loss is {rec['loss']} at step {i + 1} (lower lr?)")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}",
                                    tok_s=f"{n_tok / (time.perf_counter() - t_start):.0f}")
        finally:
            if bar is not None:
                bar.close()
        return tr.adapter()
