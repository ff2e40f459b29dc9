"""The engine: the seed's SmolLM2KVFFICache (per-head graphs), the fused-heads fast path beside it
(fused.py), and the weight sources (weights.py)."""
from . import kv_cache  # noqa: F401
from .kv_cache import (SmolLM2KVBlockFFI, SmolLM2KVFFICache, SmolLM2KVFFICacheMetal,  # noqa: F401
                       SmolLM2KVStepResult)
