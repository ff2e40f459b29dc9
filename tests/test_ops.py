"""Every libtinynn op against a float64 numpy reference, on hypothesis-drawn shapes and data.

Each example builds a fresh session: persistent weights -> finalize -> upload ->
graph -> realize -> upload inputs -> compute -> download, then compares with a
float64 numpy computation. Data come from a numpy Generator seeded by hypothesis
(so shrinking works on shapes and seeds, and every failure is reproducible).

ggml shape convention: ne0 is the fastest axis; a numpy array of shape
(a, b, c) is a tensor with ne = [c, b, a].

Run with ``-s`` to see the largest error measured per op family.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toy_llm import tinynn as T
from toy_llm.engine.kv_cache import BACKEND_KINDS
from toy_llm.tinynn import (
    GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I32, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K,
    GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q4_K, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q5_K,
    GGML_TYPE_Q6_K, GGML_TYPE_Q8_0, ROPE_NEOX, ROPE_NORMAL, dequantize, download, quantize, upload,
)

N_THREADS = 2
# TNN_TEST_EXAMPLES=10 runs ten times the examples (a soak run); the default keeps the file fast.
_EX_SCALE = float(os.environ.get("TNN_TEST_EXAMPLES", "1"))


def ex(n: int) -> int:
    return max(1, int(n * _EX_SCALE))

SETTINGS = dict(deadline=None, derandomize=False, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)

# --------------------------------------------------------------------------- bookkeeping

MAX_ERR: dict[str, float] = defaultdict(float)
TOL_USED: dict[str, float] = defaultdict(float)  # max of err/tol: how close to its tolerance a family came


def record(family: str, err: float) -> float:
    MAX_ERR[family] = max(MAX_ERR[family], float(err))
    return float(err)


@pytest.fixture(scope="module", autouse=True)
def _report_max_errors():
    yield
    if MAX_ERR:
        print("\n[test_ops] max abs error per op family (and max err/tolerance where a tolerance applied):")
        for k in sorted(MAX_ERR):
            used = f"  err/tol {TOL_USED[k]:.2f}" if k in TOL_USED else ""
            print(f"  {k:<36s} {MAX_ERR[k]:.3e}{used}")


# --------------------------------------------------------------------------- graph harness


# TOY_LLM_TEST_BACKEND=cuda (or metal) runs every op on that backend (scripts/device_check.sh does):
# the float64 references and tolerances are the same. Asking for a backend that this build or
# machine lacks fails the test; it never silently measures the CPU instead.
TEST_BACKEND = os.environ.get("TOY_LLM_TEST_BACKEND", "cpu")
TEST_BACKEND_KIND = BACKEND_KINDS[TEST_BACKEND]


@contextlib.contextmanager
def session():
    s = T.tnn_session_new(TEST_BACKEND_KIND)
    if T.tnn_session_backend_kind(s) != TEST_BACKEND_KIND:
        T.tnn_session_free(s)
        pytest.fail(f"TOY_LLM_TEST_BACKEND={TEST_BACKEND}: that backend is not available in this build/machine")
    try:
        T.tnn_session_set_n_threads(s, N_THREADS)
        yield s
    finally:
        T.tnn_session_free(s)


def ne_of(shape) -> list[int]:
    """ggml ne (4 entries) of a numpy shape."""
    ne = list(reversed(shape))
    return ne + [1] * (4 - len(ne))


class Graph:
    """One session, one graph. Declare persistent tensors with ``weight``, then
    call ``build()``; graph inputs made with ``inp`` are uploaded after realize."""

    def __init__(self, s):
        self.s = s
        self._weights: list = []
        self._feeds: list = []

    # -- before finalize
    def weight(self, tensor, data):
        """A persistent tensor and what to upload into it (F32 array, or raw bytes); None = leave zero."""
        self._weights.append((tensor, data))
        return tensor

    def weight_typed(self, arr: np.ndarray, type_id: int):
        """A persistent [.., rows, cols] tensor of ``type_id`` holding ``arr`` (quantized by ggml's quantizer).
        Returns (tensor, the float64 values the tensor actually holds)."""
        arr = np.asarray(arr, np.float32)
        ne = ne_of(arr.shape)
        if arr.ndim == 2:
            t = T.tnn_input_2d_persistent_typed(self.s, arr.shape[0], arr.shape[1], type_id)
        else:
            assert arr.ndim == 3
            t = T.tnn_input_3d_persistent_typed(self.s, ne[0], ne[1], ne[2], type_id)
        rows = arr.reshape(-1, ne[0])
        if type_id == GGML_TYPE_F32:
            raw, held = rows, rows.astype(np.float64)
        else:
            raw = quantize(type_id, rows)
            held = dequantize(type_id, raw, rows.size).astype(np.float64)
        self._weights.append((t, raw))
        return t, held.reshape(arr.shape)

    def finalize(self):
        T.tnn_finalize_weights(self.s)
        for t, data in self._weights:
            if data is not None:
                upload(self.s, t, data)
        T.tnn_reset_for_rebuild(self.s)

    # -- graph inputs
    def inp(self, arr: np.ndarray, type_id: int = GGML_TYPE_F32):
        arr = np.asarray(arr)
        if type_id == GGML_TYPE_I32:
            assert arr.ndim == 1
            t = T.tnn_input_1d_i32(self.s, arr.size)
            data = arr.astype(np.int32)
        elif arr.ndim == 2 and type_id == GGML_TYPE_F32:
            t = T.tnn_input_2d_f32(self.s, arr.shape[0], arr.shape[1])
            data = arr.astype(np.float32)
        else:
            t = T.tnn_input_4d(self.s, type_id, *ne_of(arr.shape))
            data = arr.astype(np.float16) if type_id == GGML_TYPE_F16 else arr.astype(np.float32)
        self._feeds.append((t, data))
        return t

    def run(self, out) -> np.ndarray:
        T.tnn_realize(self.s, out)
        for t, data in self._feeds:
            upload(self.s, t, data)
        T.tnn_compute(self.s)
        return download(self.s, out).astype(np.float64)


def rng_normal(seed: int, *shape, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def check_close(family: str, got: np.ndarray, ref: np.ndarray, tol) -> None:
    """max |got - ref| <= tol (tol: scalar or array broadcastable to ref)."""
    got = np.asarray(got, np.float64).reshape(ref.shape)
    err = np.abs(got - ref)
    assert np.all(np.isfinite(got)), f"{family}: non-finite output"
    record(family, err.max(initial=0.0))
    tol = np.broadcast_to(np.asarray(tol, np.float64), err.shape)
    if np.any(tol > 0):
        ratio = np.where(tol > 0, err / np.where(tol > 0, tol, 1.0), 0.0)
        TOL_USED[family] = max(TOL_USED[family], float(ratio.max(initial=0.0)))
    bad = err > tol
    assert not bad.any(), (
        f"{family}: max err {err.max():.3e} exceeds tolerance at {np.argwhere(bad)[:3].tolist()} "
        f"(got {got[bad][:3]}, want {ref[bad][:3]})")


# =========================================================================== matmul

# Tolerance on |out - ref| as a multiple of ||x_row|| * ||w_row|| (ref = x @ dequantize(W)^T in float64,
# so weight quantization error is *not* part of the error; what remains is how ggml computes the dot).
# Data: Gaussian x and W, any scale. A wrong row, block or scale gives an error of order
# 1/sqrt(k) >= 0.06 in these units (k <= 256 for the 32-blocks, 512 for K-quants), far above these.
MATMUL_TOL = {
    # fp32 dot: |fl(sum) - sum| <= gamma_k * sum|x_i w_i| <= k * 2^-24 * ||x|| ||w|| = 1.5e-5 for k = 256.
    GGML_TYPE_F32: 2e-5,
    # x is rounded to fp16 (vec_dot_type F16): relative 2^-11 = 4.9e-4 per element, so the error is
    # <= 4.9e-4 * sum|x_i w_i| <= 4.9e-4 ||x|| ||w|| (Cauchy-Schwarz), plus fp32 accumulation.
    GGML_TYPE_F16: 6e-4,
    # x is quantized to Q8_0 (Q8_1 for Q4_1): per element |e| <= d/2, d = amax_block/127. The error
    # sum_i w_i e_i behaves like a sum of independent terms: std ~ ||w|| * rms(d)/sqrt(12), i.e.
    # ~ 5.7e-3/sqrt(k) ||x|| ||w|| for Gaussian x (amax of 32 ~ 2.5 sigma) = 1.0e-3 at k = 32, the worst
    # case. 8e-3 is ~8 sigma there and a third of the Cauchy-Schwarz worst case (0.025).
    GGML_TYPE_Q8_0: 8e-3,
    GGML_TYPE_Q4_0: 8e-3,
    GGML_TYPE_Q4_1: 8e-3,
    GGML_TYPE_Q5_0: 8e-3,
    # K-quants: x is quantized to Q8_K (one scale per 256, d = amax_256/127, amax ~ 3.5 sigma):
    # std ~ 8e-3/sqrt(k) = 5e-4 at k = 256; 5e-3 is ~10 sigma.
    GGML_TYPE_Q4_K: 5e-3,
    GGML_TYPE_Q5_K: 5e-3,
    GGML_TYPE_Q6_K: 5e-3,
}
TYPE_NAMES = {GGML_TYPE_F32: "F32", GGML_TYPE_F16: "F16", GGML_TYPE_BF16: "BF16", GGML_TYPE_Q8_0: "Q8_0",
              GGML_TYPE_Q4_0: "Q4_0", GGML_TYPE_Q4_1: "Q4_1", GGML_TYPE_Q5_0: "Q5_0", GGML_TYPE_Q5_1: "Q5_1",
              GGML_TYPE_Q2_K: "Q2_K", GGML_TYPE_Q3_K: "Q3_K", GGML_TYPE_Q4_K: "Q4_K", GGML_TYPE_Q5_K: "Q5_K",
              GGML_TYPE_Q6_K: "Q6_K"}
K_QUANTS = {GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K}


def matmul_tol(type_id, X, Wh):
    """Per-entry tolerance array [n, m] for x @ Wh^T."""
    nx = np.linalg.norm(X.astype(np.float64), axis=-1)[..., :, None]
    nw = np.linalg.norm(Wh, axis=-1)[..., None, :]
    return MATMUL_TOL[type_id] * nx * nw + 1e-30


@pytest.mark.parametrize("type_id", list(MATMUL_TOL), ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(20), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_matmul(type_id, data, seed):
    blk = 256 if type_id in K_QUANTS else 32
    k = blk * data.draw(st.integers(1, 2 if blk == 256 else 8), label="k blocks")
    m = data.draw(st.integers(1, 16), label="rows of W")
    n = data.draw(st.integers(1, 9), label="tokens")
    scale = data.draw(st.sampled_from([1e-3, 1.0, 50.0]), label="x scale")
    W = rng_normal(seed, m, k)
    X = rng_normal(seed + 1, n, k, scale=scale)
    with session() as s:
        g = Graph(s)
        w, Wh = g.weight_typed(W, type_id)
        g.finalize()
        y = T.tnn_matmul(s, w, g.inp(X))
        assert [T.tnn_tensor_ne(y, d) for d in range(4)] == [m, n, 1, 1]
        out = g.run(y)
    ref = X.astype(np.float64) @ Wh.T
    tol = matmul_tol(type_id, X, Wh)
    check_close(f"matmul[{TYPE_NAMES[type_id]}]", out, ref, tol)
    err = np.abs(out.reshape(ref.shape) - ref)
    record(f"matmul[{TYPE_NAMES[type_id]}] err/(|x||w|)", (err / (tol / MATMUL_TOL[type_id])).max())


TILED_TYPES = [GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q8_0]
needs_tiles = pytest.mark.skipif(TEST_BACKEND != "cpu" or not all(T.tnn_tiles_available(t) for t in TILED_TYPES),
                                 reason="the tiled kernels run on x86-64 CPUs with AVX2/FMA/F16C only")


@needs_tiles
@pytest.mark.parametrize("type_id", TILED_TYPES, ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(30), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_mul_mat_tiles(type_id, data, seed):
    """The tiled kernels: bit for bit ggml_mul_mat (tnn_matmul) on the same weight and input, on every
    drawn shape (column counts around the 4-column tiles and the one-column path, row counts around
    the 64-row blocks, the 2-row groups and the thread split, weight-row views as the per-head graph
    takes), and float64 numpy within the type's matmul tolerance. ggml's kernel for 2 or more columns
    differs by type (Q4_1: vec_dot per row and column; Q5_0, Q8_0: tinyBLAS), and for one column is
    vec_dot for all three, so each has its own reduction order to match."""
    k = 32 * data.draw(st.integers(1, 24), label="k blocks")
    m = data.draw(st.integers(1, 140), label="rows of W")
    n = data.draw(st.sampled_from([1, 1, 2]) | st.integers(1, 13), label="tokens")
    r0 = data.draw(st.integers(0, m - 1), label="first row of the view")
    rows = data.draw(st.integers(1, m - r0), label="rows of the view")
    threads = data.draw(st.integers(1, 4), label="threads")
    scale = data.draw(st.sampled_from([1e-3, 1.0, 50.0]), label="x scale")
    W = rng_normal(seed, m, k)
    X = rng_normal(seed + 1, n, k, scale=scale)
    outs = []
    for mm in (T.tnn_matmul, T.tnn_mul_mat_tiles):
        with session() as s:
            T.tnn_session_set_n_threads(s, threads)
            g = Graph(s)
            w, Wh = g.weight_typed(W, type_id)
            wv = T.tnn_view_2d_persistent(s, w, k, rows, T.tnn_tensor_nb(w, 1), r0 * T.tnn_tensor_nb(w, 1))
            g.finalize()
            y = mm(s, wv, g.inp(X))
            assert [T.tnn_tensor_ne(y, d) for d in range(4)] == [rows, n, 1, 1]
            outs.append(g.run(y).astype(np.float32))
    name = TYPE_NAMES[type_id]
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)), f"tiled {name} differs from ggml_mul_mat"
    Wv = Wh[r0:r0 + rows]
    ref = X.astype(np.float64) @ Wv.T
    check_close(f"mul_mat_tiles[{name}]", outs[1].astype(np.float64), ref, matmul_tol(type_id, X, Wv))


@needs_tiles
def test_mul_mat_tiles_checks_its_operands():
    with session() as s:
        g = Graph(s)
        w32, _ = g.weight_typed(np.zeros((4, 64), np.float32), GGML_TYPE_F32)
        w41, _ = g.weight_typed(np.zeros((4, 64), np.float32), GGML_TYPE_Q4_1)
        g.finalize()
        x = g.inp(np.zeros((3, 64), np.float32))
        with pytest.raises(T.TinyNNError, match="tnn_mul_mat_tiles: 'w' must be q4_1, q5_0 or q8_0 and 'x' f32, got f32"):
            T.tnn_mul_mat_tiles(s, w32, x)
        with pytest.raises(T.TinyNNError, match="tnn_mul_mat_tiles: w .K, M. and x .K, N. must be 2-D"):
            T.tnn_mul_mat_tiles(s, w41, g.inp(np.zeros((3, 32), np.float32)))
        with pytest.raises(T.TinyNNError, match="must be 2-D"):
            T.tnn_mul_mat_tiles(s, w41, T.tnn_input_4d(s, GGML_TYPE_F32, 64, 3, 2, 1))
        with pytest.raises(T.TinyNNError, match="contiguous rows"):
            T.tnn_mul_mat_tiles(s, w41, T.tnn_permute(s, g.inp(np.zeros((64, 3), np.float32)), 1, 0, 2, 3))
        with pytest.raises(T.TinyNNError, match="'w'"):
            T.tnn_mul_mat_tiles(s, None, x)
        # the query decides as tnn_mul_mat_tiles does, without an error
        assert T.tnn_tiles_apply(s, w41, x) == 1
        assert T.tnn_tiles_apply(s, w32, x) == 0
        assert T.tnn_tiles_apply(s, w41, g.inp(np.zeros((3, 32), np.float32))) == 0
    assert T.tnn_tiles_available(GGML_TYPE_F32) == 0 and T.tnn_tiles_available(-1) == 0 and T.tnn_tiles_available(10**6) == 0


@settings(max_examples=ex(10), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_matmul_batched_broadcast(data, seed):
    """3-D matmul: w [k, m, b_w] against x [k, n, b_x] with b_x a multiple of b_w (x batch j uses w batch j // r)."""
    k = 32 * data.draw(st.integers(1, 4))
    m, n = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 6))
    bw = data.draw(st.integers(1, 3))
    r = data.draw(st.integers(1, 3))
    W = rng_normal(seed, bw, m, k)
    X = rng_normal(seed + 1, bw * r, n, k)
    with session() as s:
        g = Graph(s)
        w, Wh = g.weight_typed(W, GGML_TYPE_F32)
        g.finalize()
        out = g.run(T.tnn_matmul(s, w, g.inp(X)))
    ref = np.stack([X[j].astype(np.float64) @ Wh[j // r].T for j in range(bw * r)])
    check_close("matmul[F32] batched broadcast", out, ref, matmul_tol(GGML_TYPE_F32, X, Wh[np.arange(bw * r) // r]))


# =========================================================================== element-wise, norms, softmax

shapes3 = st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 70))  # numpy (ne2, ne1, ne0)
U = 2.0**-24  # fp32 unit roundoff


def run_unary(shape, seed, op, scale=1.0):
    X = rng_normal(seed, *shape, scale=scale)
    with session() as s:
        g = Graph(s)
        g.finalize()
        out = g.run(op(s, g.inp(X)))
    return X.astype(np.float64), out


@settings(max_examples=ex(25), **SETTINGS)
@given(shape=shapes3, seed=seeds, eps=st.sampled_from([0.0, 1e-6, 1e-5, 1e-2]), with_gamma=st.booleans())
def test_rms_norm(shape, seed, eps, with_gamma):
    X = rng_normal(seed, *shape, scale=3.0)
    G = rng_normal(seed + 7, shape[-1])
    with session() as s:
        g = Graph(s)
        gamma = g.weight(T.tnn_input_1d_f32_persistent(s, shape[-1]), G) if with_gamma else None
        g.finalize()
        out = g.run(T.tnn_rms_norm(s, g.inp(X), gamma, eps))
    x = X.astype(np.float64)
    ref = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    if with_gamma:
        ref = ref * G
    # sum of squares in double, one sqrtf, one or two fp32 multiplies: a few ulps of each output
    check_close("rms_norm" + ("*gamma" if with_gamma else ""), out, ref, 8 * U * np.abs(ref) + 1e-30)


@settings(max_examples=ex(25), **SETTINGS)
@given(shape=shapes3, seed=seeds, scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_softmax(shape, seed, scale):
    x, out = run_unary(shape, seed, T.tnn_softmax, scale)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    ref = e / e.sum(axis=-1, keepdims=True)
    # expf (~1 ulp), a double sum, one fp32 multiply: outputs are in [0, 1], errors of a few ulps of 1;
    # the argument x - max is rounded in fp32 (|x| <= ~50): d(exp) <= exp * 50 * 2^-24
    check_close("softmax", out, ref, 1e-6 + 64 * U * np.abs(x).max() * ref)


@settings(max_examples=ex(25), **SETTINGS)
@given(data=st.data(), seed=seeds, scale=st.sampled_from([1.0, 0.125, 0.37]),
       max_bias=st.sampled_from([0.0, 8.0]), mask_f16=st.booleans())
def test_softmax_ext_mask_scale(data, seed, scale, max_bias, mask_f16):
    """softmax(a*scale + slope_h*mask) with a causal+random mask broadcast over heads (ALiBi slopes when max_bias>0)."""
    n_kv = data.draw(st.integers(1, 40), label="n_kv")
    n_q = data.draw(st.integers(1, 8), label="n_q")
    n_head = data.draw(st.integers(1, 6), label="n_head")
    extra_rows = data.draw(st.integers(0, 3), label="mask rows beyond n_q")
    rng = np.random.default_rng(seed)
    A = rng_normal(seed, n_head, n_q, n_kv, scale=4.0)
    M = rng.uniform(-3, 1, size=(n_q + extra_rows, n_kv)).astype(np.float32)
    past = n_kv - n_q
    for i in range(n_q):  # causal: query i sees keys <= past + i (at least key 0)
        M[i, max(past + i + 1, 1):] = -np.inf
    if mask_f16:
        M = M.astype(np.float16).astype(np.float32)
    with session() as s:
        g = Graph(s)
        g.finalize()
        mask = g.inp(M, GGML_TYPE_F16 if mask_f16 else GGML_TYPE_F32)
        out = g.run(T.tnn_softmax_ext(s, g.inp(A), mask, scale, max_bias))
    n_head_log2 = 1 << int(math.floor(math.log2(n_head)))
    m0, m1 = 2.0 ** (-max_bias / n_head_log2), 2.0 ** (-(max_bias / 2.0) / n_head_log2)
    slopes = np.array([(m0 ** (h + 1) if h < n_head_log2 else m1 ** (2 * (h - n_head_log2) + 1)) if max_bias > 0
                       else 1.0 for h in range(n_head)])
    with np.errstate(invalid="ignore"):
        z = A.astype(np.float64) * scale + slopes[:, None, None] * M[None, :n_q, :].astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    ref = e / e.sum(axis=-1, keepdims=True)
    assert np.all(out.reshape(ref.shape)[np.isinf(z)] == 0.0), "masked positions must be exactly 0"
    check_close("softmax_ext(mask,scale,alibi)", out, ref, 1e-6 + 64 * U * np.abs(z[np.isfinite(z)]).max() * ref)


@settings(max_examples=ex(20), **SETTINGS)
@given(shape=shapes3, seed=seeds, factor=st.sampled_from([0.0, -1.0, 0.125, 3.7, 1e3]))
def test_scale(shape, seed, factor):
    x, out = run_unary(shape, seed, lambda s, t: T.tnn_scale(s, t, factor))
    ref = x * np.float64(np.float32(factor))
    check_close("scale", out, ref, U * np.abs(ref) + 1e-45)  # one correctly rounded fp32 multiply


@st.composite
def broadcast_pair(draw):
    """a's numpy shape (1-4 dims) and b's: each a dim is b's times a repeat count (ggml_can_repeat)."""
    nd = draw(st.integers(1, 4))
    b_shape = [draw(st.integers(1, 4)) for _ in range(nd)]
    a_shape = [b * draw(st.sampled_from([1, 1, 2, 3])) for b in b_shape]
    return tuple(a_shape), tuple(b_shape)


@settings(max_examples=ex(30), **SETTINGS)
@given(pair=broadcast_pair(), seed=seeds, which=st.sampled_from(["add", "mul"]))
def test_add_mul_broadcast(pair, seed, which):
    """ggml broadcasting repeats b whole (a.ne[i] a multiple of b.ne[i]): numpy np.tile, not numpy broadcasting."""
    a_shape, b_shape = pair
    A = rng_normal(seed, *a_shape)
    B = rng_normal(seed + 1, *b_shape)
    with session() as s:
        g = Graph(s)
        g.finalize()
        fn = T.tnn_add if which == "add" else T.tnn_mul
        out = g.run(fn(s, g.inp(A), g.inp(B)))
    Bt = np.tile(B.astype(np.float64), [a // b for a, b in zip(a_shape, b_shape)])
    ref = A + Bt if which == "add" else A * Bt
    check_close(f"{which} (broadcast)", out, ref, U * np.abs(ref) + 1e-45)  # one rounded op


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@settings(max_examples=ex(25), **SETTINGS)
@given(shape=shapes3, seed=seeds, scale=st.sampled_from([0.5, 3.0, 12.0]),
       which=st.sampled_from(["silu", "gelu", "tanh"]))
def test_unary(shape, seed, scale, which):
    op = {"silu": T.tnn_silu, "gelu": T.tnn_gelu, "tanh": T.tnn_tanh}[which]
    x, out = run_unary(shape, seed, op, scale)
    if which == "silu":
        ref = x / (1.0 + np.exp(-x))
        tol = 8 * U * (np.abs(ref) + np.abs(x))  # expf + divide, a few ulps
    elif which == "tanh":
        ref = np.tanh(x)
        tol = 8 * U + 0 * x
    else:
        ref = gelu_tanh(x)
        # ggml's CPU gelu looks x up in a 64k-entry table indexed by fp16(x) (identity for x >= 10, 0 for
        # x <= -10): the input is rounded to fp16 (|dx| <= |x| 2^-11, |gelu'| <= 1.13) and the table
        # entry is an fp16 (|dy| <= |y| 2^-11); below fp16's normal range its absolute step 2^-24 applies.
        tol = 1.13 * np.abs(x) * 2.0**-11 + np.abs(ref) * 2.0**-11 + 2.0**-23
    check_close(which, out, ref, tol)


@settings(max_examples=ex(20), **SETTINGS)
@given(shape=shapes3, seed=seeds, scale=st.sampled_from([0.5, 3.0, 12.0]))
def test_swiglu_split(shape, seed, scale):
    """silu(a) * b in one op: float64 numpy within a few ulps, and bit for bit the two ops it fuses
    (tnn_silu then tnn_mul), which the graph used before."""
    A = rng_normal(seed, *shape, scale=scale)
    B = rng_normal(seed + 1, *shape)
    with session() as s:
        g = Graph(s)
        g.finalize()
        a, b = g.inp(A), g.inp(B)
        fused = g.run(T.tnn_swiglu_split(s, a, b))
    with session() as s:
        g = Graph(s)
        g.finalize()
        two = g.run(T.tnn_mul(s, T.tnn_silu(s, g.inp(A)), g.inp(B)))
    x, y = A.astype(np.float64), B.astype(np.float64)
    ref = x / (1.0 + np.exp(-x)) * y
    check_close("swiglu_split", fused, ref, 9 * U * (np.abs(ref) + np.abs(x * y)))
    assert np.array_equal(fused.view(np.uint32), two.view(np.uint32))


def test_swiglu_split_checks_its_operands():
    with session() as s:
        g = Graph(s)
        g.finalize()
        a, b = g.inp(np.zeros((4, 6), np.float32)), g.inp(np.zeros((4, 3), np.float32))
        with pytest.raises(T.TinyNNError, match="tnn_swiglu_split: a and b must have the same shape"):
            T.tnn_swiglu_split(s, a, b)


@settings(max_examples=ex(20), **SETTINGS)
@given(shape=shapes3, seed=seeds)
def test_sum_rows(shape, seed):
    x, out = run_unary(shape, seed, T.tnn_sum_rows)
    ref = x.sum(axis=-1, keepdims=True)
    # summation error <= gamma_n * sum|x| (n <= 70), then one rounding to fp32
    check_close("sum_rows", out, ref, (shape[-1] * U) * np.abs(x).sum(axis=-1, keepdims=True) + U * np.abs(ref))


# =========================================================================== layout: concat, transpose, reshape, views


@settings(max_examples=ex(20), **SETTINGS)
@given(seed=seeds, dim=st.sampled_from([0, 1]), shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 9)),
       extra=st.integers(1, 5))
def test_concat(seed, dim, shape, extra):
    A = rng_normal(seed, *shape)
    b_shape = list(shape)
    b_shape[2 - dim] = extra  # ggml dim d is numpy axis ndim-1-d
    B = rng_normal(seed + 1, *b_shape)
    with session() as s:
        g = Graph(s)
        g.finalize()
        out = g.run(T.tnn_concat(s, g.inp(A), g.inp(B), dim))
    ref = np.concatenate([A, B], axis=2 - dim).astype(np.float64)
    check_close(f"concat(dim {dim})", out, ref, 0.0)


@settings(max_examples=ex(15), **SETTINGS)
@given(seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)))
def test_transpose(seed, shape):
    A = rng_normal(seed, *shape)
    with session() as s:
        g = Graph(s)
        g.finalize()
        y = T.tnn_transpose(s, g.inp(A))
        assert [T.tnn_tensor_ne(y, d) for d in range(3)] == [shape[1], shape[2], shape[0]]
        out = g.run(y)
    check_close("transpose", out, np.swapaxes(A, -1, -2).astype(np.float64), 0.0)


@settings(max_examples=ex(15), **SETTINGS)
@given(seed=seeds, n=st.sampled_from([1, 6, 12, 24, 60]), data=st.data())
def test_reshape(seed, n, data):
    divs = [d for d in range(1, n + 1) if n % d == 0]
    a0 = data.draw(st.sampled_from(divs))
    b0 = data.draw(st.sampled_from(divs))
    b1 = data.draw(st.sampled_from([d for d in range(1, n // b0 + 1) if (n // b0) % d == 0]))
    A = rng_normal(seed, n // a0, a0)
    with session() as s:
        g = Graph(s)
        g.finalize()
        x = g.inp(A)
        r2 = T.tnn_reshape_2d(s, x, b0, n // b0)
        r3 = T.tnn_reshape_3d(s, x, b0, b1, n // (b0 * b1))
        assert [T.tnn_tensor_ne(r3, d) for d in range(3)] == [b0, b1, n // (b0 * b1)]
        # reshapes are views: materialize both (scale by 1) and concatenate to realize one graph
        y = T.tnn_concat(s, T.tnn_scale(s, r2, 1.0), T.tnn_reshape_2d(s, T.tnn_scale(s, r3, 1.0), b0, n // b0), 1)
        out = g.run(y)
    flat = A.reshape(-1).astype(np.float64)
    check_close("reshape", out, np.concatenate([flat, flat]).reshape(2 * n // b0, b0), 0.0)


@settings(max_examples=ex(25), **SETTINGS)
@given(seed=seeds, data=st.data())
def test_views(seed, data):
    rows, cols = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 12))
    A = rng_normal(seed, rows, cols)
    flat = A.reshape(-1).astype(np.float64)
    n = rows * cols
    # view_1d: ne0 elements from element offset o
    o = data.draw(st.integers(0, n - 1))
    ne0 = data.draw(st.integers(1, n - o))
    # view_2d: ne1 rows of ne0b elements, row stride nb1 (in elements, >= 1), from element offset o2
    nb1 = data.draw(st.integers(1, cols + 2))
    ne0b = data.draw(st.integers(1, min(nb1, cols)))
    o2 = data.draw(st.integers(0, n - ne0b))
    max_rows = (n - o2 - ne0b) // nb1 + 1
    # ggml also requires the view's dense size (ne0*ne1) to fit after the offset
    max_rows = min(max_rows, (n - o2) // ne0b)
    ne1 = data.draw(st.integers(1, max_rows))
    with session() as s:
        g = Graph(s)
        g.finalize()
        x = g.inp(A)
        v1 = T.tnn_view_1d(s, x, ne0, 4 * o)
        v2 = T.tnn_view_2d(s, x, ne0b, ne1, 4 * nb1, 4 * o2)
        y = T.tnn_concat(s, T.tnn_cont(s, T.tnn_reshape_2d(s, T.tnn_cont(s, v1), ne0, 1)),
                         T.tnn_reshape_2d(s, T.tnn_cont(s, v2), ne0b * ne1, 1), 0)
        out = g.run(y)
    ref1 = flat[o:o + ne0]
    ref2 = np.concatenate([flat[o2 + r * nb1: o2 + r * nb1 + ne0b] for r in range(ne1)])
    check_close("view_1d/view_2d", out, np.concatenate([ref1, ref2])[None, :], 0.0)


# =========================================================================== rope (llama.cpp's rope_yarn, ported)


def rope_yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow):
    """ggml.c ggml_rope_yarn_corr_dims, in fp32 like the C (floorf/ceilf of an fp32 expression)."""
    f = np.float32

    def corr_dim(n_rot):
        return f(n_dims) * np.log(f(n_ctx_orig) / (f(n_rot) * f(2) * f(math.pi))) / (f(2) * np.log(f(freq_base)))

    with np.errstate(divide="ignore"):
        start = math.floor(corr_dim(beta_fast))
        end = math.ceil(corr_dim(beta_slow))
    return max(0.0, start), min(n_dims - 1.0, end)


def rope_ref(x, pos, n_dims, mode, freq_base=10000.0, freq_scale=1.0, ext_factor=0.0, attn_factor=1.0,
             beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0, freq_factors=None):
    """ggml-cpu ops.cpp rope (rope_yarn + rope_yarn_ramp + ggml_rope_cache_init + rotate_pairs) in float64.
    x: numpy (n_tokens, n_head, head_dim) = ggml ne [head_dim, n_head, n_tokens]."""
    x = np.asarray(x, np.float64)
    out = x.copy()
    i = np.arange(n_dims // 2)                                   # pair index, i0 = 2i
    theta_scale = freq_base ** (-2.0 / n_dims)
    theta_extrap = np.asarray(pos, np.float64)[:, None] * theta_scale ** i[None, :]   # [T, n_dims/2]
    if freq_factors is not None:
        theta_extrap = theta_extrap / np.asarray(freq_factors, np.float64)[None, : n_dims // 2]
    theta_interp = freq_scale * theta_extrap
    mscale = attn_factor
    if ext_factor != 0.0:
        low, high = rope_yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow)
        y = (i - low) / max(0.001, high - low)                     # rope_yarn_ramp, (i0/2 - low)/...
        ramp_mix = (1.0 - np.minimum(1.0, np.maximum(0.0, y))) * ext_factor
        theta = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    else:
        theta = theta_interp
    cos, sin = (np.cos(theta) * mscale)[:, None, :], (np.sin(theta) * mscale)[:, None, :]
    if mode == ROPE_NORMAL:    # pairs (2i, 2i+1)
        a, b = 2 * i, 2 * i + 1
    else:                      # NEOX: pairs (i, i + n_dims/2)
        a, b = i, i + n_dims // 2
    x0, x1 = x[..., a], x[..., b]
    out[..., a] = x0 * cos - x1 * sin
    out[..., b] = x0 * sin + x1 * cos
    return out


@st.composite
def rope_case(draw):
    d = 2 * draw(st.integers(1, 40))
    n_dims = 2 * draw(st.integers(1, d // 2)) if draw(st.booleans()) else d
    case = dict(
        d=d, n_dims=n_dims, n_head=draw(st.integers(1, 4)), n_tok=draw(st.integers(1, 6)),
        mode=draw(st.sampled_from([ROPE_NORMAL, ROPE_NEOX])),
        freq_base=draw(st.sampled_from([10000.0, 500000.0, 1e6, 100.0])),
        max_pos=draw(st.sampled_from([8, 512, 4096, 32768])),
        freq_scale=1.0, ext_factor=0.0, attn_factor=1.0, n_ctx_orig=0, freq_factors=False,
    )
    kind = draw(st.sampled_from(["plain", "linear", "yarn", "factors"]))
    if kind == "linear":
        case.update(freq_scale=draw(st.sampled_from([0.5, 0.25])))
    elif kind == "yarn":
        case.update(freq_scale=draw(st.sampled_from([0.5, 0.25, 0.125])), ext_factor=draw(st.sampled_from([1.0, 0.5])),
                    attn_factor=draw(st.sampled_from([1.0, 0.9])), n_ctx_orig=draw(st.sampled_from([2048, 4096, 8192])))
    elif kind == "factors":
        case.update(freq_factors=True)
    case["kind"] = kind
    return case


@settings(max_examples=ex(120), **SETTINGS)
@given(c=rope_case(), seed=seeds)
def test_rope_ext(c, seed):
    rng = np.random.default_rng(seed)
    d, n_dims, H, Tn = c["d"], c["n_dims"], c["n_head"], c["n_tok"]
    X = rng_normal(seed, Tn, H, d)
    pos = rng.integers(0, c["max_pos"], size=Tn).astype(np.int32)
    # llama3-style factors: 1 for high frequencies, up to 8 for low ones, smooth in between
    ff = np.clip(np.linspace(1.0, 8.0, d // 2) + rng.uniform(-0.5, 0.5, d // 2), 1.0, 8.0).astype(np.float32)
    with session() as s:
        g = Graph(s)
        fft = g.weight(T.tnn_rope_freq_factors_alloc(s, d), ff) if c["freq_factors"] else None
        g.finalize()
        x = T.tnn_input_4d(s, GGML_TYPE_F32, d, H, Tn, 1)
        g._feeds.append((x, X))
        p = g.inp(pos, GGML_TYPE_I32)
        y = T.tnn_rope_ext(s, x, p, n_dims, c["freq_base"], c["freq_scale"], c["ext_factor"], c["attn_factor"],
                           32.0, 1.0, fft, c["mode"], c["n_ctx_orig"])
        out = g.run(y)
    ref = rope_ref(X, pos, n_dims, c["mode"], c["freq_base"], c["freq_scale"], c["ext_factor"], c["attn_factor"],
                   32.0, 1.0, c["n_ctx_orig"], ff if c["freq_factors"] else None)
    # ggml builds theta_i = p * theta_scale^i by i fp32 multiplications by theta_scale, itself an fp32
    # powf (<= 1 ulp = 2 * 2^-24 relative): theta_i's relative error is <= (3i + 2) 2^-24 (the +2 for
    # the YaRN mix / freq-factor division), an absolute angle error <= p * max_i (3i+2) s^i 2^-24. The
    # output moves by at most |x| * mscale * that, plus a few fp32 roundings of the rotation.
    mscale = c["attn_factor"] * ((1.0 + 0.1 * math.log(1.0 / c["freq_scale"])) if c["ext_factor"] else 1.0)
    i = np.arange(n_dims // 2)
    s_ = c["freq_base"] ** (-2.0 / n_dims)
    angle_err = float(pos.max()) * ((3 * i + 2) * s_**i).max() * 2.0**-24
    xmax = np.abs(X).max(axis=-1, keepdims=True).astype(np.float64)
    tol = xmax * mscale * (angle_err + 8 * U)
    check_close(f"rope_ext[{'normal' if c['mode'] == ROPE_NORMAL else 'neox'},{c['kind']}]", out, ref, tol)
    # dims past n_dims pass through untouched
    np.testing.assert_array_equal(out.reshape(ref.shape)[..., n_dims:], X[..., n_dims:])


# =========================================================================== flash attention

FA_TYPES = {"F32": GGML_TYPE_F32, "F16": GGML_TYPE_F16, "Q8_0": GGML_TYPE_Q8_0}


def attention_ref(Q, K, V, scale, softcap, mask):
    """Naive float64 attention. Q (H, n_q, d), K/V (H_kv, n_kv, d), mask (n_q, n_kv) or None.
    Returns (n_q, H, d) = ggml's flash_attn_ext output ne [d, H, n_q]."""
    H, H_kv = Q.shape[0], K.shape[0]
    r = H // H_kv
    out = np.empty((Q.shape[1], H, V.shape[2]))
    for h in range(H):
        s = Q[h] @ K[h // r].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        if mask is not None:
            s = s + mask
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h, :] = p @ V[h // r]
    return out


@pytest.mark.parametrize("kv_type", list(FA_TYPES))
@settings(max_examples=ex(30), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_flash_attn_ext(kv_type, data, seed):
    type_id = FA_TYPES[kv_type]
    d = data.draw(st.sampled_from([32, 64, 128] if type_id == GGML_TYPE_Q8_0 else [8, 24, 32, 64, 128]), label="d")
    n_kv = data.draw(st.integers(1, 48), label="n_kv")
    n_q = data.draw(st.integers(1, min(n_kv, 5)), label="n_q")
    H_kv = data.draw(st.integers(1, 3), label="n_head_kv")
    H = H_kv * data.draw(st.integers(1, 3), label="gqa ratio")
    softcap = data.draw(st.sampled_from([0.0, 0.0, 2.0, 30.0]), label="softcap")
    use_mask = data.draw(st.booleans(), label="causal mask")
    scale = 1.0 / math.sqrt(d)
    Q = rng_normal(seed, H, n_q, d, scale=2.0)
    K = rng_normal(seed + 1, H_kv, n_kv, d, scale=2.0)
    V = rng_normal(seed + 2, H_kv, n_kv, d)
    mask = None
    if use_mask:
        mask = np.zeros((n_q, n_kv), np.float32)
        for i in range(n_q):
            mask[i, n_kv - n_q + i + 1:] = -np.inf
    with session() as s:
        g = Graph(s)
        k, Kh = g.weight_typed(K, type_id)  # raw (quantized) bytes uploaded after finalize
        if type_id == GGML_TYPE_Q8_0:
            # V goes into its Q8_0 tensor through tnn_cpy from an F32 graph input (the KV-cache write path)
            v = T.tnn_input_3d_persistent_typed(s, d, n_kv, H_kv, type_id)
        else:
            v, Vh = g.weight_typed(V, type_id)
        g.finalize()
        q = T.tnn_input_4d(s, GGML_TYPE_F32, d, n_q, H, 1)
        g._feeds.append((q, Q))
        if type_id == GGML_TYPE_Q8_0:
            T.tnn_add_to_graph(s, T.tnn_cpy(s, g.inp(V), v))
        m = g.inp(mask, GGML_TYPE_F16) if use_mask else None
        fa = T.tnn_flash_attn_ext(s, q, k, v, m, scale, 0.0, softcap)
        assert [T.tnn_tensor_ne(fa, i) for i in range(4)] == [d, H, n_q, 1]
        naive = None
        if type_id != GGML_TYPE_Q8_0:
            # the same attention from plain ops: softmax(scale * K q) then V^T p
            kq = T.tnn_matmul(s, k, q)                                      # [n_kv, n_q, H]
            if softcap:
                kq = T.tnn_scale(s, T.tnn_tanh(s, T.tnn_scale(s, kq, scale / softcap)), softcap)
            kq = T.tnn_softmax_ext(s, kq, m, 1.0 if softcap else scale, 0.0)
            kqv = T.tnn_matmul(s, T.tnn_transpose(s, v), kq)                # [d, n_q, H]
            naive = T.tnn_cont(s, T.tnn_permute(s, kqv, 0, 2, 1, 3))        # [d, H, n_q]
            T.tnn_set_output(fa)
            T.tnn_add_to_graph(s, fa)
        out = g.run(naive if naive is not None else fa)
        got_fa = download(s, fa).astype(np.float64) if naive is not None else out
        if type_id == GGML_TYPE_Q8_0:
            Vh = dequantize(type_id, download(s, v, raw=True), V.size).reshape(V.shape).astype(np.float64)
    Qd = Q.astype(np.float64)
    ref = attention_ref(Qd, Kh, Vh, scale, softcap, mask)
    # |d out| <= max|v| * sum_j |d p_j| <= max|v| * 2 max|d s| (softmax is 1-Lipschitz that way; tanh
    # softcapping has slope <= 1). The score error d s depends on how q.k is computed (worst-case
    # bounds: these catch wrong heads/masks/scales/softcaps, which move the output by O(max|v|)):
    sum_abs = max(float((np.abs(Qd[h]) @ np.abs(Kh[h // (H // H_kv)]).T).max()) for h in range(H)) * scale
    vmax = np.abs(Vh).max()
    if type_id == GGML_TYPE_F32:      # fp32 dot: gamma_d * sum|q k|
        ds = d * U * sum_abs
        acc = 16 * U
    elif type_id == GGML_TYPE_F16:    # q rounded to fp16 (2^-11), and V*p accumulated in an fp16 buffer:
        ds = (2.0**-11 + d * U) * sum_abs
        acc = (n_kv + 2) * 2.0**-11   # one fp16 rounding per key (rescale or add), relative to max|v|
    else:                             # q quantized to Q8_0: as for matmul (see MATMUL_TOL)
        ds = MATMUL_TOL[GGML_TYPE_Q8_0] * scale * max(
            float(np.linalg.norm(Qd[h], axis=-1).max() * np.linalg.norm(Kh[h // (H // H_kv)], axis=-1).max())
            for h in range(H))
        acc = 16 * U
    tol = vmax * (2 * ds + acc)
    check_close(f"flash_attn_ext[{kv_type}] vs float64", got_fa, ref, tol)
    if naive is not None:
        # the op-by-op graph makes the same kind of errors (kq through softmax rounded to fp16 for F16 V)
        check_close(f"naive attention graph[{kv_type}] vs float64", out, ref, tol + vmax * 2.0**-10)
        check_close(f"flash_attn_ext vs naive graph[{kv_type}]", got_fa, out, 2 * tol + vmax * 2.0**-10)


# =========================================================================== MoE: top_k + mul_mat_id


@pytest.mark.parametrize("type_id", [GGML_TYPE_F32, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K], ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(15), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_top_k_mul_mat_id(type_id, data, seed):
    rng = np.random.default_rng(seed)
    n_exp = data.draw(st.integers(2, 8), label="n_experts")
    n_used = data.draw(st.integers(1, n_exp), label="n_used")
    n_tok = data.draw(st.integers(1, 5), label="n_tokens")
    k = 256 if type_id in K_QUANTS else 32 * data.draw(st.integers(1, 4), label="k blocks")
    m = data.draw(st.integers(1, 8), label="m")
    n_b = data.draw(st.sampled_from([1, n_used]), label="b rows per token")  # 1: one activation for all experts
    # distinct router logits (ties would make the top-k set ambiguous)
    R = (rng.permutation(n_tok * n_exp).reshape(n_tok, n_exp) + rng.uniform(0, 0.5, (n_tok, n_exp))).astype(np.float32)
    X = rng_normal(seed + 1, n_tok, n_b, k)
    W = rng_normal(seed + 2, n_exp, m, k)
    with session() as s:
        g = Graph(s)
        w, Wh = g.weight_typed(W, type_id)   # [k, m, n_exp]
        g.finalize()
        ids = T.tnn_top_k(s, g.inp(R), n_used)                 # [n_used, n_tok]
        T.tnn_set_output(ids)
        T.tnn_add_to_graph(s, ids)
        y = T.tnn_mul_mat_id(s, w, g.inp(X), ids)              # [m, n_used, n_tok]
        assert [T.tnn_tensor_ne(y, i) for i in range(3)] == [m, n_used, n_tok]
        out = g.run(y).reshape(n_tok, n_used, m)
        got_ids = download(s, ids).reshape(n_tok, n_used)
    want = np.argsort(-R, axis=1)[:, :n_used]
    for t in range(n_tok):  # top_k returns the k largest in no particular order
        assert sorted(got_ids[t].tolist()) == sorted(want[t].tolist()), f"token {t}: {got_ids[t]} vs {want[t]}"
    Xd = X.astype(np.float64)
    ref = np.stack([np.stack([Wh[got_ids[t, e]] @ Xd[t, e % n_b] for e in range(n_used)]) for t in range(n_tok)])
    nx = np.linalg.norm(Xd, axis=-1)                         # [n_tok, n_b]
    nw = np.linalg.norm(Wh, axis=-1)                         # [n_exp, m]
    tol = MATMUL_TOL[type_id] * np.stack([np.stack([nx[t, e % n_b] * nw[got_ids[t, e]] for e in range(n_used)])
                                          for t in range(n_tok)]) + 1e-30
    check_close(f"top_k+mul_mat_id[{TYPE_NAMES[type_id]}]", out, ref, tol)


# =========================================================================== quantized KV cache: view + cpy


def q8_0_blocks(raw: np.ndarray):
    """Q8_0 bytes -> (fp16 scales [n_blocks], int8 quants [n_blocks, 32])."""
    b = raw.reshape(-1, 34)
    return b[:, :2].copy().view(np.float16).ravel(), b[:, 2:].copy().view(np.int8)


@settings(max_examples=ex(30), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_kv_cache_q8_0_view_cpy(data, seed):
    d = 32 * data.draw(st.integers(1, 4), label="d_head blocks")
    max_T = data.draw(st.integers(1, 16), label="cache rows")
    p = data.draw(st.integers(0, max_T - 1), label="position")
    n_new = data.draw(st.integers(1, max_T - p), label="rows written")
    Xrow = rng_normal(seed, n_new, d, scale=data.draw(st.sampled_from([0.01, 1.0, 30.0])))
    rb = T.tnn_row_size(GGML_TYPE_Q8_0, d)
    with session() as s:
        g = Graph(s)
        cache = T.tnn_input_2d_persistent_typed(s, max_T, d, GGML_TYPE_Q8_0)   # ne [d, max_T], zeroed
        g.finalize()
        dst = T.tnn_view_2d(s, cache, d, n_new, rb, p * rb)
        T.tnn_add_to_graph(s, T.tnn_cpy(s, g.inp(Xrow), dst))                   # write rows p..p+n_new-1
        back = T.tnn_view_2d(s, cache, d, n_new, rb, p * rb)                     # ... and read them back
        out = g.run(T.tnn_cpy(s, back, T.tnn_input_2d_f32(s, n_new, d)))
        raw = download(s, cache, raw=True)
    assert raw.size == max_T * rb
    rows = raw.reshape(max_T, rb)
    assert not rows[:p].any() and not rows[p + n_new:].any(), "rows outside the written range changed"
    got_raw = rows[p:p + n_new].reshape(-1)
    want_raw = quantize(GGML_TYPE_Q8_0, Xrow)
    # the graph quantizes with ggml-cpu's SIMD quantize_row_q8_0 (x * (127/amax), round-half-even), the
    # reference with ggml's quantize_row_q8_0_ref (x * (1/(amax/127)), roundf): identical scales, and
    # identical quants except where x*127/amax sits within float rounding of a .5 tie.
    gd, gq = q8_0_blocks(got_raw)
    wd, wq = q8_0_blocks(want_raw)
    np.testing.assert_array_equal(gd, wd)
    xb = Xrow.reshape(-1, 32).astype(np.float64)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    frac = np.abs(np.abs(xb * 127.0 / np.where(amax > 0, amax, 1.0)) % 1.0 - 0.5)
    differ = gq != wq
    assert np.all(frac[differ] < 1e-4) and np.all(np.abs(gq.astype(int) - wq)[differ] == 1), "Q8_0 quants differ"
    record("kv-cache Q8_0 cpy: quants off a tie", float(differ.sum()))
    held = dequantize(GGML_TYPE_Q8_0, got_raw, n_new * d).reshape(n_new, d)
    check_close("kv-cache Q8_0 view+cpy read back", out, held.astype(np.float64), 0.0)
    if not differ.any():
        ref = dequantize(GGML_TYPE_Q8_0, want_raw, n_new * d).reshape(n_new, d).astype(np.float64)
        check_close("kv-cache Q8_0 vs quantize(row)", out, ref, 0.0)


@pytest.mark.parametrize("type_id", [GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0], ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(10), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_set_rows_writes_like_cpy(type_id, data, seed):
    """set_rows puts src row i of every head at row ids[i] of a [d, max_T, heads] cache (ids broadcast
    over the heads, as a decode step writes one position of every KV head), converting exactly as a
    cpy into a view of that row does; every other row stays untouched."""
    d = 32 * data.draw(st.integers(1, 4), label="d_head blocks")
    max_T = data.draw(st.integers(1, 12), label="cache rows")
    heads = data.draw(st.integers(1, 3), label="heads")
    ids = data.draw(st.lists(st.integers(0, max_T - 1), min_size=1, max_size=max_T, unique=True), label="rows")
    X = rng_normal(seed, heads, len(ids), d, scale=data.draw(st.sampled_from([0.01, 1.0, 30.0])))
    rb = T.tnn_row_size(type_id, d)
    with session() as s:
        g = Graph(s)
        by_rows = T.tnn_input_3d_persistent_typed(s, d, max_T, heads, type_id)
        by_cpy = T.tnn_input_3d_persistent_typed(s, d, max_T, heads, type_id)
        g.finalize()
        x = g.inp(X)
        T.tnn_add_to_graph(s, T.tnn_set_rows(s, by_rows, x, g.inp(np.array(ids), GGML_TYPE_I32)))
        for h in range(heads):
            for i, r in enumerate(ids):
                row = T.tnn_view_2d(s, x, d, 1, d * 4, (h * len(ids) + i) * d * 4)
                T.tnn_add_to_graph(s, T.tnn_cpy(s, row, T.tnn_view_2d(s, by_cpy, d, 1, rb, (h * max_T + r) * rb)))
        g.run(T.tnn_scale(s, x, 1.0))
        got, want = download(s, by_rows, raw=True), download(s, by_cpy, raw=True)
    got, want = got.view(np.uint8).reshape(heads, max_T, rb), want.view(np.uint8).reshape(heads, max_T, rb)
    np.testing.assert_array_equal(got, want)
    untouched = np.setdiff1d(np.arange(max_T), ids)
    assert not got[:, untouched].any(), "rows that were not named changed"
    if type_id == GGML_TYPE_F32:
        np.testing.assert_array_equal(got[:, ids].view(np.float32).reshape(X.shape), X)
    record(f"set_rows[{TYPE_NAMES[type_id]}] == cpy", 0.0)


# =========================================================================== get_rows from quantized tables

GET_ROWS_TYPES = [GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_1, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K]


@pytest.mark.parametrize("type_id", GET_ROWS_TYPES, ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(10), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_get_rows(type_id, data, seed):
    blk = 256 if type_id in K_QUANTS else 32
    d = blk * data.draw(st.integers(1, 2 if blk == 256 else 4), label="row blocks")
    n_rows = data.draw(st.integers(1, 20), label="table rows")
    ids = np.array(data.draw(st.lists(st.integers(0, n_rows - 1), min_size=1, max_size=10), label="ids"), np.int32)
    Wt = rng_normal(seed, n_rows, d, scale=2.0)
    with session() as s:
        g = Graph(s)
        table, held = g.weight_typed(Wt, type_id)
        g.finalize()
        out = g.run(T.tnn_get_rows(s, table, g.inp(ids, GGML_TYPE_I32)))
    # get_rows dequantizes with the same to_float as tnn_dequantize: bitwise equal
    check_close(f"get_rows[{TYPE_NAMES[type_id]}]", out, held[ids], 0.0)


# =========================================================================== quantize / dequantize round trip

def _legacy_bound(type_id, xb):
    """Per-element worst-case |dequantize(quantize(x)) - x| for the block-of-32 types, from their formulas:
    rounding to the code grid (<= d/2, or <= |d| where the code range clips one end), plus the error of
    storing d (and the min m) as fp16: |d' - d| <= max(|d| 2^-11, 2^-25) (2^-25: fp16 subnormals),
    times |q| <= the largest code; x (1 + 1e-4) for the quantizer's own fp32 arithmetic."""
    amax = np.abs(xb).max(axis=1, keepdims=True)
    lo, hi = xb.min(axis=1, keepdims=True), xb.max(axis=1, keepdims=True)

    def f16err(v):
        return np.maximum(np.abs(v) * 2.0**-11, 2.0**-25)

    if type_id == GGML_TYPE_Q8_0:    # d = amax/127, q in [-127, 127]
        b = amax / 127 / 2 + 127 * f16err(amax / 127)
    elif type_id == GGML_TYPE_Q4_0:  # d = max/-8, q in [-8, 7]: the +8 end clips to 7, so up to |d|
        b = amax / 8 + 8 * f16err(amax / 8)
    elif type_id == GGML_TYPE_Q5_0:  # d = max/-16, q in [-16, 15]
        b = amax / 16 + 16 * f16err(amax / 16)
    elif type_id == GGML_TYPE_Q4_1:  # d = (max-min)/15, q in [0, 15], m = min
        b = (hi - lo) / 15 / 2 + 15 * f16err((hi - lo) / 15) + f16err(lo)
    elif type_id == GGML_TYPE_Q5_1:  # d = (max-min)/31, q in [0, 31]
        b = (hi - lo) / 31 / 2 + 31 * f16err((hi - lo) / 31) + f16err(lo)
    else:
        raise AssertionError(type_id)
    return b * (1 + 1e-4)


# K-quants have two-level (sub-block, super-block) scales found by a search, so there is no simple
# per-element bound; bound the relative RMS error sqrt(mean err^2)/sqrt(mean x^2) instead. Worst of 400
# random rows (1-4 x 256-1024) measured: Gaussian 0.34/0.17/0.079/0.039/0.021 and with 2% x50 outliers
# 0.52/0.14/0.10/0.064/0.040 for Q2_K..Q6_K; the bounds are ~1.5x those: (Gaussian or offset, outliers).
K_RMS_TOL = {GGML_TYPE_Q2_K: (0.50, 0.75), GGML_TYPE_Q3_K: (0.25, 0.25), GGML_TYPE_Q4_K: (0.12, 0.15),
             GGML_TYPE_Q5_K: (0.06, 0.095), GGML_TYPE_Q6_K: (0.032, 0.06)}
ROUNDTRIP_TYPES = [GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
                   GGML_TYPE_Q5_1, *K_RMS_TOL]


@pytest.mark.parametrize("type_id", ROUNDTRIP_TYPES, ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(15), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_quantize_roundtrip(type_id, data, seed):
    blk = 256 if type_id in K_QUANTS else 32
    n = blk * data.draw(st.integers(1, 4), label="blocks")
    rows = data.draw(st.integers(1, 4), label="rows")
    kind = data.draw(st.sampled_from(["gauss", "offset", "outliers", "tiny", "zeros"]), label="data")
    rng = np.random.default_rng(seed)
    # magnitudes 1e-3..1e2 (x50 outliers, +5 max offsets) keep every fp16 scale/min below fp16's 65504
    X = rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-3, 2)
    if kind == "offset":
        X = X + 5 * np.abs(X).max()
    elif kind == "outliers":
        X[rng.random(X.shape) < 0.02] *= 50
    elif kind == "tiny":
        X = X * 1e-30
    elif kind == "zeros":
        X[:] = 0.0
    X = X.astype(np.float32)
    raw = quantize(type_id, X)
    assert raw.size == rows * T.tnn_row_size(type_id, n)
    Y = dequantize(type_id, raw, X.size).reshape(X.shape).astype(np.float64)
    x = X.astype(np.float64)
    err = np.abs(Y - x)
    name = f"quantize roundtrip[{TYPE_NAMES[type_id]}]" + (f" ({kind})" if kind in ("tiny", "zeros") else "")
    if kind == "zeros":
        check_close(name, Y, x, 0.0)
        return
    if type_id == GGML_TYPE_F16:
        if kind == "tiny":   # below fp16's range: flushes to (signed) zero or the smallest subnormals
            check_close(name, Y, x, 2.0**-24 + np.abs(x))
        else:                # round to nearest: relative 2^-11, absolute 2^-25 in the subnormal range
            check_close(name, Y, x, np.abs(x) * 2.0**-11 + 2.0**-25)
    elif type_id == GGML_TYPE_BF16:   # 8 significant bits, round to nearest even: relative 2^-8
        check_close(name, Y, x, np.abs(x) * 2.0**-8)
    elif type_id in K_RMS_TOL:
        if kind == "tiny":   # scales underflow fp16: everything may become 0; never larger than x
            check_close(name, Y, x, np.abs(x).max() * 1.01)
            return
        rms = np.sqrt((err**2).mean()) / np.sqrt((x**2).mean())
        record(name + " rel-RMS", rms)
        assert rms <= K_RMS_TOL[type_id][kind == "outliers"], f"{name}: relative RMS error {rms:.4f}"
        # and no element is off by more than its super-block's range
        xb = x.reshape(-1, 256)
        check_close(name, Y.reshape(xb.shape), xb, (xb.max(axis=1, keepdims=True) - xb.min(axis=1, keepdims=True)))
    else:
        xb = x.reshape(-1, 32)
        if kind == "tiny":   # the fp16 scale underflows to 0: dequantizes to 0 (or the min)
            check_close(name, Y.reshape(xb.shape), xb, np.abs(xb).max(axis=1, keepdims=True) * 2 + 2.0**-24)
            return
        check_close(name, Y.reshape(xb.shape), xb, _legacy_bound(type_id, xb) + 1e-30)


# =========================================================================== persistent views of weights


class Mapping:
    """Raw tensor bytes in one 64-byte-aligned host buffer, attached as a session's weight mapping
    (what tnn_gguf_load's mmap gives, without a file). Keep it alive as long as the session."""

    def __init__(self, blobs):
        self.offsets, size = [], 0
        for b in blobs:
            self.offsets.append(size)
            size += -(-b.nbytes // 64) * 64
        self._buf = np.zeros(size + 64, np.uint8)
        start = (-self._buf.ctypes.data) % 64
        self.mem = self._buf[start:start + size]
        for off, b in zip(self.offsets, blobs):
            self.mem[off:off + b.nbytes] = np.ascontiguousarray(b).view(np.uint8).ravel()

    def attach(self, s):
        T.tnn_session_attach_weight_mmap(s, T.ffi.cast("void *", self.mem.ctypes.data), self.mem.nbytes)


def weight_bytes(W: np.ndarray, type_id: int):
    """(raw bytes [rows, row_size], the float64 values they hold [rows, cols]) of a float32 matrix."""
    if type_id == GGML_TYPE_F32:
        return W.view(np.uint8).reshape(W.shape[0], -1), W.astype(np.float64)
    raw = quantize(type_id, W)
    return raw.reshape(W.shape[0], -1), dequantize(type_id, raw, W.size).reshape(W.shape).astype(np.float64)


def concat_all(s, ts):
    y = ts[0]
    for t in ts[1:]:
        y = T.tnn_concat(s, y, t, 0)
    return y


@pytest.mark.parametrize("source", ["persistent", "mmap"])
@pytest.mark.parametrize("type_id", [GGML_TYPE_F32, GGML_TYPE_Q8_0], ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(10), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_weight_row_views(source, type_id, data, seed):
    """Each head's rows [h*d, (h+1)*d) of a weight as a tnn_view_2d_persistent of the whole matrix
    (session-persistent or mapped), and each head's piece of a 1-D F32 bias as a [d, 1] view: the
    matmul + bias of the views gives exactly the numbers of the same rows declared on their own."""
    H = data.draw(st.integers(1, 4), label="heads")
    d = data.draw(st.integers(1, 8), label="rows per head")
    k = 32 * data.draw(st.integers(1, 4), label="k blocks")
    n = data.draw(st.integers(1, 6), label="tokens")
    W = rng_normal(seed, H * d, k)
    B = rng_normal(seed + 1, H * d)
    X = rng_normal(seed + 2, n, k)
    raw, Wh = weight_bytes(W, type_id)
    row = T.tnn_row_size(type_id, k)
    heads = [slice(h * d, (h + 1) * d) for h in range(H)]
    with session() as s:
        g = Graph(s)
        if source == "mmap":
            mp = Mapping([raw, B] + [raw[r] for r in heads] + [B[r] for r in heads])
            mp.attach(s)
            w = T.tnn_input_2d_persistent_mmap(s, H * d, k, type_id, mp.offsets[0])
            b = T.tnn_input_1d_persistent_mmap(s, H * d, GGML_TYPE_F32, mp.offsets[1])
            sep = [T.tnn_input_2d_persistent_mmap(s, d, k, type_id, mp.offsets[2 + h]) for h in range(H)]
            sep_b = [T.tnn_input_1d_persistent_mmap(s, d, GGML_TYPE_F32, mp.offsets[2 + H + h]) for h in range(H)]
        else:
            w = g.weight(T.tnn_input_2d_persistent_typed(s, H * d, k, type_id), raw)
            b = g.weight(T.tnn_input_1d_f32_persistent(s, H * d), B)
            sep = [g.weight(T.tnn_input_2d_persistent_typed(s, d, k, type_id), raw[r]) for r in heads]
            sep_b = [g.weight(T.tnn_input_1d_f32_persistent(s, d), B[r]) for r in heads]
        views = [T.tnn_view_2d_persistent(s, w, k, d, row, h * d * row) for h in range(H)]
        bias_views = [T.tnn_view_2d_persistent(s, b, d, 1, d * 4, h * d * 4) for h in range(H)]
        assert [T.tnn_tensor_ne(bias_views[0], i) for i in range(4)] == [d, 1, 1, 1]
        g.finalize()
        x = g.inp(X)
        ys = []
        for h in range(H):
            ys.append(T.tnn_add(s, T.tnn_matmul(s, views[h], x), bias_views[h]))
            ys.append(T.tnn_add(s, T.tnn_matmul(s, sep[h], x), sep_b[h]))
        out = g.run(concat_all(s, ys)).reshape(n, 2 * H, d)
        for h, r in enumerate(heads):
            np.testing.assert_array_equal(download(s, bias_views[h]).ravel(), B[r])
    np.testing.assert_array_equal(out[:, 0::2], out[:, 1::2])     # view == separately declared rows
    for h, r in enumerate(heads):
        ref = X.astype(np.float64) @ Wh[r].T + B[r].astype(np.float64)
        check_close(f"matmul of weight-row views[{TYPE_NAMES[type_id]}] + bias view", out[:, 2 * h], ref,
                    matmul_tol(type_id, X, Wh[r]) + 4 * U * np.abs(ref))


def repack_active(type_id: int, k: int) -> bool:
    """Does a CPU session repack a [16, k] weight of type_id (CPU_REPACK buffer, and ggml takes it)?"""
    s = T.tnn_session_new(0)
    try:
        if T.tnn_session_set_weight_repack(s, 1) != 1:
            return False
        return T.tnn_tensor_is_repacked(s, T.tnn_input_2d_weight_typed(s, 16, k, type_id)) == 1
    finally:
        T.tnn_session_free(s)


@pytest.mark.parametrize("source", ["mmap", "upload"])
@pytest.mark.parametrize("type_id", [GGML_TYPE_Q4_0, GGML_TYPE_Q4_K], ids=lambda t: TYPE_NAMES[t])
@settings(max_examples=ex(6), **SETTINGS)
@given(data=st.data(), seed=seeds)
def test_repacked_weight_row_views(source, type_id, data, seed):
    """Views of whole row groups of a weight in ggml's CPU_REPACK layout run ggml's repacked matmul
    (gemv for 1-3 tokens, gemm from 4) and give exactly the numbers of the same rows declared as a
    repacked weight of their own; they are repacked tensors (not readable back)."""
    blk = 256 if type_id in K_QUANTS else 32
    k = blk * data.draw(st.integers(1, 2), label="k blocks")
    if TEST_BACKEND != "cpu" or not repack_active(type_id, k):
        pytest.skip(f"ggml does not repack {TYPE_NAMES[type_id]} weights on this backend/CPU")
    H = data.draw(st.integers(1, 3), label="heads")
    d = 16 * data.draw(st.integers(1, 3), label="16-row groups per head")
    n = data.draw(st.sampled_from([1, 2, 5, 9]), label="tokens")
    W = rng_normal(seed, H * d, k)
    X = rng_normal(seed + 1, n, k)
    raw, Wh = weight_bytes(W, type_id)
    row = T.tnn_row_size(type_id, k)
    heads = [slice(h * d, (h + 1) * d) for h in range(H)]
    with session() as s:
        assert T.tnn_session_set_weight_repack(s, 1) == 1
        g = Graph(s)
        if source == "mmap":
            mp = Mapping([raw] + [raw[r] for r in heads])
            mp.attach(s)
            w = T.tnn_input_2d_weight_mmap(s, H * d, k, type_id, mp.offsets[0])
            sep = [T.tnn_input_2d_weight_mmap(s, d, k, type_id, mp.offsets[1 + h]) for h in range(H)]
        else:
            w = g.weight(T.tnn_input_2d_weight_typed(s, H * d, k, type_id), raw)
            sep = [g.weight(T.tnn_input_2d_weight_typed(s, d, k, type_id), raw[r]) for r in heads]
        views = [T.tnn_view_2d_persistent(s, w, k, d, row, h * d * row) for h in range(H)]
        assert all(T.tnn_tensor_is_repacked(s, t) == 1 for t in [w, *views, *sep])
        g.finalize()
        with pytest.raises(T.TinyNNError, match="cannot be read back"):
            download(s, views[0])
        x = g.inp(X)
        ys = []
        for h in range(H):
            ys += [T.tnn_matmul(s, views[h], x), T.tnn_matmul(s, sep[h], x)]
        out = g.run(concat_all(s, ys)).reshape(n, 2 * H, d)
    np.testing.assert_array_equal(out[:, 0::2], out[:, 1::2])     # view == separately declared rows
    for h, r in enumerate(heads):   # and the repacked kernel read the interleaved bytes right
        ref = X.astype(np.float64) @ Wh[r].T
        check_close(f"repacked matmul of weight-row views[{TYPE_NAMES[type_id]}]", out[:, 2 * h], ref,
                    matmul_tol(type_id, X, Wh[r]))
