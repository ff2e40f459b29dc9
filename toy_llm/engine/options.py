"""EngineOptions: how to run a model, as opposed to what the model is (ModelConfig).

One frozen object, checked once when it is made; ``dataclasses.replace`` makes a changed copy
(the seed's ``enable_*`` calls do that), so no half-checked state exists.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ggml_types import KV_TYPES

BACKENDS = {"cpu": 0, "cuda": 1, "metal": 2}   # tnn_session_new kinds
GRAPHS = ("fused", "per_head")
LOADERS = ("mmap", "copy")
LLAMA_N_BATCH = 512   # llama.cpp's default n_batch = n_ubatch: what users compare with


@dataclass(frozen=True)
class EngineOptions:
    """``graph``: "fused" (all heads of a layer in one tensor, llama.cpp's graph; decode built once
    and replayed, prompts in ubatches of ``n_batch``) or "per_head" (the seed's graph: every query
    head its own chain, one position per graph; ``n_batch`` does not apply). ``kv_type="q8_0"``
    implies flash attention (a Q8_0 V cannot be transposed for the plain path), as in the seed.
    ``weight_type`` (copy loader): the ggml type of 2-D weights, None = each tensor's own type."""

    backend: str = "cpu"
    n_threads: int | None = None
    kv_type: str = "f16"         # llama.cpp's default type_k = type_v
    flash_attn: bool = False
    graph: str = "fused"
    n_batch: int = LLAMA_N_BATCH
    loader: str = "mmap"
    weight_type: int | None = None
    repack_weights: bool = True   # CPU: matmul weights in ggml's CPU_REPACK layout where llama.cpp uses it
    threadpool: bool = False      # CPU: keep the worker threads between computes (README, "Speed")
    tiles: bool = True            # CPU: Q4_1/Q5_0/Q8_0 weight products by the tiled kernels (ggml's numbers, faster)
    n_seq: int = 1                # sequence slots in the KV cache (max_T cells each), fused graph only
    # (rank, layers) of an inference LoRA-Q adapter: its F32 A / B are declared with the weights
    lora_q_slots: tuple[int, tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        def bad(arg, want):
            raise ValueError(f"{arg} must be {want}, got {getattr(self, arg)!r}")

        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r} (choose from {', '.join(BACKENDS)})")
        if self.n_threads is not None and (type(self.n_threads) is not int or self.n_threads < 1):
            bad("n_threads", "a positive int or None (all cores)")
        if self.kv_type not in KV_TYPES:
            bad("kv_type", f"one of {tuple(KV_TYPES)}")
        if self.graph not in GRAPHS:
            bad("graph", f"one of {GRAPHS}")
        if type(self.n_batch) is not int or self.n_batch < 1:
            bad("n_batch", "a positive int")
        if type(self.n_seq) is not int or self.n_seq < 1:
            bad("n_seq", "a positive int")
        if self.n_seq > 1 and self.graph != "fused":
            bad("n_seq", "1 with the per-head graph (several sequences need the fused graph)")
        if self.loader not in LOADERS:
            bad("loader", f"one of {LOADERS}")
        if self.weight_type is not None and (type(self.weight_type) is not int or self.weight_type < 0):
            bad("weight_type", "a ggml type id or None")
        if self.lora_q_slots is not None:
            rank, layers = self.lora_q_slots
            if type(rank) is not int or rank < 1 or not layers or any(type(il) is not int or il < 0 for il in layers):
                bad("lora_q_slots", "(a positive rank, a non-empty tuple of layer indices)")
            object.__setattr__(self, "lora_q_slots", (rank, tuple(sorted(set(layers)))))
        if self.kv_type == "q8_0" and not self.flash_attn:
            object.__setattr__(self, "flash_attn", True)

    @property
    def kv_ggml_type(self) -> int:
        return KV_TYPES[self.kv_type]

    @property
    def fused(self) -> bool:
        return self.graph == "fused"
