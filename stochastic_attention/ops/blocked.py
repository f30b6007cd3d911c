"""The blocked backend: windowed attention in O(n * window) time and memory, pure PyTorch.

Works in SLOT space (tokens already gathered into permuted order; for SWA slot == position).
Queries are cut into tiles; each tile attends to the contiguous run of key slots its windows
can reach (``band``) or to its own group (``block``), plus the sink keys, with one batched
``scaled_dot_product_attention`` call. Masks are built from :mod:`.patterns`, the same rule the
reference uses, so the backends cannot drift apart. Autograd handles the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .patterns import band_extent, visible

# Query tile for the band layout: each tile of T queries reads T + window - 1 keys, so a small T
# wastes less work but makes smaller matmuls. 128 was the best on a 2-core CPU at window 256.
BAND_TILE = 128


def _tiles(x: torch.Tensor, size: int, step: int, pad_left: int, pad_right: int) -> torch.Tensor:
    """[..., n, D] -> [..., n_tiles, size, D]: overlapping windows along the sequence (a view)."""
    x = F.pad(x, (0, 0, pad_left, pad_right))
    return x.unfold(-2, size, step).transpose(-1, -2)


def _tiles1d(x: torch.Tensor, size: int, step: int, pad_left: int, pad_right: int, value) -> torch.Tensor:
    """[..., n] -> [..., n_tiles, size] for index / mask tensors."""
    x = F.pad(x, (pad_left, pad_right), value=value)
    return x.unfold(-1, size, step)


def _attend(q, k, v, mask, scale, guard_empty_rows: bool):
    """One batched SDPA over tiles. q [B,H,nt,T,D]; k,v [B,H,nt,L,D]; mask bool [Bm,Hm,nt,T,L]|None."""
    B, H, nt, T, D = q.shape
    L = k.shape[-2]
    q4, k4, v4 = (x.reshape(B * H, nt, x.shape[-2], D) for x in (q, k, v))
    if mask is None:
        out = F.scaled_dot_product_attention(q4, k4, v4, scale=scale)
        return out.view(B, H, nt, T, D)
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        mask4 = mask.reshape(1, nt, T, L)
    else:
        mask4 = mask.expand(B, H, nt, T, L).reshape(B * H, nt, T, L)
    has_key = None
    if guard_empty_rows:
        # Rows with no visible key must give 0 without NaN in either pass: let them see every key,
        # then zero them (their gradient is then zero too).
        has_key = mask4.any(dim=-1, keepdim=True)
        mask4 = mask4 | ~has_key
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask4, scale=scale)
    if has_key is not None:
        out = out * has_key
    return out.view(B, H, nt, T, D)


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    pos: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    layout: str,
    causal: bool,
    sinks: int,
    sink_k: torch.Tensor | None,
    sink_v: torch.Tensor | None,
    sink_valid: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of each slot to the keys of its window (and the sinks), in slot space.

    q, k, v: [B, H, n, D] in slot order (k, v already expanded to H heads).
    pos: [B|1, H|1, n] original position of each slot, or None when slot == position (SWA).
    key_valid: [B, 1|H, n] bool in slot order, or None. For ``block`` the caller sorts every
    group of ``window`` slots by position (see :func:`sort_groups`).
    sink_k, sink_v: [B, H, S, D] keys/values at original positions 0..S-1; sink_valid [B, 1, S].
    window < n is assumed (the dispatcher sends window >= n to full attention).
    """
    B, H, n, D = q.shape
    device = q.device
    guard = key_valid is not None or device.type != "cpu"

    if layout == "block":
        T = window
        left, right = 0, 0
        L = T
    else:
        T = min(BAND_TILE, n)
        left, right = band_extent(window, causal)
        L = T + left + right
    nt = -(-n // T)
    n_pad = nt * T
    slot = torch.arange(n, device=device)

    qt = F.pad(q, (0, 0, 0, n_pad - n)).view(B, H, nt, T, D)
    if layout == "block":
        kt = F.pad(k, (0, 0, 0, n_pad - n)).view(B, H, nt, T, D)
        vt = F.pad(v, (0, 0, 0, n_pad - n)).view(B, H, nt, T, D)
        key_slot = F.pad(slot, (0, n_pad - n), value=-1).view(nt, 1, T)
    else:
        kt = _tiles(k, L, T, left, right + n_pad - n)
        vt = _tiles(v, L, T, left, right + n_pad - n)
        key_slot = _tiles1d(slot, L, T, left, right + n_pad - n, value=-1).view(nt, 1, L)
    query_slot = F.pad(slot, (0, n_pad - n), value=n_pad).view(nt, T, 1)

    def as_tiles(x, fill):  # [.., n] -> key tiles [.., nt, 1, L] / query tiles [.., nt, T, 1]
        if layout == "block":
            kx = F.pad(x, (0, n_pad - n), value=fill).view(*x.shape[:-1], nt, 1, T)
        else:
            kx = _tiles1d(x, L, T, left, right + n_pad - n, fill).unsqueeze(-2)
        qx = F.pad(x, (0, n_pad - n), value=fill).view(*x.shape[:-1], nt, T, 1)
        return qx, kx

    # Which window keys are visible: the shared rule, evaluated on tiles. Out-of-range key slots
    # (tile padding) are invalid; window keys that are sinks are dropped here and come back once,
    # below, as sink keys.
    if pos is None:
        q_pos, k_pos = query_slot, key_slot
    else:
        q_pos, k_pos = as_tiles(pos, n_pad)
    k_ok = key_slot >= 0
    if key_valid is not None:
        k_ok = k_ok & as_tiles(key_valid, False)[1]
    if sinks > 0:
        k_ok = k_ok & (k_pos >= sinks)
    mask = visible(query_slot, key_slot, q_pos, k_pos, window=window, layout=layout,
                   causal=causal, sinks=0, seq_len=n, key_valid=k_ok)
    mask = mask.view((1,) * (5 - mask.dim()) + tuple(mask.shape))

    if sink_k is not None:
        S = sink_k.shape[-2]
        s_pos = torch.arange(S, device=device).view(1, 1, S)
        s_mask = (s_pos <= q_pos) if causal else torch.ones_like(s_pos, dtype=torch.bool)
        if sink_valid is not None:
            s_mask = s_mask & sink_valid.unsqueeze(-2).unsqueeze(-2)
        lead = torch.broadcast_shapes(s_mask.shape[:-1], mask.shape[:-1])
        mask = torch.cat([mask.expand(*lead, mask.shape[-1]), s_mask.expand(*lead, S)], dim=-1)
        kt = torch.cat([kt, sink_k.unsqueeze(2).expand(B, H, nt, S, D)], dim=-2)
        vt = torch.cat([vt, sink_v.unsqueeze(2).expand(B, H, nt, S, D)], dim=-2)

    out = _attend(qt, kt, vt, mask, scale, guard)
    return out.reshape(B, H, n_pad, D)[:, :, :n]


def sort_groups(perm: torch.Tensor, window: int) -> torch.Tensor:
    """Reorder each group of ``window`` consecutive slots by original position.

    The block layout's key set per group does not depend on the order inside the group, so this
    changes nothing in the result and turns the causal test into a plain lower triangle.
    """
    n = perm.shape[-1]
    n_pad = -(-n // window) * window
    # Padding gets positions >= n: it sorts to the end of the last group, so after sorting the
    # first n entries are exactly the real tokens.
    pad = torch.arange(n, n_pad, device=perm.device).expand(*perm.shape[:-1], -1)
    grouped = torch.cat([perm, pad], -1).view(*perm.shape[:-1], n_pad // window, window)
    return grouped.sort(dim=-1).values.reshape(*perm.shape[:-1], n_pad)[..., :n]


def dense_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                causal: bool) -> torch.Tensor:
    """Block layout without sinks or padding, groups sorted by position: every tile is dense.

    One SDPA call over [B*H, groups, window, D] with ``is_causal`` (a plain lower triangle). A
    partial last group is zero-padded at its end, which no real query sees under causality.
    """
    B, H, n, D = q.shape
    nt = -(-n // window)
    n_pad = nt * window
    if n_pad != n:
        assert causal, "non-causal partial groups need a key mask"
        q, k, v = (F.pad(x, (0, 0, 0, n_pad - n)) for x in (q, k, v))
    q4, k4, v4 = (x.reshape(B * H, nt, window, D) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=scale)
    return out.reshape(B, H, n_pad, D)[:, :, :n]
