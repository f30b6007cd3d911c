"""MoBA (mixture of block attention), training-free: each query attends to top-k key blocks.

Keys are cut into blocks of ``block_size`` consecutive positions. A query scores every block by
``q . mean(block keys)``, always keeps its own block (causally masked) and adds the best earlier
blocks, ``topk`` blocks in all; future blocks are never chosen. With ``topk`` >= the number of
blocks this is exactly full causal attention. ``sinks`` leading positions may be added to every
query. Two implementations: :func:`moba_reference` (one query at a time, obviously correct) and
:func:`moba_attention` (vectorised block choice + chunked masked SDPA, O(n^2 / chunk) memory).
"""

from __future__ import annotations

import torch

from .masked import chunked_masked_attention
from .reference import masked_attention


def _check(block_size: int, topk: int, sinks: int) -> None:
    for name, value, low in (("block_size", block_size, 1), ("topk", topk, 1), ("sinks", sinks, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def block_means(k: torch.Tensor, block_size: int, key_valid: torch.Tensor | None) -> tuple:
    """Mean key of each block over its real tokens: ([B, Hkv, nb, D], has_key [B, 1, nb])."""
    B, H, n, D = k.shape
    nb = -(-n // block_size)
    valid = (torch.ones(B, n, dtype=torch.bool, device=k.device) if key_valid is None
             else key_valid)
    pad = nb * block_size - n
    kv = torch.nn.functional.pad(k.float() * valid[:, None, :, None], (0, 0, 0, pad))
    count = torch.nn.functional.pad(valid.float(), (0, pad)).view(B, 1, nb, block_size).sum(-1)
    sums = kv.view(B, H, nb, block_size, D).sum(-2)
    return sums / count.clamp(min=1)[..., None], count > 0


def chosen_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int,
                  key_valid: torch.Tensor | None) -> torch.Tensor:
    """bool [B, Hq, n, nb]: the blocks each query attends to (own block + best earlier ones)."""
    B, Hq, n, _ = q.shape
    means, has_key = block_means(k, block_size, key_valid)
    means = means.repeat_interleave(Hq // k.shape[1], dim=1)
    nb = means.shape[2]
    gate = torch.matmul(q.float(), means.transpose(-1, -2))  # [B, Hq, n, nb]
    own = torch.div(torch.arange(n, device=q.device), block_size, rounding_mode="floor")[:, None]
    blk = torch.arange(nb, device=q.device)[None, :]
    gate = gate.masked_fill(blk == own, float("inf"))
    gate = gate.masked_fill((blk > own) | ~has_key[:, :, None, :], float("-inf"))
    top = gate.topk(min(topk, nb), dim=-1)
    chosen = torch.zeros_like(gate, dtype=torch.bool)
    chosen.scatter_(-1, top.indices, top.values > float("-inf"))
    return chosen | (blk == own)  # own block even when all its keys are padding (then masked)


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


def moba_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    *,
    sinks: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal MoBA. q [B, Hq, n, D], k/v [B, Hkv, n, D]; returns [B, Hq, n, D]."""
    _check(block_size, topk, sinks)
    n = q.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chosen = chosen_blocks(q, k, block_size, topk, key_padding_mask)

    def mask_rows(start: int, stop: int) -> torch.Tensor:
        rows = torch.arange(start, stop, device=q.device)
        return _visible(chosen[:, :, start:stop], rows, n, block_size, sinks, key_padding_mask)

    return chunked_masked_attention(q, k, v, mask_rows, scale)


def moba_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    topk: int,
    *,
    sinks: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The same rule, one (batch, head, query) at a time in plain Python. Tests only."""
    _check(block_size, topk, sinks)
    B, Hq, n, D = q.shape
    groups = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    valid = key_padding_mask if key_padding_mask is not None else torch.ones(B, n, dtype=torch.bool)
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
                best = {j for _, j in sorted(scores, key=lambda s: -s[0])[: topk - 1]}
                keep = torch.tensor([
                    (t // block_size in best or t // block_size == own or t < sinks)
                    and t <= i and bool(valid[b, t]) for t in range(n)])
                out[b, h, i] = masked_attention(q[b, h, i][None], kk, vv, keep[None], scale)[0]
    return out


def moba_attended_keys(seq_len: int, block_size: int, topk: int) -> torch.Tensor:
    """Keys each query sees (no padding, no sinks), [seq_len] long. Data-independent: earlier
    blocks are full, so every choice of ``topk - 1`` of them has the same size."""
    _check(block_size, topk, 0)
    i = torch.arange(seq_len)
    own = torch.div(i, block_size, rounding_mode="floor")
    return i - own * block_size + 1 + torch.clamp(own, max=topk - 1) * block_size
