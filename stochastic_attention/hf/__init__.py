"""Hugging Face transformers integration: stochastic, sliding-window and MoBA attention for
released models, with no weight update. See :func:`patch`."""

from .config import PatchConfig
from .patching import (
    SUPPORTED_MODEL_TYPES,
    check_supported,
    patch,
    patched,
    patched_config,
    register,
    unpatch,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "PatchConfig", "check_supported", "patch", "patched",
           "patched_config", "register", "unpatch"]

# Importing the package makes the names usable in from_pretrained(attn_implementation=...).
register()
