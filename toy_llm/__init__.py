"""toy_llm: a Python-driven LLM inference and experimentation engine over ggml.

    import toy_llm
    m = toy_llm.load()                       # SmolLM2-135M-Instruct Q4_1
    print(m.generate("The capital of France is", max_new_tokens=16))
"""
from __future__ import annotations

__version__ = "0.1.0"


def load(*args, **kwargs):
    """See :func:`toy_llm.model.load` (imported lazily so ``import toy_llm`` stays cheap)."""
    from .model import load as _load

    return _load(*args, **kwargs)


def __getattr__(name):
    if name in ("Model", "ModelConfig", "SmolLM2KVFFICache", "SmolLM2KVFFICacheMetal", "TinyNNError"):
        from . import engine, gguf_load, model, tinynn  # noqa: F401

        return {"Model": model.Model, "ModelConfig": gguf_load.ModelConfig,
                "SmolLM2KVFFICache": engine.kv_cache.SmolLM2KVFFICache,
                "SmolLM2KVFFICacheMetal": engine.kv_cache.SmolLM2KVFFICacheMetal,
                "TinyNNError": tinynn.TinyNNError}[name]
    raise AttributeError(name)
