"""Argument checking shared by every operator.

Every public op calls these before dispatching, so each backend can assume clean inputs:
q [B, Hq, n, D], k/v [B, Hkv, n, D] with Hq % Hkv == 0, perm [B|1, Hq|1, n] (a permutation),
key_mask [B, n] bool.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

# Arguments that were renamed, with why: a caller using the old name gets the reason, not a
# bare "unexpected keyword argument".
RENAMED = {
    "key_padding_mask": (
        "key_mask",
        "it is True for REAL tokens, the opposite polarity of torch.nn.MultiheadAttention's "
        "key_padding_mask (True for padding); pass key_mask=<bool [batch, seq], True = real>, "
        "i.e. key_mask=~key_padding_mask for a torch-style mask",
    ),
    "topk": ("top_k", "MoBA's blocks per query are called top_k everywhere"),
}


def reject_renamed(fn: F) -> F:
    """Wrap a public operator so that an argument's old name raises a TypeError naming the new."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for old, (new, why) in RENAMED.items():
            if old in kwargs:
                raise TypeError(f"{fn.__name__}() argument {old!r} was renamed {new!r}: {why}")
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

LAYOUTS = ("band", "block")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape [batch, heads, seq, head_dim] (4 dims), got {tuple(t.shape)};"
                " transpose [batch, seq, heads, dim] inputs with .transpose(1, 2)"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q and k must have the same sequence length (self-attention), got {q.shape[2]} and"
            f" {k.shape[2]}; for decoding with a KV cache use full attention over the cache"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of key/value"
            f" heads ({k.shape[1]}) for grouped-query attention"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_int(name: str, value, minimum: int | None = None, *, hint: str = "") -> int:
    """``value`` as an int, after checking it is one (a bool is not) and at least ``minimum``.

    TypeError for a wrong type, ValueError below ``minimum``; both name the argument and end
    with ``hint`` (e.g. " (0 turns it off)").
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{hint}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{hint}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """``value`` after checking it is a bool (True or False; 0 and 1 are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_window(window: int) -> int:
    return check_int("window", window, 1, hint=" (keys a query may see, itself included)")


def check_sinks(sinks: int) -> int:
    return check_int("sinks", sinks, 0, hint=" (number of leading tokens every query sees)")


def check_local(local: int, causal: bool) -> int:
    local = check_int("local", local, 0, hint=" (recent positions every query also sees; 0 turns "
                                              "the local window off)")
    if local and not causal:
        raise ValueError("local > 0 needs causal=True (the local window is the query's last "
                         "`local` positions); for non-causal SA use local=0")
    return local


def check_causal_only(fn_name: str, causal: bool) -> None:
    """Operators defined for causal attention only (MoBA, BigBird) take ``causal=True``."""
    if causal is not True:
        raise ValueError(f"{fn_name} is causal only: pass causal=True (the default), got "
                         f"causal={causal!r}")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def check_key_mask(mask: torch.Tensor | None, batch: int, seq: int, device) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            "key_mask must be a bool tensor [batch, seq] with True for real tokens (the opposite"
            " of torch.nn.MultiheadAttention's key_padding_mask); convert an int mask with mask.bool()"
        )
    if tuple(mask.shape) != (batch, seq):
        raise ValueError(f"key_mask must have shape [batch, seq] = {(batch, seq)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_mask is on {mask.device} but q is on {device}")


def check_index_tensor(name: str, index, device) -> None:
    """An integer tensor of positions (a permutation, random key indices) on q's device."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {index.dtype}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but q is on {device}; move it with "
                         f"{name}.to(q.device)")


def normalize_perm(perm: torch.Tensor, batch: int, heads: int, seq: int, device) -> torch.Tensor:
    """Return perm as a [B|1, H|1, n] long tensor after checking it is a permutation of range(n)."""
    check_index_tensor("perm", perm, device)
    if perm.dim() == 1:
        perm = perm.view(1, 1, -1)
    elif perm.dim() == 2:
        perm = perm.unsqueeze(1)
    elif perm.dim() != 3:
        raise ValueError(f"perm must have shape [seq], [batch, seq] or [batch, heads, seq], got {tuple(perm.shape)}")
    if perm.shape[-1] != seq:
        raise ValueError(f"perm has length {perm.shape[-1]} but the sequence has {seq} tokens")
    if perm.shape[0] not in (1, batch):
        raise ValueError(f"perm batch dimension must be 1 or {batch}, got {perm.shape[0]}")
    if perm.shape[1] not in (1, heads):
        raise ValueError(f"perm heads dimension must be 1 or the number of query heads {heads}, got {perm.shape[1]}")
    perm = perm.long()
    if seq > 0 and torch.compiler.is_compiling():
        _assert_permutation_in_graph(perm, seq)
    elif seq > 0:
        # In range, and every value hit exactly once: O(n), cheaper than sorting on every call.
        in_range = bool(((perm >= 0) & (perm < seq)).all())
        ok = in_range and bool(
            (torch.zeros_like(perm).scatter_add_(-1, perm, torch.ones_like(perm)) == 1).all())
        if not ok:
            raise ValueError(
                "perm is not a permutation of range(seq) along its last dim; build one with"
                " stochastic_attention.random_permutation or torch.randperm"
            )
    return perm


def _assert_permutation_in_graph(perm: torch.Tensor, seq: int) -> None:
    """The check of :func:`normalize_perm` under ``torch.compile``, where a Python branch on
    tensor values would break the graph: an in-graph assertion (a RuntimeError when it fails)."""
    in_range = ((perm >= 0) & (perm < seq)).all()
    hits = torch.zeros_like(perm).scatter_add_(-1, perm.clamp(0, seq - 1), torch.ones_like(perm))
    torch._assert_async(in_range & (hits == 1).all(),
                        "perm is not a permutation of range(seq) along its last dim")


def check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    return float(scale)
