"""MoBA (mixture of block attention), training-free: each query attends to top-k key blocks.

Keys are cut into blocks of ``block_size`` consecutive positions. A query scores every block by
``q . mean(block keys)``, always keeps its own block (causally masked) and adds the best earlier
blocks, ``top_k`` blocks in all; future blocks are never chosen. With ``top_k`` >= the number of
blocks this is exactly full causal attention. The first ``sinks`` tokens may be added to every
query. With a key padding mask, every row's real tokens are first moved, in order, in front of
its padding (and moved back afterwards): blocks and sinks are then counted over real tokens, so
a sequence gives the same output alone or padded in a batch, and padded keys and values never
reach an output. Implementations: :func:`moba_reference` (one query at a time, obviously correct),
:func:`moba_attention` (block-sparse, O(n * top_k * block_size) time and memory, below) and
:func:`moba_masked` (a chunked dense mask, O(n^2) time; a cross-check).

The block-sparse path splits each query's keys into disjoint parts and merges them exactly by
their log-sum-exps: its own block (a causal tile, with the sinks) and each chosen earlier block
(always full, so no causal mask). The (query, earlier block) pairs are sorted by block and
packed ``PAIR_TILE`` queries at a time against that block's keys, so every product is a dense
matmul whatever the routing.
"""

from __future__ import annotations

import torch

from . import blocked, documents
from .dense import all_finite, compute_dtype, masked_attention, merge_attention, repeat_kv, zero_padding
from .masked import chunked_masked_attention
from .permute import permute_seq, real_tokens_first
from .validate import (
    check_bool,
    check_causal_only,
    check_int,
    check_key_mask,
    check_qkv,
    check_scale,
    check_sinks,
    reject_renamed,
)

# Queries packed against one key block per matmul in the block-sparse path.
PAIR_TILE = 64


def _checked(q, k, v, block_size, top_k, *, causal, sinks, key_mask, scale, name) -> dict:
    """The arguments of a MoBA operator, checked once: keywords for the implementations."""
    check_qkv(q, k, v)
    check_causal_only(name, check_bool("causal", causal))
    B, _, n, D = q.shape
    check_key_mask(key_mask, B, n, q.device)
    return dict(block_size=check_int("block_size", block_size, 1),
                top_k=check_int("top_k", top_k, 1, hint=" (blocks per query, its own included)"),
                sinks=check_sinks(sinks), key_mask=key_mask, scale=check_scale(scale, D))


def _real_tokens_first(impl, q, k, v, *, block_size, top_k, sinks, key_mask, scale):
    """Run ``impl`` with each row's real tokens moved (stably) in front of its padding.

    Padded keys and values are zeroed by selection first, so even NaN padding cannot reach an
    output. Blocks and sinks are then counted over real tokens only.
    """
    if key_mask is None:
        return impl(q, k, v, block_size, top_k, sinks=sinks, key_mask=None, scale=scale)
    k, v = zero_padding(k, key_mask), zero_padding(v, key_mask)
    order, inv, kpm = real_tokens_first(key_mask)
    q, k, v = (permute_seq(x, order, inv) for x in (q, k, v))
    out = impl(q, k, v, block_size, top_k, sinks=sinks, key_mask=kpm, scale=scale)
    return permute_seq(out, inv, order)


def block_means(k: torch.Tensor, block_size: int, key_valid: torch.Tensor | None) -> tuple:
    """Mean key of each block over its real tokens: ([B, Hkv, nb, D], has_key [B, 1, nb])."""
    B, H, n, D = k.shape
    nb = -(-n // block_size)
    valid = (torch.ones(B, n, dtype=torch.bool, device=k.device) if key_valid is None
             else key_valid)
    pad = nb * block_size - n
    dt = compute_dtype(k)
    kv = torch.nn.functional.pad(k.to(dt).masked_fill(~valid[:, None, :, None], 0), (0, 0, 0, pad))
    count = torch.nn.functional.pad(valid.to(dt), (0, pad)).view(B, 1, nb, block_size).sum(-1)
    sums = kv.view(B, H, nb, block_size, D).sum(-2)
    return sums / count.clamp(min=1)[..., None], count > 0


def chosen_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int,
                  key_valid: torch.Tensor | None) -> torch.Tensor:
    """bool [B, Hq, n, nb]: the blocks each query attends to (own block + best earlier ones)."""
    index, used = top_blocks(q, k, block_size, top_k, key_valid)
    chosen = torch.zeros(*q.shape[:3], -(-k.shape[2] // block_size), dtype=torch.bool,
                         device=q.device)
    chosen.scatter_(-1, index, used)
    own = torch.div(torch.arange(q.shape[2], device=q.device), block_size, rounding_mode="floor")
    return chosen | (torch.arange(chosen.shape[-1], device=q.device) == own[:, None])


def top_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, top_k: int,
               key_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(block [B, Hq, n, t], used [B, Hq, n, t]) with t = min(top_k, blocks): each query's blocks,
    its own always first-ranked; ``used`` is False where fewer earlier blocks exist."""
    B, Hq, n, _ = q.shape
    means, has_key = block_means(k, block_size, key_valid)
    means = repeat_kv(means, Hq // k.shape[1])
    nb = means.shape[2]
    gate = torch.matmul(q.to(means.dtype), means.transpose(-1, -2))  # [B, Hq, n, nb]
    own = torch.div(torch.arange(n, device=q.device), block_size, rounding_mode="floor")[:, None]
    blk = torch.arange(nb, device=q.device)[None, :]
    # Own block last: it is always first-ranked, even when it holds no real key (a padded query).
    gate = gate.masked_fill((blk > own) | ~has_key[:, :, None, :], float("-inf"))
    gate = gate.masked_fill(blk == own, float("inf"))
    top = gate.topk(min(top_k, nb), dim=-1)
    return top.indices, top.values > float("-inf")


def _visible(chosen_rows, rows, n, block_size, sinks, key_valid):
    """Key visibility [B, Hq, len(rows), n] from the chosen blocks of those query rows."""
    pos_k = torch.arange(n, device=rows.device)
    block_of = torch.div(pos_k, block_size, rounding_mode="floor")
    vis = chosen_rows[..., block_of]
    if sinks > 0:
        vis = vis | (pos_k < sinks)
    vis = vis & (pos_k[None, :] <= rows[:, None])
    if key_valid is not None:
        vis = vis & key_valid[:, None, None, :]
    return vis


@reject_renamed
def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal MoBA, block-sparse (see the module doc), O(n * top_k * block_size). Differentiable.

    Args:
        q: [batch, heads_q, seq, head_dim]; k, v: [batch, heads_kv, seq, head_dim] with
            heads_q a multiple of heads_kv (grouped-query attention).
        block_size: keys per block (>= 1); top_k: blocks per query, its own included (>= 1).
        causal: MoBA is causal only (True).
        sinks: the first ``sinks`` real tokens are visible to every later query.
        key_mask: bool [batch, seq], True for real tokens (blocks count real tokens only).
        scale: softmax scale, default ``head_dim ** -0.5``.
        document_ids, cu_seqlens: packed documents, each attended as alone, its blocks counted
            from its first token (:mod:`.documents`).

    Returns:
        [batch, heads_q, seq, head_dim], in q's dtype.
    """
    if document_ids is not None or cu_seqlens is not None:
        return documents.packed_operator(moba_attention, q, k, v, block_size, top_k,
                                         causal=causal, sinks=sinks, key_mask=key_mask,
                                         scale=scale, document_ids=document_ids,
                                         cu_seqlens=cu_seqlens)
    args = _checked(q, k, v, block_size, top_k, causal=causal, sinks=sinks, key_mask=key_mask,
                    scale=scale, name="moba_attention")
    return _real_tokens_first(_block_sparse, q, k, v, **args)


def _block_sparse(q, k, v, block_size, top_k, *, sinks, key_mask, scale):
    """:func:`moba_attention` on real-tokens-first rows (padding, if any, trails each row)."""
    B, Hq, n, D = q.shape
    if n == 0:
        return q.new_zeros(q.shape)
    groups = Hq // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    sinks = min(sinks, n)
    kpm = key_mask
    # Own block: the block layout with slot == position (a causal tile), plus the sinks; sink
    # positions are dropped from every block so they count once.
    ident = torch.arange(n, device=q.device).view(1, 1, n)
    own_out, own_lse = blocked.windowed_attention(
        q, k, v, min(block_size, n), pos=ident, key_valid=None if kpm is None else kpm[:, None],
        layout="block", causal=True, sinks=sinks, sink_k=k[:, :, :sinks] if sinks else None,
        sink_v=v[:, :, :sinks] if sinks else None,
        sink_valid=None if kpm is None or not sinks else kpm[:, None, :sinks], scale=scale,
        return_lse=True)
    index, used = top_blocks(q, k, block_size, top_k, kpm)
    own_block = torch.div(torch.arange(n, device=q.device), block_size, rounding_mode="floor")
    other = used & (index != own_block[:, None])  # earlier blocks: full, no causal mask
    if not bool(other.any()):
        return own_out.to(q.dtype)
    part_out, part_lse = _earlier_blocks(q, k, v, index, other, block_size, sinks, kpm, scale)
    out, _ = merge_attention([own_out.to(part_out.dtype), *part_out.unbind(-2)],
                             [own_lse, *part_lse.unbind(-1)])
    return out.to(q.dtype)


def _earlier_blocks(q, k, v, index, other, block_size, sinks, kpm, scale):
    """Attention of each (query, chosen earlier block) pair to that block's keys alone.

    Returns out [B, Hq, n, t, D] (normalised within the block) and lse [B, Hq, n, t] (-inf where
    the slot is not an earlier block or the block has no visible key).
    """
    B, Hq, n, D = q.shape
    t = index.shape[-1]
    nb = -(-n // block_size)
    G = B * Hq
    # Pairs (problem g = b * Hq + h, query i, slot s), grouped by key (g, block).
    g, i, s = other.view(G, n, t).nonzero(as_tuple=True)
    blk = index.view(G, n, t)[g, i, s]
    group = g * nb + blk
    order = torch.argsort(group, stable=True)
    g, i, s, blk, group = g[order], i[order], s[order], blk[order], group[order]
    counts = torch.bincount(group, minlength=G * nb)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.numel(), device=q.device) - start[group]
    tiles = -(-counts // PAIR_TILE)
    tile_start = torch.cumsum(tiles, 0) - tiles
    tile = tile_start[group] + torch.div(rank, PAIR_TILE, rounding_mode="floor")
    slot = rank % PAIR_TILE
    n_tiles = int(tiles.sum())
    # Query rows of each tile (a zero row pads it) and the keys of its block.
    rows = torch.full((n_tiles, PAIR_TILE), G * n, dtype=torch.long, device=q.device)
    rows[tile, slot] = g * n + i
    q_rows = torch.cat([q.reshape(G * n, D), q.new_zeros(1, D)])[rows]  # [T, P, D]
    tile_group = torch.zeros(n_tiles, dtype=torch.long, device=q.device)
    tile_group[tile] = group
    pad = nb * block_size - n
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(G * nb, block_size, D)[tile_group]
    vb = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(G * nb, block_size, D)[tile_group]
    pos = torch.arange(nb * block_size, device=q.device).view(nb, block_size)
    key_ok = (pos < n) & (pos >= sinks)  # sinks come back once, in the own-block part
    if kpm is not None:
        key_ok = key_ok & torch.nn.functional.pad(kpm, (0, pad)).view(B, 1, nb, block_size)
    key_ok = key_ok.expand(B, Hq, nb, block_size).reshape(G * nb, block_size)[tile_group]
    dt = compute_dtype(q)
    bias = torch.zeros(key_ok.shape, dtype=dt, device=q.device)
    bias = bias.masked_fill(~key_ok, float("-inf"))[:, None, :]  # [T, 1, bs]
    out, lse = blocked.attend_with_lse(q_rows, kb, vb, bias, scale,  # [T, P, D], [T, P]
                                       select=not all_finite(k))
    part_out = q.new_zeros(G, n, t, D, dtype=dt).index_put((g, i, s), out[tile, slot])
    part_lse = torch.full((G, n, t), float("-inf"), dtype=dt, device=q.device).index_put(
        (g, i, s), lse[tile, slot])
    return part_out.view(B, Hq, n, t, D), part_lse.view(B, Hq, n, t)


def moba_masked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal MoBA through a chunked dense mask: O(n^2) time. Same result as
    :func:`moba_attention` (a cross-check), same arguments."""
    args = _checked(q, k, v, block_size, top_k, causal=causal, sinks=sinks, key_mask=key_mask,
                    scale=scale, name="moba_masked")
    return _real_tokens_first(_chunked_dense, q, k, v, **args)


def _chunked_dense(q, k, v, block_size, top_k, *, sinks, key_mask, scale):
    n = q.shape[2]
    chosen = chosen_blocks(q, k, block_size, top_k, key_mask)

    def mask_rows(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=q.device)
        return _visible(chosen[:, :, start:stop], rows, n, block_size, sinks, key_mask)

    return chunked_masked_attention(q, k, v, mask_rows, scale)


def moba_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    top_k: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The same rule, one (batch, head, query) at a time in plain Python. Tests only."""
    args = _checked(q, k, v, block_size, top_k, causal=causal, sinks=sinks, key_mask=key_mask,
                    scale=scale, name="moba_reference")
    return _real_tokens_first(_one_query_at_a_time, q, k, v, **args)


def _one_query_at_a_time(q, k, v, block_size, top_k, *, sinks, key_mask, scale):
    B, Hq, n, D = q.shape
    groups = Hq // k.shape[1]
    valid = key_mask if key_mask is not None else torch.ones(B, n, dtype=torch.bool)
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            kk, vv = k[b, h // groups], v[b, h // groups]
            for i in range(n):
                own = i // block_size
                scores = []
                for j in range(own):
                    real = [t for t in range(j * block_size, (j + 1) * block_size) if valid[b, t]]
                    if real:
                        mean = kk[real].float().mean(0)
                        scores.append((float(q[b, h, i].detach().float() @ mean.detach()), j))
                best = {j for _, j in sorted(scores, key=lambda s: -s[0])[: top_k - 1]}
                keep = torch.tensor([
                    (t // block_size in best or t // block_size == own or t < sinks)
                    and t <= i and bool(valid[b, t]) for t in range(n)])
                out[b, h, i] = masked_attention(q[b, h, i][None], kk, vv, keep[None], scale)[0]
    return out


def moba_attended_keys(seq_len: int, block_size: int, top_k: int) -> torch.Tensor:
    """Keys each query sees (no padding, no sinks), [seq_len] long. Data-independent: earlier
    blocks are full, so every choice of ``top_k - 1`` of them has the same size."""
    check_int("block_size", block_size, 1)
    check_int("top_k", top_k, 1)
    i = torch.arange(check_int("seq_len", seq_len, 0))
    own = torch.div(i, block_size, rounding_mode="floor")
    return i - own * block_size + 1 + torch.clamp(own, max=top_k - 1) * block_size
