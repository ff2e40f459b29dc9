"""BuildContext: what every graph builder of one realized model reads (session, config,
weights, KV cache, tap), passed explicitly; both attention blocks build from the same one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..gguf_load import ModelConfig
from .cache import KVCache
from .weights import ModelWeights


@dataclass(frozen=True)
class BuildContext:
    sess: object
    cfg: ModelConfig
    weights: ModelWeights
    cache: KVCache
    tap: Callable   # tap(t, name, layer=None, head=None) -> t (hook_points.Trace)
