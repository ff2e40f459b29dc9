"""toy_llm: a Python-driven LLM inference engine over ggml, via the libtinynn C shim."""
