"""The engine, in small parts with one-way data flow (README, "How it is built"):
options -> weights + cache -> inputs -> ops -> attn_per_head / attn_fused -> graph -> engine,
and kv_cache.SmolLM2KVFFICache, the seed's class, as the user's handle over them."""
from .engine import Engine  # noqa: F401
from .hook_points import HOOK_POINTS  # noqa: F401
from .kv_cache import (SmolLM2KVBlockFFI, SmolLM2KVFFICache, SmolLM2KVFFICacheMetal,  # noqa: F401
                       SmolLM2KVStepResult)
from .options import EngineOptions  # noqa: F401
