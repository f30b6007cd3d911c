"""The one definition of which keys a query sees, shared by every backend and by the analysis.

Vocabulary:
- position: a token's index in the ORIGINAL sequence (what RoPE and causality use).
- slot: a token's index in the PERMUTED sequence; ``perm[slot] = position``. SWA is the case
  ``perm = arange(n)`` (slot == position).

A key is visible to a query when
  (the key's slot lies in the query's window  OR  the key is a sink
   OR  the key is one of the query's last ``local`` positions)
  AND (not causal  OR  key position <= query position)
  AND the key is not padding.

The sinks are the first ``sinks`` REAL tokens of each row (per the key padding mask; without a
mask, positions 0..sinks-1): with left padding they are the first tokens of the text, not the
padding. :func:`real_rank` gives each key's index among its row's real tokens.

``local`` (causal only, 0 by default) is the SA + local union: every query also sees the
``local`` positions ending at itself, in the same softmax (a key in both sets counts once).

A window that covers a row makes every operator full (causal) attention over that row's real
tokens, as with Hugging Face's ``sliding_window``: a row COVERED by the window is one whose real
length (its count of real tokens per the key mask; without a mask, ``seq_len``) is at most
``window``. Every key of a covered row is a window-mate of every query, whatever the padding
around it, so a sequence the window covers gives full attention alone and padded alike
(:func:`covered_rows`). The fast backends attend such rows on compact tensors of their real
tokens (:mod:`.covered`), in O(n * window).

Windows in slot space (``window`` counts the query itself), in a row the window does not cover:
- ``band``, causal:      slots (p - window, p]
- ``band``, non-causal:  slots [p - window // 2, p + window - 1 - window // 2] (a centred band)
- ``block``:             the group of ``window`` consecutive slots holding p
"""

from __future__ import annotations

import torch


def band_extent(window: int, causal: bool) -> tuple[int, int]:
    """How many slots a band window reaches to the left and to the right of its query."""
    if causal:
        return window - 1, 0
    left = window // 2
    return left, window - 1 - left


def covered_rows(key_mask: torch.Tensor | None, window: int) -> torch.Tensor | None:
    """bool [B]: the rows the window covers (real length <= ``window``); None without a mask
    (then the whole sequence is covered exactly when ``seq_len <= window``)."""
    if key_mask is None:
        return None
    return key_mask.sum(-1) <= window


def in_window(
    slot_q: torch.Tensor,
    slot_k: torch.Tensor,
    window: int,
    layout: str,
    causal: bool,
    seq_len: int,
    covered: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise: is key slot ``slot_k`` inside the window of query slot ``slot_q``?

    ``covered`` (bool, broadcastable: True for rows the window covers, see :func:`covered_rows`)
    makes every slot of those rows a window-mate.
    """
    if window >= seq_len:
        return torch.ones(torch.broadcast_shapes(slot_q.shape, slot_k.shape), dtype=torch.bool,
                          device=slot_q.device)
    if layout == "block":
        inside = torch.div(slot_q, window, rounding_mode="floor") == torch.div(
            slot_k, window, rounding_mode="floor"
        )
    else:
        left, right = band_extent(window, causal)
        d = slot_k - slot_q
        inside = (d >= -left) & (d <= right)
    return inside if covered is None else inside | covered


def visible(
    slot_q: torch.Tensor,
    slot_k: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    *,
    window: int,
    layout: str,
    causal: bool,
    sinks: int,
    seq_len: int,
    key_valid: torch.Tensor | None = None,
    local: int = 0,
    key_rank: torch.Tensor | None = None,
    covered: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise visibility of key (slot_k, pos_k) to query (slot_q, pos_q); see module doc.

    ``key_rank``: the key's index among its row's real tokens (:func:`real_rank`), which decides
    whether it is a sink; None means no padding (rank == position). ``covered``: the rows the
    window covers, broadcastable (see :func:`in_window`).
    """
    vis = in_window(slot_q, slot_k, window, layout, causal, seq_len, covered)
    if sinks > 0:
        vis = vis | ((pos_k if key_rank is None else key_rank) < sinks)
    if local > 0:
        vis = vis | (pos_k > pos_q - local)  # the causal test below bounds it from above
    if causal:
        vis = vis & (pos_k <= pos_q)
    if key_valid is not None:
        vis = vis & key_valid
    return vis


def real_rank(key_mask: torch.Tensor) -> torch.Tensor:
    """[B, n] long: each real token's index among its row's real tokens; padding gets n.

    Padding never counts as a sink: its rank is past any ``sinks`` that can matter.
    """
    n = key_mask.shape[-1]
    rank = key_mask.long().cumsum(-1) - 1
    return torch.where(key_mask, rank, torch.full_like(rank, n))


def sink_keys(key_mask: torch.Tensor | None, sinks: int, seq_len: int,
              device=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Where each row's sinks are: (positions [B|1, S], valid [B, S] or None, is_sink [B|1, n]).

    S = min(sinks, seq_len). Position s of a row is its s-th real token; a row with fewer than S
    real tokens gets invalid entries (valid False) at the end. ``is_sink`` marks, in original
    order, the keys that are sinks.
    """
    S = min(sinks, seq_len)
    if key_mask is None:
        pos = torch.arange(seq_len, device=device)
        return pos[None, :S], None, (pos < S)[None]
    order, valid = first_real(key_mask, S)
    return order, valid, real_rank(key_mask) < S


def first_real(key_mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of each row's first ``count`` real tokens, in order: (positions [B, count],
    valid [B, count]); a row with fewer real tokens ends with invalid entries (at padding)."""
    # Stable sort puts a row's real positions first, in order.
    order = torch.argsort((~key_mask).to(torch.int8), dim=-1, stable=True)[:, :count]
    return order, torch.gather(key_mask, -1, order)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """slot_of[..., position] for perm[..., slot] = position."""
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    inv.scatter_(-1, perm, ar)
    return inv


def dense_mask(
    seq_len: int,
    window: int,
    *,
    perm: torch.Tensor | None = None,
    layout: str = "band",
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    device=None,
    local: int = 0,
) -> torch.Tensor:
    """Full boolean mask [B|1, H|1, n, n] indexed by (query position, key position). O(n^2).

    ``perm`` is [B|1, H|1, n] (None means the identity, i.e. SWA); ``key_mask`` is [B, n];
    ``local`` adds each query's last ``local`` positions (causal only).
    """
    if perm is None:
        perm = torch.arange(seq_len, device=device).view(1, 1, -1)
    device = perm.device
    slot_of = inverse_permutation(perm)  # [B, H, n]
    pos = torch.arange(seq_len, device=device)
    key_valid = key_rank = covered = None
    if key_mask is not None:
        key_valid = key_mask[:, None, None, :]
        key_rank = real_rank(key_mask)[:, None, None, :]
        covered = covered_rows(key_mask, window)[:, None, None, None]
    return visible(
        slot_of[..., :, None],
        slot_of[..., None, :],
        pos[:, None],
        pos[None, :],
        window=window,
        layout=layout,
        causal=causal,
        sinks=sinks,
        seq_len=seq_len,
        key_valid=key_valid,
        local=local,
        key_rank=key_rank,
        covered=covered,
    )


def window_candidates(seq_len: int, window: int, layout: str, causal: bool, device=None) -> torch.Tensor:
    """Key slots that may lie in each query slot's window: [n, window] long, -1 where out of range.

    Every slot inside a window appears exactly once in its row, so visibility over these
    candidates plus the sinks enumerates a pattern in O(n * window) memory.
    """
    window = min(window, seq_len)  # a window covering the sequence is the whole sequence
    p = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(window, device=device)[None, :]
    if layout == "block" or window == seq_len:
        cand = torch.div(p, window, rounding_mode="floor") * window + j
    else:
        left, _ = band_extent(window, causal)
        cand = p - left + j
    return torch.where((cand >= 0) & (cand < seq_len), cand, torch.full_like(cand, -1))


def visible_keys(
    seq_len: int,
    window: int,
    *,
    perm: torch.Tensor | None = None,
    layout: str = "band",
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    local: int = 0,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key each query sees, each exactly once: ``(keys, seen)``, [B, H, n, C] in ORIGINAL
    query order. O(n * C) memory, with C = min(window, n) + min(sinks, n) + local.

    ``perm`` [B|1, H|1, n] (None: the identity, i.e. SWA) and ``key_mask`` [B, n] (or None)
    broadcast to B, H. ``keys[..., i, c]`` is a key position (any in-range value where not
    seen) and ``seen`` marks the visible ones, which are exactly the row of :func:`dense_mask`:
    the query's window-mates (sinks included), its sinks outside the window, and (``local``) its
    last ``local`` positions that are neither; counts, edges and unions all derive from these.
    """
    n = seq_len
    if perm is None:
        perm = torch.arange(n, device=device).view(1, 1, n)
    device = perm.device
    B = max(perm.shape[0], 1 if key_mask is None else key_mask.shape[0])
    H = perm.shape[1]
    perm = perm.expand(B, H, n)
    valid = (torch.ones(1, n, dtype=torch.bool, device=device) if key_mask is None
             else key_mask).expand(B, n)
    s_pos, s_valid, is_sink = sink_keys(key_mask, sinks, n, device)
    is_sink = is_sink.expand(B, n)

    def at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """table [B, n] or [B, H, n] read at index [B, H, ...] (last dim: positions or slots)."""
        table = table if table.dim() == 3 else table[:, None, :]
        flat = index.reshape(B, H, -1)
        return torch.gather(table.expand(B, H, n), -1, flat).view(index.shape)

    slot_of = inverse_permutation(perm)  # [B, H, n]: the slot of each query position
    q_slot = slot_of[..., None]
    q_pos = torch.arange(n, device=device)[:, None]
    # Window-mates, from the candidates of each query's slot.
    k_slot = window_candidates(n, window, layout, causal, device)[slot_of]  # [B, H, n, w]
    ok = k_slot >= 0
    k_slot = k_slot.clamp(min=0)
    k_pos = at(perm, k_slot)
    win = ok & visible(q_slot, k_slot, q_pos, k_pos, window=window, layout=layout, causal=causal,
                       sinks=0, seq_len=n, key_valid=at(valid, k_pos))
    if local:  # recent non-sink keys come once, below, with the local window
        win = win & ((k_pos <= q_pos - local) | at(is_sink, k_pos))
    # Sinks outside the query's window.
    S = s_pos.shape[-1]
    s_pos = s_pos.expand(B, S)[:, None, None, :].expand(B, H, n, S)
    sink = ~in_window(q_slot, at(slot_of, s_pos), window, layout, causal, n)
    if causal:
        sink = sink & (s_pos <= q_pos)
    if s_valid is not None:
        sink = sink & s_valid[:, None, None, :]
    # The last `local` positions: real keys that are not sinks.
    recent = (q_pos - torch.arange(local, device=device)).expand(B, H, n, local)
    rec = (recent >= 0) & at(valid & ~is_sink, recent.clamp(min=0))
    covered = covered_rows(key_mask, window)
    if covered is not None and window < n:  # (window >= n: the candidates are every slot)
        # A covered row's window-mates are its real tokens, at most min(window, n) of them.
        real, real_ok = (x[:, None, None, :] for x in first_real(key_mask, k_pos.shape[-1]))
        if causal:
            real_ok = real_ok & (real <= q_pos)
        c = covered[:, None, None, None]
        k_pos, win = torch.where(c, real, k_pos), torch.where(c, real_ok, win)
        sink, rec = sink & ~c, rec & ~c  # already window-mates
    return (torch.cat([k_pos, s_pos, recent.clamp(min=0)], dim=-1),
            torch.cat([win, sink, rec], dim=-1))


def pattern_edges(
    seq_len: int,
    window: int,
    *,
    perm: torch.Tensor | None = None,
    layout: str = "band",
    causal: bool = True,
    sinks: int = 0,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse form of :func:`dense_mask` for one sequence and head: (query positions, key positions).

    ``perm`` is [n] (None = identity); ``key_valid`` is [n] bool. Each visible pair appears once.
    Memory and time are O(n * (window + sinks)).
    """
    device = perm.device if perm is not None else None
    if seq_len == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    keys, seen = visible_keys(seq_len, window, perm=None if perm is None else perm.view(1, 1, -1),
                              layout=layout, causal=causal, sinks=sinks,
                              key_mask=None if key_valid is None else key_valid[None],
                              device=device)
    keys, seen = keys[0, 0], seen[0, 0]
    queries = torch.arange(seq_len, device=keys.device)[:, None].expand_as(keys)
    return queries[seen], keys[seen]
