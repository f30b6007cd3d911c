"""Models: released pretrained causal LMs, the SA-Llama decoder for pre-training, the FNA classifier.

Names are imported on first use, so the torch-only models do not pull in transformers.
"""

import importlib

_LAZY = {
    "load_pretrained": ".pretrained",
    "SALlamaConfig": ".sa_llama",
    "SALlamaForCausalLM": ".sa_llama",
    "SALlamaModel": ".sa_llama",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
