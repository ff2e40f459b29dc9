"""The engine: the seed's SmolLM2KVFFICache (per-head graphs) and its weight sources."""
from . import kv_cache  # noqa: F401
from .kv_cache import (SmolLM2KVBlockFFI, SmolLM2KVFFICache, SmolLM2KVFFICacheMetal,  # noqa: F401
                       SmolLM2KVStepResult)
