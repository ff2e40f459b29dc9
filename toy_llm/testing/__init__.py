"""Test helpers for toy_llm: synthetic GGUF models that llama.cpp loads and runs.

See :mod:`toy_llm.testing.synthetic`.
"""
from __future__ import annotations

from .synthetic import (  # noqa: F401
    FAMILIES,
    QUANT_TYPES,
    family_config,
    quantize,
    synthetic_vocab,
    tensor_type_counts,
    write_model,
    write_per_head,
)

__all__ = [
    "FAMILIES",
    "QUANT_TYPES",
    "family_config",
    "quantize",
    "synthetic_vocab",
    "tensor_type_counts",
    "write_model",
    "write_per_head",
]
