"""LoRA on the attention Q projection: adapters in llama.cpp's LoRA GGUF format (adapter.py),
and fine-tuning through ggml's autodiff (train.py)::

    from toy_llm.lora import LoraAdapter, load_adapter, train
"""
from __future__ import annotations

from .adapter import LoraAdapter, load_adapter

__all__ = ["LoraAdapter", "load_adapter", "train"]


# Imported eagerly: importing the submodule toy_llm.lora.train (as `from toy_llm.lora.train
# import ...` does) binds the package attribute ``train`` to the module; the function bound here
# afterwards wins, so ``toy_llm.lora.train(...)`` is always the function.
from .train import train  # noqa: E402
