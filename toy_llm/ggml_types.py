"""ggml's type ids (``enum ggml_type`` in ggml.h) and the KV cache types we offer: the one place
they are written down. Plain Python, so the GGUF reader and the parity tool can use them without
loading libtinynn."""
from __future__ import annotations

GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1 = 0, 1, 2, 3
GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_Q8_1 = 6, 7, 8, 9
GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K = 10, 11, 12, 13, 14
GGML_TYPE_I32, GGML_TYPE_BF16 = 26, 30

# KV cache type name (load(kv_type=...), --kv-type) -> ggml type; llama.cpp's type_k / type_v take the same ids
KV_TYPES = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16, "q8_0": GGML_TYPE_Q8_0}


def is_quantized(ggml_type: int) -> bool:
    """Block-quantized (not a plain float type)."""
    return ggml_type not in (GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16)
