"""The options of each attention method, each declared once: name, default and check.

:class:`~stochastic_attention.nn.MultiHeadAttention` takes ``method=`` and the method's options
(one of the classes below, or a dict of its fields); :class:`~stochastic_attention.models.
SALlamaConfig` stores one plain dict of options for all its layers and builds each layer's
object from it with :func:`options_for`. Every class checks its values in ``__post_init__``
and converts to and from a plain dict (for Hugging Face config JSON and YAML).

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from ..ops.validate import LAYOUTS
from ..vocabulary import METHODS, check_name, reject_renamed
from .gate import GATE_GRANULARITIES, GATES

EVAL_PERMS = ("seeded", "random")
DECODES = ("full", "stochastic")
WINDOWS = ("sliding_window", "stochastic")


def _int(name: str, value, low: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{why}, got {value}")


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _number(name: str, value, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0 ({why}), got {value}")


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """Base of the options classes: conversion to and from a plain dict."""

    method = ""  # the method these options belong to (a class attribute, not a field)

    def __post_init__(self) -> None:
        pass

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict:
        """The fields as plain values (tuples become lists), e.g. for config JSON or YAML."""
        return {name: _plain(getattr(self, name)) for name in self.names()}

    @classmethod
    def from_dict(cls, values: Mapping) -> MethodOptions:
        """Build from a mapping of this method's fields; old or unknown names are errors."""
        if not isinstance(values, Mapping):
            raise TypeError(f"options of method {cls.method!r} must be a dict of "
                            f"{list(cls.names())}, got {type(values).__name__}")
        reject_renamed(values, f"options of method {cls.method!r}")
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            owners = {name: owners_of(name) for name in unknown if owners_of(name)}
            hint = "".join(f"; {name!r} is an option of {', '.join(methods)}"
                           for name, methods in owners.items())
            raise ValueError(f"unknown options {unknown} for method {cls.method!r} (its options: "
                             f"{list(cls.names())}){hint}")
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class FullOptions(MethodOptions):
    """Full causal attention: nothing to choose."""

    method = "full"


@dataclass(frozen=True, kw_only=True)
class SlidingWindowOptions(MethodOptions):
    """Each query sees its last ``window`` real tokens (itself included) and the first
    ``sinks`` real tokens of its row."""

    method = "sliding_window"
    window: int = 64
    sinks: int = 0

    def __post_init__(self) -> None:
        _int("window", self.window, 1, " (keys per query, the query included)")
        _int("sinks", self.sinks, 0, " (leading tokens every query sees)")


@dataclass(frozen=True, kw_only=True)
class SamplingOptions(MethodOptions):
    """How a method draws its permutations or random keys.

    perm_per_head: independent draws per head instead of one per sample.
    eval_perm: "seeded" (eval mode draws from a generator seeded by ``perm_seed`` and the
        layer index, so evaluation is reproducible) or "random". Training mode always draws
        afresh from torch's global RNG on every forward pass.
    """

    perm_per_head: bool = False
    eval_perm: str = "seeded"
    perm_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.perm_per_head, bool):
            raise TypeError(f"perm_per_head must be a bool, got {self.perm_per_head!r}")
        _choice("eval_perm", self.eval_perm, EVAL_PERMS)
        _int("perm_seed", self.perm_seed, 0)


@dataclass(frozen=True, kw_only=True)
class StochasticOptions(SamplingOptions):
    """Stochastic attention: windows of ``window`` keys in a random permutation's order.

    layout: "band" or "block" windows in permuted order. sinks: as for sliding_window.
    decode: cached decoding attends to "full" (the whole cache, the paper's protocol) or
        "stochastic" (the sinks, the last ``max(local, 1)`` tokens and ``window`` random
        earlier tokens, gathered: O(window) per generated token).
    """

    method = "stochastic"
    window: int = 64
    layout: str = "band"
    sinks: int = 0
    decode: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        _int("window", self.window, 1, " (keys per query, the query included)")
        _choice("layout", self.layout, LAYOUTS)
        _int("sinks", self.sinks, 0, " (leading tokens every query sees)")
        _choice("decode", self.decode, DECODES)


@dataclass(frozen=True, kw_only=True)
class StochasticLocalOptions(StochasticOptions):
    """Stochastic attention whose windows also hold each query's last ``local`` positions
    (one softmax over the union)."""

    method = "stochastic_local"
    local: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _int("local", self.local, 1, " (recent positions every query sees; method "
                                     "'stochastic' is stochastic attention without them)")


@dataclass(frozen=True, kw_only=True)
class GatedOptions(StochasticOptions):
    """A stochastic branch (``window``) and a sliding-window branch (``local_window``, default
    ``window``) on the same q/k/v, fused by gates (see :class:`~stochastic_attention.nn.
    BranchGate`): ``gate`` "sigmoid" or "softmax", ``gate_granularity`` "head" or "channel",
    ``gate_bias`` the initial gate bias (a float or a pair: stochastic, sliding-window).
    ``sinks`` apply to both branches, ``decode`` to the stochastic one."""

    method = "gated"
    local_window: int | None = None
    gate: str = "sigmoid"
    gate_granularity: str = "head"
    gate_bias: float | tuple[float, float] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.local_window is not None:
            _int("local_window", self.local_window, 1, " (keys per query of the sliding-window "
                                                       "branch; None: window)")
        _choice("gate", self.gate, GATES)
        _choice("gate_granularity", self.gate_granularity, GATE_GRANULARITIES)
        bias = self.gate_bias
        if isinstance(bias, list):
            object.__setattr__(self, "gate_bias", bias := tuple(bias))
        pair = bias if isinstance(bias, tuple) else (bias,)
        if (isinstance(bias, tuple) and len(bias) != 2) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in pair):
            raise ValueError(f"gate_bias must be a float or a pair (stochastic, sliding_window), "
                             f"got {self.gate_bias!r}")

    @property
    def sliding_window(self) -> int:
        """Keys per query of the sliding-window branch."""
        return self.local_window or self.window


@dataclass(frozen=True, kw_only=True)
class MobaOptions(MethodOptions):
    """MoBA: each query attends to its own block and the ``top_k - 1`` earlier blocks of
    ``block_size`` keys whose mean key scores highest, plus the first ``sinks`` tokens."""

    method = "moba"
    block_size: int = 64
    top_k: int = 2
    sinks: int = 0

    def __post_init__(self) -> None:
        _int("block_size", self.block_size, 1)
        _int("top_k", self.top_k, 1, " (blocks per query, its own included)")
        _int("sinks", self.sinks, 0, " (leading tokens every query sees)")


@dataclass(frozen=True, kw_only=True)
class FractionalOptions(SamplingOptions):
    """Fractional neural attention of order ``alpha`` (bandwidth ``eps``).

    window: None (every earlier key) or the keys per query. windows: how those windows are
        formed, "sliding_window" (each query's last ``window`` keys) or "stochastic" (windows
        of a permutation drawn as for stochastic attention, with ``layout``; decoding with a
        cache then drops the windows, as stochastic attention does).
    """

    method = "fractional"
    alpha: float = 0.5
    eps: float = 1.0
    window: int | None = None
    windows: str = "sliding_window"
    layout: str = "band"

    def __post_init__(self) -> None:
        super().__post_init__()
        _number("alpha", self.alpha, "the fractional Laplacian's order, in (0, 2]")
        if self.alpha > 2:
            raise ValueError(f"alpha must be in (0, 2], got {self.alpha}")
        _number("eps", self.eps, "the kernel bandwidth")
        if self.window is not None:
            _int("window", self.window, 1, " (keys per query, the query included)")
        _choice("windows", self.windows, WINDOWS)
        if self.windows == "stochastic" and self.window is None:
            raise ValueError("windows='stochastic' needs window (the keys per query)")
        _choice("layout", self.layout, LAYOUTS)


@dataclass(frozen=True, kw_only=True)
class BigBirdOptions(SamplingOptions):
    """BigBird: a causal window of ``window`` keys, the first ``sinks`` tokens and
    ``random_keys`` random earlier keys per query (drawn per sample, shared by the heads unless
    ``perm_per_head``). decode "stochastic": the window and ``random_keys`` random cached keys."""

    method = "bigbird"
    window: int = 64
    random_keys: int = 0
    sinks: int = 0
    decode: str = "full"

    def __post_init__(self) -> None:
        super().__post_init__()
        _int("window", self.window, 1, " (keys per query, the query included)")
        _int("random_keys", self.random_keys, 0)
        _int("sinks", self.sinks, 0, " (leading tokens every query sees)")
        _choice("decode", self.decode, DECODES)


OPTIONS: dict[str, type[MethodOptions]] = {
    cls.method: cls for cls in (FullOptions, SlidingWindowOptions, StochasticOptions,
                                StochasticLocalOptions, GatedOptions, MobaOptions,
                                FractionalOptions, BigBirdOptions)}
assert tuple(OPTIONS) == METHODS, "nn.options and vocabulary.METHODS must list the same methods"
OPTION_NAMES = tuple(sorted({name for cls in OPTIONS.values() for name in cls.names()}))
# Methods whose cached decoding may sample keys (decode="stochastic").
SPARSE_DECODE_METHODS = tuple(m for m, cls in OPTIONS.items() if "decode" in cls.names())


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def owners_of(name: str) -> tuple[str, ...]:
    """The methods that have an option called ``name``."""
    return tuple(m for m, cls in OPTIONS.items() if name in cls.names())


def method_options(method: str, options: MethodOptions | Mapping | None = None) -> MethodOptions:
    """The options object of ``method``: ``options`` itself, built from a dict of its fields,
    or the defaults (None)."""
    cls = OPTIONS[check_name(method, METHODS)]
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
    cls = OPTIONS[check_name(method, METHODS)]
    values = {name: shared[name] for name in cls.names() if name in shared}
    own = shared.get(method)
    if own is not None:
        if not isinstance(own, Mapping):
            raise TypeError(f"the {method!r} entry of the options must be a dict of that "
                            f"method's options, got {own!r}")
        values.update(own)
    return cls.from_dict(values)
