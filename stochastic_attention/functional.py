"""Public functional API: sliding-window and stochastic attention, validated and dispatched.

Tensor layout is [batch, heads, seq, head_dim], as in ``F.scaled_dot_product_attention``.
See :mod:`stochastic_attention.ops.patterns` for the exact rule of which keys a query sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import blocked, merge, parts, reference
from .ops import flex as flex_backend
from .ops.patterns import in_window, inverse_permutation, visible, window_candidates
from .ops.permute import gather_mask, permute_seq, random_permutation
from .ops.validate import (
    check_key_padding_mask,
    check_layout,
    check_local,
    check_qkv,
    check_scale,
    check_sinks,
    check_window,
    normalize_perm,
)

BACKENDS = ("auto", "reference", "blocked", "flex")
METHODS = ("stochastic", "sliding_window", "full")

__all__ = [
    "BACKENDS",
    "attended_keys",
    "random_permutation",
    "sliding_window_attention",
    "stochastic_attention",
]


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sliding-window attention (SWA).

    Causal: query i sees keys j with ``i - window < j <= i`` (``window`` keys, itself included).
    Non-causal: a centred band of ``window`` keys. ``window >= seq_len`` is full attention.

    Args:
        q: [batch, heads_q, seq, head_dim]; k, v: [batch, heads_kv, seq, head_dim] with
            heads_q a multiple of heads_kv (grouped-query attention).
        window: keys a query may see, itself included (>= 1).
        causal: mask keys after the query.
        sinks: the first ``sinks`` positions are visible to every query (subject to causality).
        key_padding_mask: bool [batch, seq], True for real tokens; padded keys are never seen.
            A query with no visible key returns zeros.
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: "auto", "reference", "blocked" or "flex".

    Returns:
        [batch, heads_q, seq, head_dim], in q's dtype.
    """
    return _windowed(q, k, v, window, perm=None, layout="band", causal=causal, sinks=sinks,
                     key_padding_mask=key_padding_mask, scale=scale, backend=backend, local=0)


def stochastic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    perm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    causal: bool = True,
    layout: str = "band",
    sinks: int = 0,
    local: int = 0,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Stochastic attention (SA): permute tokens, attend within windows, restore the order.

    ``perm[..., p]`` is the original position of the token placed at permuted slot ``p``
    (permuted = ``x[..., perm, :]``); shape [seq], [batch, seq] or [batch, heads_q, seq]. If
    None, one permutation per sample, shared by the heads, is drawn from ``generator`` (same
    generator state, same output); pass ``perm=random_permutation(batch, heads_q, seq)`` to give
    every head its own routing (more diverse, but each head then needs its own mask).

    Layouts, in permuted order:
      - ``"band"``: the query at slot p sees slots (p - window, p] (causal) or a centred band
        of ``window`` slots (non-causal);
      - ``"block"``: the permuted sequence is cut into groups of ``window`` slots and a query
        sees its own group.
    When causal, only keys whose ORIGINAL position is <= the query's stay (permuted positions
    would leak the future). RoPE must have been applied at original positions beforehand.
    ``window >= seq_len`` is full (causal) attention.

    ``local`` (causal only): every query also sees its last ``local`` positions, in the same
    softmax as its SA window and sinks (a key in several of these sets counts once). This is the
    SA + local union that keeps a pretrained model's neighbourhood intact. It runs as two
    O(n * window) passes, the SA window without the recent keys and a sliding window of
    ``local``, merged exactly through their log-sum-exp (backends "blocked" and "reference").
    Other arguments as in :func:`sliding_window_attention`.
    """
    check_qkv(q, k, v)
    B, H, n, _ = q.shape
    if perm is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        # One permutation per sample, shared by the heads (the paper draws one per layer): the
        # per-head mask work disappears and GQA keys/values are moved before being expanded.
        perm = random_permutation(B, 1, n, generator=generator, device=q.device)
    else:
        perm = normalize_perm(perm, B, H, n, q.device)
    return _windowed(q, k, v, window, perm=perm, layout=layout, causal=causal, sinks=sinks,
                     key_padding_mask=key_padding_mask, scale=scale, backend=backend, local=local)


def _windowed(q, k, v, window, *, perm, layout, causal, sinks, key_padding_mask, scale, backend,
              local):
    """Validated dispatch; ``perm`` is None (SWA) or already a checked [B|1, H|1, n] permutation."""
    check_qkv(q, k, v)
    window = check_window(window)
    sinks = check_sinks(sinks)
    layout = check_layout(layout)
    local = check_local(local, causal)
    B, H, n, D = q.shape
    check_key_padding_mask(key_padding_mask, B, n, q.device)
    scale = check_scale(scale, D)
    backend = _resolve_backend(backend, q, k, v, local)
    if n == 0:
        return q.new_zeros(q.shape)
    if backend == "reference":
        return reference.attention(q, k, v, window, perm=perm, layout=layout, causal=causal,
                                   sinks=sinks, key_padding_mask=key_padding_mask, scale=scale,
                                   local=local)
    if window >= n or local >= n:  # the window covers the sequence: plain full attention
        return full_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if backend == "flex":
        return flex_backend.attention(q, k, v, window, perm=perm, layout=layout, causal=causal,
                                      sinks=min(sinks, n), key_padding_mask=key_padding_mask,
                                      scale=scale)
    return _blocked(q, k, v, window, perm=perm, layout=layout, causal=causal, sinks=min(sinks, n),
                    key_padding_mask=key_padding_mask, scale=scale, local=local)


def _resolve_backend(backend: str, q, k, v, local: int = 0) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend == "auto":
        if q.is_cuda and flex_backend.available() and not local:
            return "flex"
        return "blocked"
    if backend == "flex" and local:
        raise ValueError("backend='flex' does not serve local > 0; use backend='blocked' "
                         "(or 'auto', which picks it)")
    if backend == "flex":
        reason = flex_backend.unsupported_reason(q, needs_grad)
        if reason:
            raise ValueError(f"backend='flex' cannot serve this call: {reason}")
    return backend


def full_attention(q, k, v, *, causal: bool, key_padding_mask, scale: float) -> torch.Tensor:
    """Full (causal) attention through SDPA, with the zero-row rule for padding."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    n = q.shape[2]
    mask = key_padding_mask[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale)
    return out * has_key


def _blocked(q, k, v, window, *, perm, layout, causal, sinks, key_padding_mask, scale, local=0):
    groups = q.shape[1] // k.shape[1]
    if local:
        return _blocked_union(q, k, v, window, perm=perm, layout=layout, sinks=sinks,
                              key_padding_mask=key_padding_mask, scale=scale, local=local)
    sink_k = sink_v = sink_valid = None
    if sinks > 0:
        sink_k, sink_v = k[:, :, :sinks], v[:, :, :sinks]
        if groups > 1:
            sink_k = sink_k.repeat_interleave(groups, dim=1)
            sink_v = sink_v.repeat_interleave(groups, dim=1)
        if key_padding_mask is not None:
            sink_valid = key_padding_mask[:, None, :sinks]

    if perm is None:  # SWA: slot == position, nothing to move
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        key_valid = key_padding_mask[:, None, :] if key_padding_mask is not None else None
        return blocked.windowed_attention(
            q, k, v, window, pos=None, key_valid=key_valid, layout=layout, causal=causal,
            sinks=sinks, sink_k=sink_k, sink_v=sink_v, sink_valid=sink_valid, scale=scale)

    if layout == "block":
        perm = blocked.sort_groups(perm, window)
    inv = inverse_permutation(perm)
    if perm.shape[1] == 1:  # one permutation for all heads: move k, v before expanding them
        ks, vs = permute_seq(k, perm, inv), permute_seq(v, perm, inv)
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
    else:
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        ks, vs = permute_seq(k, perm, inv), permute_seq(v, perm, inv)
    qs = permute_seq(q, perm, inv)

    n = q.shape[2]
    if layout == "block" and sinks == 0 and key_padding_mask is None and (causal or n % window == 0):
        out = blocked.dense_tiles(qs, ks, vs, window, scale, causal)
    else:
        key_valid = gather_mask(key_padding_mask, perm) if key_padding_mask is not None else None
        out = blocked.windowed_attention(
            qs, ks, vs, window, pos=perm, key_valid=key_valid, layout=layout, causal=causal,
            sinks=sinks, sink_k=sink_k, sink_v=sink_v, sink_valid=sink_valid, scale=scale)
    return permute_seq(out, inv, perm)


def _blocked_union(q, k, v, window, *, perm, layout, sinks, key_padding_mask, scale, local):
    """Causal SA + local union as two disjoint parts merged by log-sum-exp, each O(n * window).

    Part A (slot space): the SA window minus each query's last ``local`` positions, plus the
    sinks. Part B (original order): a sliding window of ``local`` without the sink positions.
    Together they are exactly the keys :func:`.ops.patterns.visible` gives with ``local``.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    sink_k = sink_v = sink_valid = None
    if sinks > 0:
        sink_k, sink_v = k[:, :, :sinks], v[:, :, :sinks]
        if key_padding_mask is not None:
            sink_valid = key_padding_mask[:, None, :sinks]
    if layout == "block":
        perm = blocked.sort_groups(perm, window)
    inv = inverse_permutation(perm)
    qs, ks, vs = (permute_seq(x, perm, inv) for x in (q, k, v))
    key_valid = gather_mask(key_padding_mask, perm) if key_padding_mask is not None else None
    unpermute = (lambda x: permute_seq(x, inv, perm), lambda x, fill: permute_seq(x, perm, inv))
    if layout == "band" and window <= merge.BAND_PART_MAX_WIDTH:  # few keys: offsets, sink rows
        sa_parts = [parts.permuted_band_part(qs, ks, vs, window, pos=perm, key_valid=key_valid,
                                             exclude_recent=local, sinks=sinks, outer=unpermute)]
        if sinks > 0:
            sa_parts.append(parts.sink_rows_part(q, k, v, sinks, key_padding_mask))
    else:
        sa_parts = [parts.window_part(blocked.windowed_attention(
            qs, ks, vs, window, pos=perm, key_valid=key_valid, layout=layout, causal=True,
            sinks=sinks, sink_k=sink_k, sink_v=sink_v, sink_valid=sink_valid, scale=scale,
            exclude_recent=local, return_tiles=True), unpermute)]
    if local <= merge.BAND_PART_MAX_WIDTH:  # a few keys per query: cheaper than kernel tiles
        part_b = parts.recent_band_part(q, k, v, local, skip_first=sinks,
                                       key_padding_mask=key_padding_mask)
    else:
        part_b = parts.window_part(blocked.windowed_attention(
            q, k, v, local, pos=None, layout="band", causal=True, sinks=sinks, sink_k=None,
            sink_v=None, sink_valid=None, scale=scale, return_tiles=True,
            key_valid=key_padding_mask[:, None, :] if key_padding_mask is not None else None))
    return merge.attend_parts([*sa_parts, part_b], scale)


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
    key_padding_mask: torch.Tensor | None = None,
    local: int = 0,
) -> torch.Tensor:
    """How many keys each query sees: a LongTensor [batch, heads, seq_len] in original order.

    Uses the operators' own visibility rule, in O(seq_len * window) memory, so methods can be
    compared at equal budget (e.g. ``attended_keys(...).float().mean()``). ``method`` is
    "stochastic", "sliding_window" or "full"; for "stochastic" without ``perm`` the permutation
    is drawn from ``generator`` exactly as :func:`stochastic_attention` draws it. ``local``
    counts the SA + local union (each key once), as :func:`stochastic_attention` attends it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    window, sinks, layout = check_window(window), check_sinks(sinks), check_layout(layout)
    local = check_local(local, causal) if method == "stochastic" else 0
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    n = seq_len
    device = key_padding_mask.device if key_padding_mask is not None else None
    if key_padding_mask is not None:
        batch = key_padding_mask.shape[0]
        check_key_padding_mask(key_padding_mask, batch, n, device)
    if method == "full":
        window = max(window, n)
    if method == "stochastic":
        if perm is None:
            perm = random_permutation(batch, 1, n, generator=generator, device=device)
        elif perm.dim() == 3:  # a given perm fixes the heads (and batch, unless a mask does)
            heads = perm.shape[1]
            batch = batch if key_padding_mask is not None else perm.shape[0]
        elif perm.dim() == 2 and key_padding_mask is None:
            batch = perm.shape[0]
        perm = normalize_perm(perm, batch, heads, n, perm.device)
        device = perm.device
    else:
        perm = torch.arange(n, device=device).view(1, 1, n)
        layout = "band"
    Bp, Hp = perm.shape[:2]
    key_valid = (key_padding_mask[:, None, :] if key_padding_mask is not None
                 else torch.ones(1, 1, n, dtype=torch.bool, device=device))

    cand = window_candidates(n, window, layout, causal, device)  # [n, w] key slots
    ok = cand >= 0
    k_slot = cand.clamp(min=0)
    q_slot = torch.arange(n, device=device)[:, None]
    q_pos, k_pos = perm[..., q_slot], perm[..., k_slot]  # [Bp, Hp, n, 1], [Bp, Hp, n, w]
    kv = torch.gather(key_valid.expand(batch, Hp, n), -1,
                      k_pos.expand(batch, Hp, n, k_pos.shape[-1]).reshape(batch, Hp, -1))
    kv = kv.view(batch, Hp, n, -1)
    vis = ok & visible(q_slot, k_slot, q_pos, k_pos, window=window, layout=layout, causal=causal,
                       sinks=0, seq_len=n, key_valid=kv)
    if local:  # recent non-sink keys are counted once, below, with the local window
        vis = vis & ((k_pos <= q_pos - local) | (k_pos < sinks))
    counts = vis.sum(-1)  # per query slot
    if sinks > 0 and n > 0:
        slot_of = inverse_permutation(perm)
        s_pos = torch.arange(min(sinks, n), device=device)
        s_slot = slot_of[..., s_pos]  # [Bp, Hp, S]
        extra = ~in_window(q_slot, s_slot[..., None, :], window, layout, causal, n)
        if causal:
            extra = extra & (s_pos <= q_pos)
        extra = extra & key_valid[..., None, s_pos]
        counts = counts + extra.sum(-1)
    counts = counts.expand(batch, heads if Hp == 1 else Hp, n)
    # Slot order -> original order.
    counts = torch.gather(counts, -1, inverse_permutation(perm).expand_as(counts))
    if local:  # valid non-sink keys among positions (q - local, q]
        seen = torch.cumsum(key_valid.expand(batch, 1, n).long(), -1)
        seen = F.pad(seen, (1, 0))  # seen[..., j + 1] = valid keys among positions 0..j
        q_pos = torch.arange(n, device=counts.device)
        low = torch.clamp(torch.maximum(q_pos - local, torch.tensor(sinks - 1)), min=-1)
        recent = (seen[..., q_pos + 1] - seen[..., low + 1]).clamp(min=0)
        counts = counts + recent
    return counts
