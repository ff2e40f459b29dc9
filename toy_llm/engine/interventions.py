"""Changing activations: interventions a tap applies to a hook point as the graph is built.

Built-in ones run inside the graph as ggml ops, at full speed (their values are graph inputs):
:class:`AddVector` (steering, control vectors), :class:`Scale`, :class:`ZeroHeads`,
:class:`Patch`. :class:`PythonHook` runs a Python function on the activation.

How a Python hook runs inside one graph: as a ggml custom op (``tnn_map_hook``, one task) whose
callback hands the activation to Python as a numpy array and writes back what the function
returns. Why: the graph stays one graph, built once and replayed like any other, with one compute
per step; an identity hook copies the bytes, so the numbers downstream are bit for bit those
without it. Splitting the graph at each hook point would cost a graph build and a compute per
hook point and per step. The price: the custom op runs on the CPU backend only, and one thread
holds the GIL while the function runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import tinynn as tnn


class Intervention:
    """Builds ``t``'s replacement: ``build(b, inp, t, name, per_token)`` -> tensor of the same shape.
    ``per_token``: the hook point's shape after the leading [tokens] (hook_points.py)."""

    def build(self, b, inp, t, name: str, per_token: tuple):
        raise NotImplementedError


def _per_token_2d(sess, t, per_token: tuple):
    """``t`` as [elements per token, tokens] (contiguous), for per-token broadcasting ops."""
    k = int(np.prod(per_token))
    n = tnn.tnn_tensor_ne(t, 0) * tnn.tnn_tensor_ne(t, 1) * tnn.tnn_tensor_ne(t, 2) * tnn.tnn_tensor_ne(t, 3) // k
    return tnn.tnn_reshape_2d(sess, t if _is_contiguous(t) else tnn.tnn_cont(sess, t), k, n)


def _like(sess, t2d, t):
    """A [k, n] result back in ``t``'s shape."""
    ne = [tnn.tnn_tensor_ne(t, d) for d in range(3)]
    if tnn.tnn_tensor_ne(t, 3) != 1:
        raise ValueError("hook points have at most 3 dimensions")
    return tnn.tnn_reshape_3d(sess, t2d, *ne)


@dataclass(frozen=True)
class AddVector(Intervention):
    """t + strength * vector at every position (a steering or control vector); ``vector`` has the
    hook point's per-token shape (e.g. [d_model])."""

    vector: np.ndarray
    strength: float = 1.0

    def build(self, b, inp, t, name, per_token):
        v = np.asarray(self.vector, np.float32).reshape(-1)
        if v.size != int(np.prod(per_token)):
            raise ValueError(f"AddVector on {name}: vector has {v.size} elements, the hook point has "
                             f"{int(np.prod(per_token))} per token {list(per_token)}")
        t_v = inp.constant(b.sess, (v * np.float32(self.strength)).astype(np.float32))
        return _like(b.sess, tnn.tnn_add(b.sess, _per_token_2d(b.sess, t, per_token), t_v), t)


@dataclass(frozen=True)
class Scale(Intervention):
    """factor * t."""

    factor: float

    def build(self, b, inp, t, name, per_token):
        return tnn.tnn_scale(b.sess, t, float(self.factor))


@dataclass(frozen=True)
class ZeroHeads(Intervention):
    """Zero the given heads of a per-head hook point ([tokens, heads, d_head]: attn.hook_q/k/v/z)."""

    heads: tuple[int, ...]

    def build(self, b, inp, t, name, per_token):
        if len(per_token) != 2:
            raise ValueError(f"ZeroHeads on {name}: not a per-head hook point (shape [tokens, {per_token}])")
        n_heads, d_head = per_token
        keep = np.ones((n_heads, d_head), np.float32)
        for h in self.heads:
            if not 0 <= int(h) < n_heads:
                raise ValueError(f"ZeroHeads on {name}: head {h} outside 0..{n_heads - 1}")
            keep[int(h)] = 0.0
        t_keep = inp.constant(b.sess, keep.reshape(-1))
        return _like(b.sess, tnn.tnn_mul(b.sess, _per_token_2d(b.sess, t, per_token), t_keep), t)


@dataclass(frozen=True)
class Patch(Intervention):
    """Replace the activation by ``values`` ([tokens of the whole run, ...per token], e.g. from
    ``run_with_cache`` of another prompt of the same length) at ``positions`` (None: all): the graph
    reads the given values from there on (activation patching). Rows not patched are kept exactly
    (t * 1 + 0)."""

    values: np.ndarray
    positions: tuple[int, ...] | None = None

    def build(self, b, inp, t, name, per_token):
        vals = np.asarray(self.values, np.float32)
        k = int(np.prod(per_token))
        vals = vals.reshape(-1, k)
        t2d = _per_token_2d(b.sess, t, per_token)
        n = tnn.tnn_tensor_ne(t2d, 1)
        first = inp.last_pos - inp.n_tokens + 1
        if n != inp.n_tokens or first + n > vals.shape[0]:
            raise ValueError(f"Patch on {name}: values cover {vals.shape[0]} positions; this graph needs "
                             f"positions {first}..{first + n - 1} of {n} rows")
        tnn.tnn_add_to_graph(b.sess, t)   # still computed, so the graph's inputs above it stay in the graph
        # values are functions of the positions the graph runs at (a replayed decode graph runs at each in turn)
        if self.positions is None:
            return _like(b.sess, inp.constant(b.sess, lambda pos: vals[pos]), t)
        chosen = np.zeros(vals.shape[0], bool)
        chosen[list(self.positions)] = True
        t_keep = inp.constant(b.sess, lambda pos: (~chosen[pos]).astype(np.float32)[:, None])    # [1, n]
        t_new = inp.constant(b.sess, lambda pos: np.where(chosen[pos][:, None], vals[pos], 0.0))  # [k, n]
        return _like(b.sess, tnn.tnn_add(b.sess, tnn.tnn_mul(b.sess, t2d, t_keep), t_new), t)


class PythonHook(Intervention):
    """``fn(activation: np.ndarray [tokens, ...], name) -> np.ndarray | None`` run inside the graph
    (a ggml custom op); a returned array replaces the activation downstream."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def build(self, b, inp, t, name, per_token):
        t = tnn.tnn_cont(b.sess, t) if not _is_contiguous(t) else t
        return dispatcher().map(b.sess, inp, t, self.fn, name, per_token)


def _is_contiguous(t) -> bool:
    return tnn.tnn_tensor_is_contiguous(t) == 1


class _Dispatcher:
    """The one C callback every Python hook goes through; ``user`` names the hook call."""

    def __init__(self):
        self.calls: dict[int, tuple] = {}
        self.error: BaseException | None = None
        self._cb = tnn.ffi.callback("tnn_hook_fn", self._run)
        tnn.tnn_set_hook_dispatcher(self._cb)

    def map(self, sess, inp, t, fn, name, per_token):
        key = len(self.calls) + 1
        while key in self.calls:
            key += 1
        self.calls[key] = (fn, name, per_token)
        inp.hook_keys.append(key)       # dropped with the graph (GraphInputs.release)
        return tnn.tnn_map_hook(sess, t, tnn.ffi.cast("void *", key))

    def release(self, keys) -> None:
        for k in keys:
            self.calls.pop(k, None)

    def _run(self, user, dst, src, n):
        try:
            fn, name, per_token = self.calls[int(tnn.ffi.cast("uintptr_t", user))]
            x = np.frombuffer(tnn.ffi.buffer(src, n * 4), np.float32).reshape((-1,) + tuple(per_token))
            out = fn(x.copy(), name)
            if out is None:
                tnn.ffi.memmove(dst, src, n * 4)
                return
            out = np.ascontiguousarray(out, np.float32)
            if out.shape != x.shape:
                raise ValueError(f"hook on {name} returned shape {out.shape}, the activation is {x.shape}")
            tnn.ffi.memmove(dst, tnn.ffi.from_buffer(out), n * 4)
        except BaseException as e:  # noqa: BLE001 - never let an exception cross into C
            if self.error is None:
                self.error = e
            tnn.ffi.memmove(dst, src, n * 4)

    def raise_pending(self) -> None:
        """After a compute: re-raise the first exception a hook raised during it."""
        e, self.error = self.error, None
        if e is not None:
            raise e


_DISPATCHER: _Dispatcher | None = None


def dispatcher() -> _Dispatcher:
    global _DISPATCHER
    if _DISPATCHER is None:
        _DISPATCHER = _Dispatcher()
    return _DISPATCHER
