"""Tensor-by-tensor parity with llama.cpp: find the FIRST tensor where our engine diverges.

Both engines run the same tokens one position at a time (llama.cpp with ``n_batch=n_ubatch=1``,
which is exactly the computation of our per-head decode graph). Our side keeps its named
intermediates through ``SmolLM2KVFFICache.enable_trace``; llama.cpp's side hands them to an
eval callback (``cb_eval``), read through the ggml functions its bundled ``libggml-base``
exports. Tensors are paired by meaning (``LAYER_ROWS`` / ``FINAL_ROWS``) and compared position
by position; a row's figures are the maxima over all positions.

    from toy_llm.parity import compare, format_report
    rep = compare("models/SmolLM2-135M-Instruct.Q4_1.gguf", "The capital of France is")
    print(format_report(rep))

llama-cpp-python (0.3.36, the version our ggml comes from) is a tool/test dependency only: it is
imported when ``compare`` runs, never at import time of this module.
"""
from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

LLAMA_CPP_VERSION = "0.3.36"

# (row id, label, head-0 slice?, ((our hook point "blocks.{L}.<name>", llama.cpp base name "<name>-L"), ...)).
# Our side is the engine's hook-point table (toy_llm/engine/hook_points.py), the same in both graphs.
# Order = graph order inside a layer. The first pair of a row is the llama-arch one, verified on
# SmolLM2 (every pair bit-identical); the others are where an arch names the same quantity
# differently, each verified bit-identical on toy_llm.testing.synthetic's models (gemma2/gemma3:
# sa_out; mixtral/qwen3moe: ffn_moe_out). The pair used is the first one both engines produce.
LAYER_ROWS: tuple[tuple[str, str, bool, tuple[tuple[str, str], ...]], ...] = (
    ("attn_norm", "attn_norm", False, (("ln1.hook_normalized", "attn_norm"),)),
    ("q", "q (rope, head 0)", True, (("attn.hook_q", "Qcur"),)),       # the LAST "Qcur-L" is the rope output
    ("k", "k (rope, head 0)", True, (("attn.hook_k", "Kcur"),)),
    ("v", "v (head 0)", True, (("attn.hook_v", "Vcur"),)),
    ("kqv_out", "kqv_out", False, (("attn.hook_z", "kqv_out"),)),
    ("attn_out", "attn_out (o-proj)", False, (("hook_attn_out", "attn_out"),)),
    ("ffn_inp", "ffn_inp (residual)", False, (("hook_resid_mid", "ffn_inp"), ("hook_resid_mid", "sa_out"))),
    ("ffn_out", "ffn_out", False, (("hook_mlp_out", "ffn_out"), ("hook_mlp_out", "ffn_moe_out"))),
    ("l_out", "l_out", False, (("hook_resid_post", "l_out"),)),
)
# (row id, label, our hook point, llama.cpp name)
FINAL_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("result_norm", "final norm", "ln_final.hook_normalized", "result_norm"),
    ("result_output", "logits", "hook_logits", "result_output"),
)
_LAYER_REF_NAMES = {ref for r in LAYER_ROWS for _, ref in r[3]}
_FINAL_REF_NAMES = {r[3] for r in FINAL_ROWS}

from .ggml_types import GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32  # noqa: E402
from .ggml_types import KV_TYPES as _KV_TYPES  # noqa: E402


class ParityToolError(RuntimeError):
    """The parity tool cannot run (missing oracle, llama.cpp failure)."""


# ---------------------------------------------------------------------------- report types

@dataclass
class TensorDiff:
    """One paired tensor; figures are maxima over the compared positions (None: not available)."""

    layer: int | None          # None for the tensors after the last layer
    row: str                   # row id (LAYER_ROWS / FINAL_ROWS)
    label: str
    ours: str                  # our tap name
    ref: str                   # llama.cpp tensor name
    max_abs: float | None = None
    max_ref: float | None = None
    worst_pos: int | None = None
    note: str = ""             # why a row is blank (e.g. "no llama.cpp tensor")
    alts: tuple[tuple[str, str], ...] = ()   # other (ours, ref) names for the same quantity

    @property
    def rel(self) -> float | None:
        if self.max_abs is None:
            return None
        if self.max_ref:
            return self.max_abs / self.max_ref
        return 0.0 if self.max_abs == 0 else math.inf

    def _acc(self, pos: int, ours: np.ndarray, ref: np.ndarray) -> None:
        d = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
        m = float(np.max(np.abs(ref))) if ref.size else 0.0
        if not math.isfinite(d):
            d = math.inf
        if self.max_abs is None or d > self.max_abs:
            self.max_abs, self.worst_pos = d, pos
        self.max_ref = m if self.max_ref is None else max(self.max_ref, m)


@dataclass
class ParityReport:
    model_path: str
    arch: str
    tokens: list[int]
    kv_type: str
    flash_attn: bool
    tol: float
    logits_max_abs: list[float] = field(default_factory=list)   # per position
    argmax_ours: list[int] = field(default_factory=list)
    argmax_ref: list[int] = field(default_factory=list)
    rows: list[TensorDiff] = field(default_factory=list)         # graph order; empty without layers
    n_layers: int = 0
    layers: bool = True
    notes: list[str] = field(default_factory=list)               # how a pairing was adjusted
    graph: str = "fused"                                         # our attention block

    @property
    def max_abs_logit(self) -> float:
        return max(self.logits_max_abs) if self.logits_max_abs else 0.0

    @property
    def agreement(self) -> float:
        n = len(self.argmax_ref)
        return sum(a == b for a, b in zip(self.argmax_ours, self.argmax_ref)) / n if n else 1.0

    @property
    def first_divergence(self) -> TensorDiff | None:
        """The first row in graph order (layers in order, then the output) with rel error > tol."""
        for d in self.rows:
            r = d.rel
            if r is not None and r > self.tol:
                return d
        return None

    def row(self, layer: int | None, row: str) -> TensorDiff:
        for d in self.rows:
            if d.layer == layer and d.row == row:
                return d
        raise KeyError((layer, row))


# ---------------------------------------------------------------------------- llama.cpp side

class _GgmlTensorPrefix(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml/include/ggml.h, GGML_MAX_DIMS = 4)."""

    _fields_ = [("type", ctypes.c_int),
                ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4)]


def _import_llama_cpp():
    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError as e:
        raise ParityToolError(
            "the parity tool needs llama.cpp's Python binding as its reference: "
            f"pip install llama-cpp-python=={LLAMA_CPP_VERSION}") from e
    ver = getattr(llama_cpp, "__version__", "?")
    if ver != LLAMA_CPP_VERSION:
        import warnings

        warnings.warn(f"llama-cpp-python {ver} is installed; the parity tool is verified with "
                      f"{LLAMA_CPP_VERSION} (same ggml as ours)", stacklevel=3)
    try:
        from llama_cpp._logger import set_verbose  # noqa: PLC0415

        set_verbose(False)
    except Exception:  # pragma: no cover - logging is cosmetic
        pass
    return llama_cpp


_GGML_BASE = None


def _ggml_base(llama_cpp):
    """ctypes handle on the libggml-base bundled with llama_cpp (the one its libllama uses)."""
    global _GGML_BASE
    if _GGML_BASE is None:
        libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
        cands = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("ggml-base.*"))
        if not cands:
            raise ParityToolError(f"no libggml-base in {libdir}: llama-cpp-python install looks incomplete")
        lib = ctypes.CDLL(str(cands[0]))
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_backend_tensor_get.restype = None
        _GGML_BASE = lib
    return _GGML_BASE


def _wanted(name: str) -> tuple[str, int] | None:
    """(base name, layer) of a llama.cpp tensor we pair, layer -1 for the output tensors."""
    if name in _FINAL_REF_NAMES:
        return name, -1
    base, sep, il = name.rpartition("-")
    if sep and base in _LAYER_REF_NAMES and il.isdigit():
        return base, int(il)
    return None


def _read_tensor(ggml, ptr) -> np.ndarray | None:
    """A float tensor's values as float32 in numpy order (ne reversed); None for other types."""
    hdr = _GgmlTensorPrefix.from_address(ptr)
    typ = hdr.type
    ne = [int(hdr.ne[i]) for i in range(4)]
    nb = [int(hdr.nb[i]) for i in range(4)]
    dtype = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_BF16: np.uint16}.get(typ)
    if dtype is None:
        return None
    nbytes = int(ggml.ggml_nbytes(ptr))
    raw = np.empty(nbytes, np.uint8)
    if nbytes:
        ggml.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, nbytes)
    # ggml_nbytes of a (possibly strided) view spans exactly its elements: walk it with nb
    isz = np.dtype(dtype).itemsize
    arr = np.lib.stride_tricks.as_strided(raw, shape=tuple(reversed(ne)) + (isz,),
                                          strides=tuple(reversed(nb)) + (1,))
    arr = np.ascontiguousarray(arr).view(dtype).reshape(tuple(reversed(ne)))
    if typ == GGML_TYPE_BF16:
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


class _LlamaRef:
    """A llama.cpp context fed one token per decode, keeping the paired tensors of each step."""

    def __init__(self, path: str, n_ctx: int, kv_type: str, flash_attn: bool, trace: bool,
                 n_threads: int | None = None):
        lc = self.lc = _import_llama_cpp()
        self.ggml = _ggml_base(lc)
        self.trace = trace
        self.step_tensors: dict[str, np.ndarray] = {}
        self._error: BaseException | None = None
        self.model = self.ctx = None
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise ParityToolError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = 1
        cp.n_ubatch = 1
        cp.n_seq_max = 1
        nt = n_threads or os.cpu_count() or 1
        cp.n_threads = nt
        cp.n_threads_batch = nt
        cp.type_k = _KV_TYPES[kv_type]
        cp.type_v = _KV_TYPES[kv_type]
        cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if trace:
            self._cb = lc.ggml_backend_sched_eval_callback(self._on_tensor)  # keep the thunk alive
            cp.cb_eval = self._cb
            cp.cb_eval_user_data = None
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise ParityToolError("llama.cpp could not create a context (llama_init_from_model failed)")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def _on_tensor(self, t, ask, _user) -> bool:
        try:
            name = self.ggml.ggml_get_name(t).decode("utf-8", "replace")
            key = _wanted(name)
            if ask:
                return key is not None
            if key is not None:
                arr = _read_tensor(self.ggml, t)
                if arr is not None:
                    self.step_tensors[name] = arr   # same name twice (Qcur pre/post rope): the last wins
            return True
        except BaseException as e:  # noqa: BLE001 - never let an exception cross the C boundary
            self._error = e
            return False

    def step(self, token: int) -> np.ndarray:
        """Decode one token (next position); returns its logits; ``step_tensors`` holds its tensors."""
        lc = self.lc
        self.step_tensors = {}
        buf = (lc.llama_token * 1)(int(token))
        rc = lc.llama_decode(self.ctx, lc.llama_batch_get_one(buf, 1))
        if self._error is not None:
            raise ParityToolError(f"reading llama.cpp's tensors failed: {self._error!r}") from self._error
        if rc != 0:
            raise ParityToolError(f"llama_decode failed (rc={rc})")
        ptr = lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32)

    def close(self) -> None:
        if self.ctx:
            self.lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None


# ---------------------------------------------------------------------------- compare

def _head0(ref: np.ndarray, ours: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Head 0 of ours ([tokens, heads, head_dim]) and of llama.cpp's [head_dim, n_head, n_tokens]
    tensor (numpy (n_tokens, n_head, head_dim))."""
    hd = ours.shape[-1]
    if ref.ndim < 2 or ref.shape[-1] != hd:
        return None
    return ours.reshape(-1, hd)[0], ref.reshape(-1, hd)[0]


def compare(model_path, prompt_or_tokens: str | Sequence[int], *, n_positions: int | None = None,
            kv_type: str = "f16", flash_attn: bool = False, graph: str = "fused", mutate: Callable | None = None,
            tol: float = 1e-3, layers: bool = True, n_threads: int | None = 1,
            progress: Callable[[int, int], None] | None = None) -> ParityReport:
    """Run our engine and llama.cpp on the same tokens, one position at a time, and pair tensors.

    ``prompt_or_tokens``: text (tokenized by our tokenizer, with the GGUF's BOS rule) or token ids.
    ``n_positions``: compare this many positions; fewer truncates the prompt, more continues it
    greedily with llama.cpp's argmax (both engines then see the same tokens).
    ``mutate(model)`` is called on our loaded :class:`toy_llm.Model` before running (plant an error).
    ``layers=False`` compares the logits only (no traces, faster). ``graph``: our attention block
    ("fused", the default, or "per_head"); both run one position per graph here.
    ``n_threads`` (both engines; None = all cores) defaults to 1: one token at a time through a
    small model is dominated by thread barriers, and llama.cpp's eval callback splits its graph into
    hundreds of tiny computes (7x faster on an idle 2-core machine, far more on a busy one). The
    ggml CPU kernels give the same numbers for any thread count.
    """
    from . import load  # noqa: PLC0415

    if kv_type not in _KV_TYPES:
        raise ValueError(f"kv_type must be one of {tuple(_KV_TYPES)}, got {kv_type!r}")
    path = str(model_path)
    if not Path(path).exists():
        raise FileNotFoundError(path)
    _import_llama_cpp()  # fail early, before loading anything
    if isinstance(prompt_or_tokens, str):
        from .tokenizer import Tokenizer  # noqa: PLC0415

        tok = Tokenizer.from_gguf(Path(path))
        ids = tok.encode(prompt_or_tokens, add_special=False, parse_special=False)
        if tok.add_bos and tok.bos_id is not None and tok.bos_id >= 0:
            ids = [tok.bos_id] + ids
    else:
        ids = [int(t) for t in prompt_or_tokens]
    if not ids:
        raise ValueError("parity: empty prompt")
    if kv_type == "q8_0":
        flash_attn = True   # as our loader does; llama.cpp refuses a quantized V cache without it
    n = len(ids) if n_positions is None else int(n_positions)
    if n <= 0:
        raise ValueError(f"parity: n_positions must be positive, got {n}")
    ids = ids[:n]
    # same context length on both sides: the attended KV length (padded to 256) must match
    n_ctx = max(512, -(-n // 256) * 256)

    model = load(path, max_T=n_ctx, n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn, graph=graph)
    ref = None
    try:
        if model.cache.max_T < n:
            raise ValueError(f"parity: {n} positions exceed the model's context ({model.cache.max_T})")
        if layers:
            model.cache.enable_trace()
        if mutate is not None:
            mutate(model)
        ref = _LlamaRef(path, model.cache.max_T, kv_type, flash_attn, trace=layers, n_threads=n_threads)
        if ref.n_vocab != model.config.vocab:
            raise ParityToolError(f"vocab size differs: ours {model.config.vocab}, llama.cpp {ref.n_vocab}")
        L = model.config.n_layers
        rep = ParityReport(model_path=path, arch=model.config.arch, tokens=[], kv_type=kv_type,
                           flash_attn=flash_attn, tol=tol, graph=graph, n_layers=L, layers=layers)
        if layers:
            for il in range(L):
                for rid, label, _, pairs in LAYER_ROWS:
                    names = tuple((f"blocks.{il}.{o}", f"{r}-{il}") for o, r in pairs)
                    rep.rows.append(TensorDiff(il, rid, label, *names[0], alts=names[1:]))
            for rid, label, ours_name, ref_name in FINAL_ROWS:
                rep.rows.append(TensorDiff(None, rid, label, ours_name, ref_name))
        head_rows = {f"blocks.{il}.{o}" for il in range(L) for r in LAYER_ROWS if r[2] for o, _ in r[3]}
        # A quantized V cache: llama.cpp rotates V by a Walsh-Hadamard matrix and names the attention
        # output "kqv_out" BEFORE rotating it back (llama-graph.cpp build_attn); our per-head graph
        # rotates each head back before the concat. Undo the rotation on llama.cpp's side (H is
        # symmetric and orthonormal, so H·H = I); this costs rounding (~1e-7 relative), not exactness.
        v_rot = None
        if layers and getattr(model.cache, "t_v_hadamard", None) is not None:
            from . import tinynn as tnn  # noqa: PLC0415
            from .engine.cache import hadamard_matrix  # noqa: PLC0415

            v_rot = hadamard_matrix(int(tnn.tnn_tensor_ne(model.cache.t_v_hadamard, 0))).astype(np.float64)
            rep.notes.append(f"kqv_out: llama.cpp's tensor is in the V cache's Hadamard basis; compared after "
                             f"rotating it back in numpy ({v_rot.shape[0]}-blocks, float64), so expect "
                             f"rounding-level |Δ| there")
        kqv_rows = {f"blocks.{il}.attn.hook_z" for il in range(L)}

        pos = 0
        while pos < n:
            if pos >= len(ids):  # continue greedily with llama.cpp's choice
                ids.append(rep.argmax_ref[-1])
            token = ids[pos]
            ref_logits = ref.step(token)
            ours_logits = model.cache.step(token, pos)
            rep.tokens.append(token)
            rep.logits_max_abs.append(float(np.max(np.abs(ours_logits.astype(np.float64)
                                                          - ref_logits.astype(np.float64)))))
            rep.argmax_ours.append(int(np.argmax(ours_logits)))
            rep.argmax_ref.append(int(np.argmax(ref_logits)))
            if layers:
                trace = model.cache.dump_trace()
                theirs = ref.step_tensors
                for d in rep.rows:
                    if pos == 0 and d.alts and not (d.ours in trace and d.ref in theirs):
                        for o_name, r_name in d.alts:
                            if o_name in trace and r_name in theirs:
                                d.ours, d.ref = o_name, r_name
                                break
                    o, r = trace.get(d.ours), theirs.get(d.ref)
                    if o is None or r is None:
                        if not d.note:
                            d.note = " and ".join(w for w, miss in (("no tap in our engine", o is None),
                                                                    ("no llama.cpp tensor", r is None)) if miss)
                        continue
                    if d.ours in head_rows:
                        o, r = _head0(r, o) or (o, None)
                    elif v_rot is not None and d.ours in kqv_rows and r.size % v_rot.shape[0] == 0:
                        r = (r.reshape(-1, v_rot.shape[0]).astype(np.float64) @ v_rot).astype(np.float32)
                    if r is None or r.size != o.size:
                        d.note = "shape mismatch"
                        continue
                    d._acc(pos, o.reshape(-1), r.reshape(-1))
            pos += 1
            if progress is not None:
                progress(pos, n)
        for d in rep.rows:   # a row seen at some positions only is blank, not half-compared
            if d.note:
                d.max_abs = d.max_ref = d.worst_pos = None
        return rep
    finally:
        if ref is not None:
            ref.close()
        model.close()


# ---------------------------------------------------------------------------- formatting

def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return ""
    return "inf" if math.isinf(x) else format(x, spec)


def format_report(report: ParityReport, layers: bool = True) -> str:
    """The text the ``parity`` command prints: per-position logits, optional per-layer tables, summary."""
    out: list[str] = []
    rp = report
    out.append(f"parity: {rp.model_path} (arch {rp.arch}), {len(rp.tokens)} positions, kv {rp.kv_type}, "
               f"flash-attn {'on' if rp.flash_attn else 'off'}, our {rp.graph} graph; llama.cpp fed one token per decode")
    out.extend(f"note: {n}" for n in rp.notes)
    out.append("")
    out.append(f"{'pos':>4} {'token':>7} {'max|Δlogit|':>12} {'argmax ours':>12} {'llama.cpp':>10}  ")
    for i, tok in enumerate(rp.tokens):
        a, b = rp.argmax_ours[i], rp.argmax_ref[i]
        out.append(f"{i:>4} {tok:>7} {rp.logits_max_abs[i]:>12.4g} {a:>12} {b:>10}  {'' if a == b else 'DIFFERENT'}")
    if layers and rp.layers and rp.rows:
        first = rp.first_divergence
        out.append("")
        out.append(f"per-tensor max |Δ| over positions; rel = max|Δ| / max|ref|; "
                   f"'<<< first' marks the first tensor with rel > {rp.tol:g}")
        hdr = f"  {'tensor':<20} {'ours':<14} {'llama.cpp':<16} {'max|Δ|':>10} {'rel':>10}"
        cur = "start"
        for d in rp.rows:
            if d.layer != cur:
                cur = d.layer
                out.append("")
                out.append(f"layer {d.layer}" if d.layer is not None else "output")
                out.append(hdr)
            mark = "  <<< first divergence" if d is first else ""
            extra = f"  ({d.note})" if d.note else ""
            out.append(f"  {d.label:<20} {d.ours:<14} {d.ref:<16} {_fmt(d.max_abs):>10} {_fmt(d.rel):>10}"
                       f"{mark}{extra}")
        out.append("")
        if first is None:
            out.append("first divergence: none")
        elif first.layer is None:
            out.append(f"first divergence: output, tensor {first.row}")
        else:
            out.append(f"first divergence: layer {first.layer}, tensor {first.row}")
    out.append("")
    out.append(f"summary: {len(rp.tokens)} positions, max |Δlogit| = {rp.max_abs_logit:.4g}, "
               f"argmax agreement = {rp.agreement * 100:.1f}%")
    return "\n".join(out)
