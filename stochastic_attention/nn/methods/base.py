"""What every attention method module builds on: the options bases, the :class:`Method`
interface the layer calls, and the pieces several methods share (decoding over a cache, the
seeded averages of the budget).

A method module declares its options dataclass (a :class:`MethodOptions` subclass whose class
attribute ``method`` is the method's name) and a :class:`Method` subclass that names it in
``options_class``, then registers the latter (``@register``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from ...functional import attended_keys
from ...ops import decode
from ...ops.decode import cached_attention
from ...vocabulary import reject_renamed
from .registry import owners_of

if TYPE_CHECKING:
    from ..attention import MultiHeadAttention

EVAL_PERMS = ("seeded", "random")
DECODES = ("full", "stochastic")
# Seeded draws averaged for the methods whose key sets are random (permutations, random keys).
BUDGET_SEEDS = 4


# ---- checks of option values ------------------------------------------------------------------


def check_int(name: str, value, low: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}{why}, got {value}")


def check_window(value) -> None:
    """``window``: keys per query, the query included (>= 1)."""
    check_int("window", value, 1, " (keys per query, the query included)")


def check_sinks(value) -> None:
    """``sinks``: leading tokens every query sees (>= 0)."""
    check_int("sinks", value, 0, " (leading tokens every query sees)")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0 ({why}), got {value}")


# ---- options ----------------------------------------------------------------------------------


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
        check_choice("eval_perm", self.eval_perm, EVAL_PERMS)
        check_int("perm_seed", self.perm_seed, 0)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---- the interface the layer calls -------------------------------------------------------------


class Method:
    """One attention method as the layer sees it (one instance per method, in the registry).

    ``layer`` is the calling :class:`~stochastic_attention.nn.MultiHeadAttention`: its
    ``options`` (an instance of ``options_class``), ``backend``, ``training`` and the modules
    :meth:`build` added. ``q`` [B, H, L, D] and ``k``, ``v`` [B, Hkv, S, D] are projected,
    normalised and rotated; ``key_mask`` is None or bool [B, S] (True = real token); the
    result is the mixed values [B, H, L, D], before the output projection.
    """

    options_class: ClassVar[type[MethodOptions]]
    # Draws a routing permutation over the sequence (the layer draws it, see uses_permutation).
    permuted: ClassVar[bool] = False
    # Draws random keys of its own (the layer's draw_random_keys calls draw_random_keys below).
    draws_random_keys: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.options_class.method

    @property
    def decodes_sparsely(self) -> bool:
        """Whether cached decoding may sample keys: the options have ``decode``."""
        return "decode" in self.options_class.names()

    def uses_permutation(self, options: MethodOptions) -> bool:
        """Whether a forward pass with these options needs a permutation (``perm``)."""
        return self.permuted

    def build(self, layer: MultiHeadAttention) -> None:
        """Add the method's own modules (parameters) to the layer; called once at the end of
        the layer's ``__init__``."""

    def attend(self, layer: MultiHeadAttention, x: torch.Tensor, q: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               perm: torch.Tensor | None) -> torch.Tensor:
        """Attention over a whole sequence (training, scoring, prefill): L = S. ``x`` is the
        layer input [B, L, hidden]; ``perm`` the permutation (drawn by the layer when
        :meth:`uses_permutation`, else whatever the caller passed, usually None)."""
        raise NotImplementedError

    def attend_cached(self, layer: MultiHeadAttention, x: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None) -> torch.Tensor:
        """New queries at the last L of S > L cached positions.

        By default the rows of :meth:`attend` over the whole cache (:func:`last_rows`): exact
        for a causal, row-wise method that draws nothing, and O(cache) per new row. Methods
        that draw a permutation or random keys, or have a faster rule, override it.
        """
        return last_rows(q, k, lambda q_all: self.attend(layer, x, q_all, k, v, key_mask, None))

    def draw_random_keys(self, layer: MultiHeadAttention, batch: int, seq_len: int, device,
                         key_mask: torch.Tensor | None) -> torch.Tensor:
        """The random keys a forward pass would use (methods with ``draws_random_keys``)."""
        raise ValueError(f"method {self.name!r} draws no random keys")

    def mean_keys(self, options: MethodOptions, n: int) -> float:
        """Mean keys per query over an ``n``-token causal sequence (see
        :func:`~stochastic_attention.nn.mean_attended_keys`)."""
        raise NotImplementedError


# ---- shared pieces ----------------------------------------------------------------------------


def last_rows(q: torch.Tensor, k: torch.Tensor,
              operator: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The outputs of a causal, row-wise ``operator(q_all)`` at the last L of S positions.

    A row depends only on its own query and on the keys and values, so the rows before the new
    queries get zero queries and are discarded. This costs one operator call over the whole
    cache per step: exact, not fast.
    """
    B, H, L, D = q.shape
    S = k.shape[2]
    q_all = torch.cat([q.new_zeros(B, H, S - L, D), q], dim=2)
    return operator(q_all)[:, :, S - L:]


def full_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_mask: torch.Tensor | None) -> torch.Tensor:
    """Full causal attention over the cache (how the paper decodes stochastic attention)."""
    return cached_attention(q, k, v, k.shape[2], 0, key_mask)


def sampled_decode(layer: MultiHeadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None, *, window: int, local: int) -> torch.Tensor:
    """decode="stochastic": the sinks, the last ``local`` and ``window`` random cached keys,
    gathered (O(window) per token); seeded per layer in eval mode as ``eval_perm`` says."""
    o = layer.options
    seeded = not layer.training and o.eval_perm == "seeded"
    return decode.sparse_decode(q, k, v, key_mask, window=window, sinks=o.sinks,
                                local=local, seed=o.perm_seed if seeded else None,
                                layer_idx=layer.layer_idx)


def full_or_sampled_decode(layer: MultiHeadAttention, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, key_mask: torch.Tensor | None, *, window: int,
                           local: int) -> torch.Tensor:
    """Cached decoding as the ``decode`` option says: "full" attention over the cache, or
    "stochastic" (:func:`sampled_decode` with ``window`` and ``local``)."""
    if layer.options.decode == "stochastic":
        return sampled_decode(layer, q, k, v, key_mask, window=window, local=local)
    return full_cache(q, k, v, key_mask)


def seeded_mean(count: Callable[[torch.Generator], torch.Tensor]) -> float:
    """The mean of ``count(generator)`` (keys per query) over :data:`BUDGET_SEEDS` draws."""
    draws = [count(torch.Generator().manual_seed(seed)).float().mean()
             for seed in range(BUDGET_SEEDS)]
    return float(torch.stack(draws).mean())


def stochastic_keys(n: int, window: int, *, layout: str, sinks: int, local: int = 0) -> float:
    """Mean keys per query of stochastic attention (with sinks and a local window), averaged
    over seeded permutations."""
    return seeded_mean(lambda g: attended_keys(n, window, method="stochastic", generator=g,
                                               layout=layout, sinks=sinks, local=local))


def window_keys(n: int, window: int, sinks: int = 0) -> float:
    """Mean keys per query of a causal sliding window plus sinks."""
    return float(attended_keys(n, window, method="sliding_window", sinks=sinks).float().mean())
