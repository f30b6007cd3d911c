"""Operators composed of other operators: a permutation ensemble and a head split.

:func:`ensemble_attention` averages stochastic attention over several independent routings;
:func:`head_split_attention` sends some query heads through one operator and the rest through
another (e.g. SA heads and SWA heads in one layer). The Hugging Face patch serves its
``ensemble`` and ``head_split`` settings with them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..functional import stochastic_attention
from .dense import repeat_kv
from .permute import routing_permutation
from .validate import check_int, check_qkv

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["ensemble_attention", "head_split_attention"]


def ensemble_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    members: int,
    generator: torch.Generator | None = None,
    layout: str = "band",
    sinks: int = 0,
    local: int = 0,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The mean of causal stochastic attention over ``members`` independent routings.

    Member i attends under the i-th routing drawn from ``generator`` by
    :func:`~stochastic_attention.ops.permute.routing_permutation`, one per query head
    ([B|1, heads_q, n], over each row's real tokens; each draw advances the generator), so
    ``members`` times the attention work. ``members=1`` is one SA call under that routing.
    Other arguments as in :func:`stochastic_attention.stochastic_attention`.

    Returns:
        [batch, heads_q, seq, head_dim], in q's dtype.
    """
    check_qkv(q, k, v)
    members = check_int("members", members, 1, hint=" (routings averaged)")
    B, H, n, _ = q.shape
    out = None
    for _ in range(members):
        # Drawn over each row's real tokens from its own copy of the generator: a sequence gets
        # the same routing alone or padded in any batch.
        perm = routing_permutation(B, H, n, key_mask=key_mask, generator=generator,
                                   device=q.device)
        one = stochastic_attention(q, k, v, window, perm=perm, layout=layout, sinks=sinks,
                                   local=local, key_mask=key_mask, scale=scale, backend=backend)
        out = one if out is None else out + one
    return out / members if members > 1 else out


def head_split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: int,
                         first: Attend, rest: Attend) -> torch.Tensor:
    """Query heads ``[0, split)`` through ``first``, heads ``[split, heads_q)`` through ``rest``.

    ``first`` and ``rest`` map (q, k, v) of their heads to outputs of the same heads. With a
    split inside the query heads, k and v are expanded to the query heads first (the split need
    not fall on a grouped-query boundary); ``split >= heads_q`` runs ``first`` on the original
    tensors, ``split == 0`` runs ``rest`` alone.

    Returns:
        [batch, heads_q, seq, head_dim]: the two outputs stacked along the heads.
    """
    check_qkv(q, k, v)
    hq = q.shape[1]
    split = min(check_int("split", split, 0, hint=" (query heads of the first operator)"), hq)
    if split == hq:
        return first(q, k, v)
    groups = hq // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    out_rest = rest(q[:, split:], k[:, split:], v[:, split:])
    if split == 0:
        return out_rest
    return torch.cat([first(q[:, :split], k[:, :split], v[:, :split]), out_rest], dim=1)
