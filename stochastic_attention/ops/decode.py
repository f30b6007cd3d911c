"""Decoding over a KV cache: sampled sparse keys in O(sinks + local + window) per token, or dense.

:func:`cached_attention` is the dense form (a causal window and sinks counted in real tokens, or
the whole cache). The rest of this module is :func:`sparse_decode`.

A new query whose row holds ``t + 1`` visible real tokens (its own rank among the row's real
tokens is ``t``) attends to

- the sinks: ranks ``[0, sinks)``,
- the local keys: the last ``local`` ranks ``(t - local, t]``,
- ``window`` ranks drawn uniformly without replacement among the other visible ranks
  ``[sinks, t - local]`` (all of them when there are no more than ``window``).

The three sets are disjoint, so a short cache simply yields fewer keys. Draws are made per row
and name ranks, not cache slots: each row draws from a generator seeded by (seed, layer, its
number of real tokens), so a sequence samples the same keys alone or left-padded in a batch.

Only the selected keys and values are gathered, so the attention costs O(sinks + local +
window) per query whatever the cache length; the draw itself costs O(window). Besides the cache,
the one O(cache) piece of work per step is a cumulative sum over the ``[batch, cache]`` padding
mask (to map ranks to slots), skipped when there is no padding. There is no ``[L, S]`` mask.
:func:`sparse_decode_reference` computes the same output from the same draw with a dense mask.
"""

from __future__ import annotations

import torch

from .dense import compute_dtype, masked_sdpa, repeat_kv
from .validate import check_int

Draw = tuple[torch.Tensor, torch.Tensor]


def decode_generator(seed: int, layer_idx: int, real_tokens: int) -> torch.Generator:
    """The CPU generator a row draws its keys from (seeded like the HF patch's generators)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + layer_idx) * 1_000_003 + real_tokens)
    return g


def sample_distinct(pool: torch.Tensor, m: int,
                    generator: torch.Generator | None = None) -> Draw:
    """``m`` distinct offsets drawn uniformly from ``[0, pool)`` for every entry of ``pool``.

    pool: long tensor (CPU) of any shape. Returns ``(offsets [..., m] long, keep [..., m] bool)``;
    where ``pool <= m`` the offsets are ``0 .. pool - 1`` and ``keep`` marks the real ones.
    Costs O(m) per entry, not O(pool): a pool up to ``2m`` ranks ``2m`` random priorities; a
    larger one takes the first ``m`` distinct values of i.i.d. uniform draws (made in blocks of
    ``2m`` until every entry has ``m``), which is sampling without replacement by rejection.
    """
    shape = pool.shape
    slots = torch.arange(m)
    offsets = slots.expand(*shape, m).clone()
    keep = slots < pool[..., None]
    if m == 0:
        return offsets, keep
    medium = (pool > m) & (pool <= 2 * m)
    if bool(medium.any()):
        prio = torch.rand(*shape, 2 * m, generator=generator)
        prio = prio.masked_fill(torch.arange(2 * m) >= pool[..., None], -1.0)
        offsets = torch.where(medium[..., None], prio.topk(m, dim=-1).indices, offsets)
    large = pool > 2 * m
    if bool(large.any()):
        bound = pool.clamp_min(1)[..., None]
        draws = pool.new_empty(*shape, 0)
        while True:
            u = torch.rand(*shape, 2 * m, dtype=torch.float64, generator=generator)
            draws = torch.cat([draws, torch.minimum((u * bound).long(), bound - 1)], dim=-1)
            first = _first_occurrences(draws)
            if bool(((first.sum(-1) >= m) | ~large).all()):
                break
        n = draws.shape[-1]
        taken = first & (first.cumsum(-1) <= m)
        order = torch.where(taken, torch.arange(n), n).topk(m, dim=-1, largest=False).indices
        offsets = torch.where(large[..., None], draws.gather(-1, order), offsets)
    return offsets, keep


def _first_occurrences(draws: torch.Tensor) -> torch.Tensor:
    """True where a value appears for the first time along the last dim."""
    values, order = draws.sort(dim=-1, stable=True)  # stable: the earliest draw leads its group
    new = torch.ones_like(values, dtype=torch.bool)
    new[..., 1:] = values[..., 1:] != values[..., :-1]
    return torch.empty_like(new).scatter_(-1, order, new)


def query_ranks(valid: torch.Tensor | None, batch: int, cache_len: int, new: int,
                device=None) -> torch.Tensor:
    """[B, L] rank of each new query (the last ``new`` slots) among its row's real tokens."""
    if valid is None:
        return torch.arange(cache_len - new, cache_len, device=device).expand(batch, new)
    tail = valid[:, cache_len - new:].long()
    # rank = real tokens up to and including the slot, minus one, counted from the end
    after = tail.flip(-1).cumsum(-1).flip(-1) - tail
    return valid.sum(-1, keepdim=True) - 1 - after


def draw_decode_keys(q_rank: torch.Tensor, real_tokens: list[int], heads: int, *, sinks: int,
                     local: int, window: int, seed: int | None, layer_idx: int) -> Draw:
    """The random keys of every (row, head, query): ``(ranks, keep)``, each [B, heads, L, window].

    ``real_tokens[b]`` seeds row b's generator; ``seed=None`` draws from torch's global RNG.
    """
    pool = (q_rank.cpu() - local + 1 - sinks).clamp_min(0)  # ranks [sinks, t - local]
    ranks, keeps = [], []
    for b, real in enumerate(real_tokens):
        g = None if seed is None else decode_generator(seed, layer_idx, real)
        offsets, keep = sample_distinct(pool[b].expand(heads, -1), window, g)
        ranks.append(offsets + sinks)
        keeps.append(keep)
    device = q_rank.device
    return torch.stack(ranks).to(device), torch.stack(keeps).to(device)


def selected_ranks(q_rank: torch.Tensor, draw: Draw, *, sinks: int, local: int) -> Draw:
    """Sinks, local keys and the drawn keys of every query: ``(ranks, keep)`` [B, H, L, K]."""
    ranks, keep = draw
    B, H, L, _ = ranks.shape
    t = q_rank[:, None, :, None]  # [B, 1, L, 1]
    sink = torch.arange(sinks, device=ranks.device).expand(B, 1, L, sinks)
    recent = t - local + 1 + torch.arange(local, device=ranks.device)
    fixed = torch.cat([sink, recent.expand(B, 1, L, local)], dim=-1)
    # a recent key inside the sinks is kept as a sink; a sink past the query is not visible
    fixed_keep = torch.cat([sink <= t, recent >= sinks], dim=-1).expand(B, H, L, -1)
    return (torch.cat([fixed.expand(B, H, L, -1), ranks], dim=-1),
            torch.cat([fixed_keep, keep], dim=-1))


def ranks_to_slots(ranks: torch.Tensor, valid: torch.Tensor | None, cache_len: int) -> torch.Tensor:
    """Cache slots of the given real-token ranks (rank r is the row's (r+1)-th real token).

    Ranks that name no token (unkept entries) map to some slot in range, never out of it.
    """
    if valid is None:
        return ranks.clamp(0, cache_len - 1)
    counts = valid.long().cumsum(-1)  # one int per cached slot: the only O(cache) tensor
    B = ranks.shape[0]
    slots = torch.searchsorted(counts, ranks.clamp_min(0).reshape(B, -1) + 1)
    return slots.clamp_max(cache_len - 1).view_as(ranks)


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                       keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of q [B, Hq, L, D] over the keys at ``slots`` [B, Hq, L, K] only."""
    B, hq, L, D = q.shape
    kv_head = (torch.arange(hq, device=q.device) // (hq // k.shape[1]))[None, :, None, None]
    b_idx = torch.arange(B, device=q.device)[:, None, None, None]
    kg, vg = (_gather_rows(x, b_idx, kv_head, slots) for x in (k, v))  # [B, Hq, L, K, D]
    dt = compute_dtype(q)
    scores = (q.to(dt).unsqueeze(-2) @ kg.to(dt).transpose(-1, -2)).squeeze(-2) * scale
    p = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p.unsqueeze(-2) @ vg.to(dt)).squeeze(-2).to(q.dtype)


def _gather_rows(x: torch.Tensor, b_idx, head, slots) -> torch.Tensor:
    """x[b, head, slot] for every entry of slots: [*slots.shape, D]."""
    if x.is_contiguous():
        # index_select on the flattened cache copies whole rows: much faster than the
        # equivalent advanced indexing on CPU
        _, H, S, D = x.shape
        flat = ((b_idx * H + head) * S + slots).reshape(-1)
        return x.view(-1, D).index_select(0, flat).view(*slots.shape, D)
    return x[b_idx, head, slots]  # a strided view: gather in place rather than copy the cache


def sparse_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  valid: torch.Tensor | None = None, *, window: int, sinks: int = 0,
                  local: int = 1, seed: int | None = 0, layer_idx: int = 0,
                  scale: float | None = None, draw: Draw | None = None) -> torch.Tensor:
    """New queries q [B, Hq, L, D] at the last L slots of the cache k, v [B, Hkv, S, D].

    valid: [B, S] bool, True for real tokens (None: no padding). Each query attends to its
    sinks, last ``local`` tokens (itself included) and ``window`` random earlier tokens (see the
    module docstring). ``draw`` reuses the random keys of :func:`draw_decode_keys`.
    """
    B, hq, L, D = q.shape
    S = k.shape[2]
    _check(q, k, v, valid, window=window, sinks=sinks, local=local)
    scale = D ** -0.5 if scale is None else scale
    q_rank = query_ranks(valid, B, S, L, q.device)
    if draw is None:
        real = [S] * B if valid is None else valid.sum(-1).tolist()
        draw = draw_decode_keys(q_rank, real, hq, sinks=sinks, local=local, window=window,
                                seed=seed, layer_idx=layer_idx)
    ranks, keep = selected_ranks(q_rank, draw, sinks=sinks, local=local)
    return gathered_attention(q, k, v, ranks_to_slots(ranks, valid, S), keep, scale)


def sparse_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            valid: torch.Tensor | None, draw: Draw, *, sinks: int, local: int,
                            scale: float | None = None) -> torch.Tensor:
    """Slow reference of :func:`sparse_decode` for the same draw: a dense [B, Hq, L, S] mask
    from the rank definitions (causal, real, sink or recent or drawn) and masked softmax."""
    B, hq, L, D = q.shape
    S = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    real = torch.ones(B, S, dtype=torch.bool) if valid is None else valid.cpu()
    rank = real.long().cumsum(-1) - 1
    k_rank, q_rank = rank[:, None, None, :], rank[:, None, S - L:, None]
    causal = (torch.arange(S)[None, :] <= torch.arange(S - L, S)[:, None]) & real[:, None, None]
    fixed = causal & ((k_rank < sinks) | (k_rank > q_rank - local))
    ranks, keep = (x.cpu() for x in draw)
    drawn = torch.zeros(B, hq, L, S + 1, dtype=torch.bool)
    slot_of = [torch.nonzero(real[b]).flatten() for b in range(B)]
    for b, h, i, j in keep.nonzero().tolist():
        drawn[b, h, i, slot_of[b][ranks[b, h, i, j]]] = True
    mask = (fixed | (drawn[..., :S] & causal)).to(q.device)
    groups = hq // k.shape[1]
    kk, vv = repeat_kv(k, groups).double(), repeat_kv(v, groups).double()
    scores = (q.double() @ kk.transpose(-1, -2)) * scale
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ vv).to(q.dtype)


def _check(q, k, v, valid, *, window: int, sinks: int, local: int) -> None:
    for name, value, low in (("window", window, 0), ("sinks", sinks, 0), ("local", local, 1)):
        check_int(name, value, low)
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0]:
        raise ValueError(f"q must be [B, Hq, L, D] and k, v [B, Hkv, S, D]; got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]}) "
                         f"and q length ({q.shape[2]}) at most the cache length ({k.shape[2]})")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"valid must be a bool [batch, cache] = {[k.shape[0], k.shape[2]]} mask,"
                         f" got {valid.dtype} {list(valid.shape)}")


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int,
                     key_mask: torch.Tensor | None, scale: float | None = None) -> torch.Tensor:
    """Queries at the last L positions of k/v: a causal band of ``window`` keys plus sinks.

    Windows and sinks count real tokens (``key_mask`` True), so a left-padded row sees
    the keys it would see alone; ``window >= S`` is full attention over the cache. Dense over
    the cache: with L = 1 (decoding) that is O(cache) per token anyway. ``scale`` None is
    SDPA's default.
    """
    B, L, S = q.shape[0], q.shape[2], k.shape[2]
    valid = (key_mask if key_mask is not None
             else torch.ones(B, S, dtype=torch.bool, device=q.device))
    rank = valid.long().cumsum(-1) - 1  # index of each key among its row's real tokens
    k_rank, q_rank = rank[:, None, None, :], rank[:, None, S - L:, None]
    slot = torch.arange(S, device=q.device)
    causal = (slot[None, :] <= slot[S - L:, None]) & valid[:, None, None, :]  # [B, 1, L, S]
    mask = causal & ((k_rank > q_rank - window) | (k_rank < sinks))
    groups = q.shape[1] // k.shape[1]
    return masked_sdpa(q, repeat_kv(k, groups), repeat_kv(v, groups), mask, scale)
