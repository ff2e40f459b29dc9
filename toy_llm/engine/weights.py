"""Where persistent weight tensors come from: the two realize paths of the seed.

Both paths declare the same tensors through the same code
(``SmolLM2KVFFICache._declare_weights``); only the source differs:

* :class:`MmapWeights` (``realize_for_mmap``): every tensor points into the
  GGUF's mapped pages, no copy (the seed's BYO-pointer path).
* :class:`CopyWeights` (``realize_for`` + ``load_weights``): tensors are
  allocated in the session's own buffer (F32, or the configured
  ``weight_type`` for 2-D linears) and filled from the file afterwards,
  converting types with ggml's own (de)quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import tinynn as tnn


class MissingTensorError(KeyError):
    """A tensor the architecture needs is absent from the GGUF."""

    def __str__(self) -> str:  # KeyError quotes its arg; keep the sentence readable
        return str(self.args[0])


@dataclass(frozen=True)
class Slice:
    """Part of GGUF tensor ``name``: rows [row0, row0 + rows) of ``cols`` elements, or, for a 1-D
    tensor, ``cols`` elements from element ``elem0`` (a head's piece of a fused bias); ``ne`` is
    given for whole 3-D expert stacks."""

    name: str
    rows: int
    cols: int
    row0: int = 0
    elem0: int | None = None   # set: a run of ``cols`` elements of a 1-D tensor
    ne: tuple[int, int, int] | None = None

    def byte_range(self, src_type: int, src_nbytes: int) -> tuple[int, int]:
        """(start, length) in bytes of this slice within the source tensor's data."""
        if self.ne is not None:
            return 0, src_nbytes
        if self.elem0 is not None:
            return tnn.tnn_row_size(src_type, self.elem0), tnn.tnn_row_size(src_type, self.cols)
        row = tnn.tnn_row_size(src_type, self.cols)
        return self.row0 * row, self.rows * row


class MmapWeights:
    """Weights that point into the mapped GGUF (host backends: no copy)."""

    def __init__(self, sess, gguf_handle, path: str):
        self.sess, self.g, self.path = sess, gguf_handle, path
        tnn.tnn_session_attach_weight_mmap(sess, tnn.tnn_gguf_mmap_base(gguf_handle),
                                           tnn.tnn_gguf_mmap_size(gguf_handle))

    def has(self, name: str) -> bool:
        return tnn.tnn_gguf_find_index(self.g, name) >= 0

    def _index(self, name: str) -> int:
        idx = tnn.tnn_gguf_find_index(self.g, name)
        if idx < 0:
            raise MissingTensorError(f"{self.path}: missing tensor '{name}'")
        return idx

    def tensor(self, s: Slice, kind: str):
        """``kind`` ('linear', 'embed' or 'f32') only matters for the copy path."""
        idx = self._index(s.name)
        typ = tnn.tnn_gguf_tensor_type(self.g, idx)
        off = tnn.tnn_gguf_tensor_file_offset(self.g, idx)
        nbytes = tnn.tnn_gguf_tensor_nbytes(self.g, idx)
        try:
            if s.ne is not None:
                want = tnn.tnn_row_size(typ, s.ne[0]) * s.ne[1] * s.ne[2]
                if want != nbytes:
                    raise tnn.TinyNNError(f"holds {nbytes} bytes, the config implies {want} (shape {s.ne})")
                return tnn.tnn_input_3d_weight_mmap(self.sess, *s.ne, typ, off)
            start, length = s.byte_range(typ, nbytes)
            if start + length > nbytes:  # the metadata's dims do not fit this tensor
                raise tnn.TinyNNError(f"holds {nbytes} bytes, but the config needs bytes "
                                      f"[{start}, {start + length}) of it")
            off += start
            if s.rows == 1 and kind == "f32":
                return tnn.tnn_input_1d_persistent_mmap(self.sess, s.cols, typ, off)
            if kind == "linear":  # a matmul weight: may be repacked like llama.cpp's
                return tnn.tnn_input_2d_weight_mmap(self.sess, s.rows, s.cols, typ, off)
            return tnn.tnn_input_2d_persistent_mmap(self.sess, s.rows, s.cols, typ, off)
        except tnn.TinyNNError as e:
            raise tnn.TinyNNError(f"{self.path}: tensor '{s.name}': {e}") from e

    def load(self) -> None:  # bytes are already in place
        pass


class CopyWeights:
    """Weights in the session's own buffer, filled from the file by :meth:`load`."""

    def __init__(self, sess, weight_type: int, embed_type: int = tnn.GGML_TYPE_F32,
                 file_types: dict[str, int] | None = None):
        """``file_types`` (name -> ggml type): keep each linear weight and the embedding in its own
        type from the file (a byte copy), instead of ``weight_type`` / ``embed_type``."""
        self.sess, self.weight_type, self.embed_type = sess, weight_type, embed_type
        self.file_types = file_types
        self.pending: list[tuple[object, Slice]] = []

    def has(self, name: str) -> bool:  # decided by the caller's flags on this path
        return True

    def tensor(self, s: Slice, kind: str):
        wtype = {"linear": self.weight_type, "embed": self.embed_type}.get(kind, tnn.GGML_TYPE_F32)
        if self.file_types is not None and kind in ("linear", "embed"):
            wtype = self.file_types[s.name]
        if s.ne is not None:
            t = tnn.tnn_input_3d_weight_typed(self.sess, *s.ne, wtype)
        elif s.rows == 1 and kind == "f32":
            t = tnn.tnn_input_1d_f32_persistent(self.sess, s.cols)
        elif kind == "linear":  # a matmul weight: may be repacked like llama.cpp's
            t = tnn.tnn_input_2d_weight_typed(self.sess, s.rows, s.cols, wtype)
        else:
            t = tnn.tnn_input_2d_persistent_typed(self.sess, s.rows, s.cols, wtype)
        self.pending.append((t, s))
        return t

    def load(self, path: str, progress: bool = False) -> None:
        """Fill every declared tensor from ``path``, converting types where they differ."""
        import gguf

        reader = gguf.GGUFReader(str(path))
        by_name = {t.name: t for t in reader.tensors}
        items = self.pending
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc=f"copying weights from {path}", unit="tensor")
        for t, s in items:
            src = by_name.get(s.name)
            if src is None:
                raise MissingTensorError(f"{path}: missing tensor '{s.name}'")
            raw = np.asarray(src.data).reshape(-1).view(np.uint8)
            src_type = int(src.tensor_type)
            start, length = s.byte_range(src_type, raw.size)
            part = raw[start:start + length]
            dst_type = tnn.tnn_tensor_type(t)
            try:
                if dst_type == src_type:
                    tnn.upload(self.sess, t, part)
                else:
                    n = int(tnn.tnn_tensor_ne(t, 0) * tnn.tnn_tensor_ne(t, 1) * tnn.tnn_tensor_ne(t, 2))
                    f32 = tnn.dequantize(src_type, part, n)
                    if dst_type == tnn.GGML_TYPE_F32:
                        tnn.upload(self.sess, t, f32)
                    else:
                        tnn.upload(self.sess, t, tnn.quantize(dst_type, f32.reshape(-1, int(tnn.tnn_tensor_ne(t, 0)))))
            except tnn.TinyNNError as e:
                raise tnn.TinyNNError(f"{path}: tensor '{s.name}': {e}") from e
        self.pending = []
