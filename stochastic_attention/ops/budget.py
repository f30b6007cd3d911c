"""Counting the keys each query sees (attention budgets), so methods compare at equal cost.

Every count here comes from :func:`.patterns.visible_keys`, the one enumeration of visible
(query, key) pairs, so it is exactly what the operators attend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .patterns import visible_keys
from .permute import routing_permutation
from .validate import check_int, check_key_mask, check_layout, check_local, check_sinks, check_window, normalize_perm

METHODS = ("stochastic", "sliding_window", "full")

__all__ = ["METHODS", "attended_keys", "ensemble_attended_keys"]


def attended_keys(
    seq_len: int,
    window: int,
    *,
    method: str = "stochastic",
    perm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    batch: int = 1,
    heads: int = 1,
    causal: bool = True,
    layout: str = "band",
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    local: int = 0,
) -> torch.Tensor:
    """How many keys each query sees: a LongTensor [batch, heads, seq_len] in original order.

    Uses the operators' own visibility rule, in O(seq_len * window) memory, so methods can be
    compared at equal budget (e.g. ``attended_keys(...).float().mean()``). ``method`` is
    "stochastic", "sliding_window" or "full"; for "stochastic" without ``perm`` the permutation
    is drawn from ``generator`` exactly as :func:`~stochastic_attention.stochastic_attention`
    draws it. ``local`` counts the SA + local union (each key once), as the operator attends it.
    The pairs are those of :func:`.patterns.visible_keys`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    window, sinks, layout = check_window(window), check_sinks(sinks), check_layout(layout)
    local = check_local(local, causal) if method == "stochastic" else 0
    n = check_int("seq_len", seq_len, 0)
    device = key_mask.device if key_mask is not None else None
    if key_mask is not None:
        batch = key_mask.shape[0]
        check_key_mask(key_mask, batch, n, device)
    if method == "full":
        window = max(window, n)
    if method == "stochastic":
        if perm is None:
            perm = routing_permutation(batch, 1, n, key_mask=key_mask,
                                       generator=generator, device=device)
        elif perm.dim() == 3:  # a given perm fixes the heads (and batch, unless a mask does)
            heads = perm.shape[1]
            batch = batch if key_mask is not None else perm.shape[0]
        elif perm.dim() == 2 and key_mask is None:
            batch = perm.shape[0]
        perm = normalize_perm(perm, batch, heads, n, perm.device)
        device = perm.device
    else:
        perm = torch.arange(n, device=device).view(1, 1, n)
        layout = "band"
    if n == 0:
        return torch.zeros(batch, heads if perm.shape[1] == 1 else perm.shape[1], 0,
                           dtype=torch.long, device=device)
    _, seen = visible_keys(n, window, perm=perm, layout=layout, causal=causal, sinks=sinks,
                           key_mask=key_mask, local=local, device=device)
    counts = seen.sum(-1)  # [B|1, Hp, n] in original order
    return counts.expand(batch, heads if counts.shape[1] == 1 else counts.shape[1], n).contiguous()


def ensemble_attended_keys(
    seq_len: int,
    window: int,
    perms: Sequence[torch.Tensor],
    *,
    layout: str = "band",
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    local: int = 0,
) -> torch.Tensor:
    """Distinct keys each query sees under several SA routings (a permutation ensemble reads the
    union of its members' windows): LongTensor [B|1, H|1, seq_len] in original order.

    ``perms``: the members' permutations, each [B|1, H|1, n] (the same shape for all). Each key
    is counted once however many members see it.
    """
    if not perms:
        raise ValueError("perms must hold at least one permutation")
    n = check_int("seq_len", seq_len, 0)
    window, sinks, layout = check_window(window), check_sinks(sinks), check_layout(layout)
    local = check_local(local, causal)
    found = [visible_keys(n, window, perm=perm, layout=layout, causal=causal, sinks=sinks,
                          key_mask=key_mask, local=local) for perm in perms]
    keys = torch.cat([k for k, _ in found], dim=-1)
    seen = torch.cat([s for _, s in found], dim=-1)
    # Distinct seen keys per query: sort them (unseen ones as n, last) and count the changes.
    keys = keys.masked_fill(~seen, n).sort(dim=-1).values
    first = torch.ones_like(seen)
    first[..., 1:] = keys[..., 1:] != keys[..., :-1]
    return (first & (keys < n)).sum(-1)
