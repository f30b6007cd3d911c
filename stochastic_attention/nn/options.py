"""The options of each attention method, each declared once: name, default and check.

Each options class lives in its method's module in :mod:`stochastic_attention.nn.methods`;
this module gathers them (the names below keep working) with the functions that build an
options object. :class:`~stochastic_attention.nn.MultiHeadAttention` takes ``method=`` and the
method's options (one of the classes below, or a dict of its fields);
:class:`~stochastic_attention.models.SALlamaConfig` stores one plain dict of options for all
its layers and builds each layer's object from it with :func:`options_for`. Every class checks
its values in ``__post_init__`` and converts to and from a plain dict (for Hugging Face config
JSON and YAML).

    method             options class             fields
    full               FullOptions               (none)
    sliding_window     SlidingWindowOptions      window, sinks
    stochastic         StochasticOptions         window, layout, sinks, decode + sampling
    stochastic_local   StochasticLocalOptions    those of stochastic + local
    gated              GatedOptions              those of stochastic + local_window, gate,
                                                 gate_granularity, gate_bias
    moba               MobaOptions               block_size, top_k, sinks
    fractional         FractionalOptions         alpha, eps, window, windows, layout + sampling
    bigbird            BigBirdOptions            window, random_keys, sinks, decode + sampling

"sampling" is how permutations / random keys are drawn: perm_per_head, eval_perm, perm_seed.
:data:`OPTIONS` maps every registered method (built-in or not) to its options class.
"""

from __future__ import annotations

from collections.abc import Mapping

from .methods import OPTIONS, method_named, option_names, owners_of, sparse_decode_methods
from .methods.base import DECODES, EVAL_PERMS, MethodOptions, SamplingOptions
from .methods.bigbird import BigBirdOptions
from .methods.fractional import WINDOWS, FractionalOptions
from .methods.full import FullOptions
from .methods.gated import GatedOptions
from .methods.moba import MobaOptions
from .methods.sliding_window import SlidingWindowOptions
from .methods.stochastic import StochasticOptions
from .methods.stochastic_local import StochasticLocalOptions

__all__ = ["DECODES", "EVAL_PERMS", "OPTIONS", "WINDOWS", "BigBirdOptions", "FractionalOptions",
           "FullOptions", "GatedOptions", "MethodOptions", "MobaOptions", "SamplingOptions",
           "SlidingWindowOptions", "StochasticLocalOptions", "StochasticOptions",
           "method_options", "option_names", "options_for", "owners_of",
           "sparse_decode_methods"]


def method_options(method: str, options: MethodOptions | Mapping | None = None) -> MethodOptions:
    """The options object of ``method``: ``options`` itself, built from a dict of its fields,
    or the defaults (None)."""
    cls = method_named(method).options_class
    if options is None:
        options = {}
    if isinstance(options, MethodOptions):
        if type(options) is not cls:
            raise TypeError(f"method {method!r} takes {cls.__name__} (or a dict of its fields "
                            f"{list(cls.names())}), got {type(options).__name__}")
        return options
    return cls.from_dict(options)


def options_for(method: str, shared: Mapping) -> MethodOptions:
    """``method``'s options from a mapping that may also hold other methods' options (a model
    config's ``attention_options``): the fields ``method`` has, then the entries of
    ``shared[method]`` if there is such a section (a dict of this method's options only, for
    a model whose layers of different methods need different values); the rest keep their
    defaults."""
    cls = method_named(method).options_class
    values = {name: shared[name] for name in cls.names() if name in shared}
    own = shared.get(method)
    if own is not None:
        if not isinstance(own, Mapping):
            raise TypeError(f"the {method!r} entry of the options must be a dict of that "
                            f"method's options, got {own!r}")
        values.update(own)
    return cls.from_dict(values)
