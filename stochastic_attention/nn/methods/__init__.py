"""The attention methods of the layer, one module each, and their registry.

Each module (named after its method) holds the method's options dataclass and a
:class:`~.base.Method` subclass with what :class:`~stochastic_attention.nn.MultiHeadAttention`
needs: how to attend over a whole sequence and over a cache, the modules it adds to the layer,
whether it draws a permutation or random keys, and its budget (mean keys per query). Importing
this package registers the built-in methods in the order of
:data:`~stochastic_attention.vocabulary.METHODS`; :func:`register` adds another one.
"""

from __future__ import annotations

from importlib import import_module

from ...vocabulary import METHODS as _BUILT_IN
from .base import Method, MethodOptions, SamplingOptions
from .registry import (
    OPTIONS,
    method_named,
    method_names,
    option_names,
    owners_of,
    register,
    sparse_decode_methods,
    unregister,
)

for _name in _BUILT_IN:  # each registers itself; the order of METHODS is the registry's order
    import_module(f".{_name}", __name__)
if method_names() != _BUILT_IN:
    raise ImportError(f"the method modules registered {method_names()}, "
                      f"vocabulary.METHODS lists {_BUILT_IN}: each must register its own name")

__all__ = ["OPTIONS", "Method", "MethodOptions", "SamplingOptions", "method_named",
           "method_names", "option_names", "owners_of", "register", "sparse_decode_methods",
           "unregister"]
