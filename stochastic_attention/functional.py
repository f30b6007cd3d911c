"""Public functional API: sliding-window and stochastic attention, validated and dispatched.

Tensor layout is [batch, heads, seq, head_dim], as in ``F.scaled_dot_product_attention``.
See :mod:`stochastic_attention.ops.patterns` for the exact rule of which keys a query sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import blocked, flashband, merge, parts, reference
from .ops import flex as flex_backend
from .ops.patterns import in_window, inverse_permutation, sink_keys, visible, window_candidates
from .ops.permute import gather_mask, permute_seq, random_permutation, routing_permutation
from .ops.validate import (
    check_key_mask,
    check_layout,
    check_local,
    check_qkv,
    check_scale,
    check_sinks,
    check_window,
    normalize_perm,
    reject_renamed,
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


@reject_renamed
def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
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
        sinks: the first ``sinks`` real tokens of each row (per ``key_mask``; without
            one, positions 0..sinks-1) are visible to every query (subject to causality).
        key_mask: bool [batch, seq], True for real tokens; padded keys and values never
            influence any output (not even when they hold NaN or inf). A query with no visible
            key returns zeros.
        scale: softmax scale, default ``head_dim ** -0.5``.
        backend: "auto", "reference", "blocked" or "flex".

    Returns:
        [batch, heads_q, seq, head_dim], in q's dtype.
    """
    return _windowed(q, k, v, window, perm=None, layout="band", causal=causal, sinks=sinks,
                     key_mask=key_mask, scale=scale, backend=backend, local=0)


@reject_renamed
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
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Stochastic attention (SA): permute tokens, attend within windows, restore the order.

    ``perm[..., p]`` is the original position of the token placed at permuted slot ``p``
    (permuted = ``x[..., perm, :]``); shape [seq], [batch, seq] or [batch, heads_q, seq]. If
    None, one permutation per sample, shared by the heads, is drawn by
    :func:`~stochastic_attention.ops.permute.routing_permutation`: over each row's real tokens
    only (they fill the first slots, padding follows), so a sequence gets the same routing and
    the same output alone or padded in a batch. With a ``generator`` every row draws from its
    own copy of the generator's state (same seed and same real length, same routing, whatever
    the row and the rest of the batch); the generator is then advanced once. Pass
    ``perm=random_permutation(batch, heads_q, seq)`` to give every head its own routing (more
    diverse, but each head then needs its own mask).

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
        check_key_mask(key_mask, B, n, q.device)
        perm = routing_permutation(B, 1, n, key_mask=key_mask,
                                   generator=generator, device=q.device)
    else:
        perm = normalize_perm(perm, B, H, n, q.device)
    return _windowed(q, k, v, window, perm=perm, layout=layout, causal=causal, sinks=sinks,
                     key_mask=key_mask, scale=scale, backend=backend, local=local)


def _windowed(q, k, v, window, *, perm, layout, causal, sinks, key_mask, scale, backend,
              local):
    """Validated dispatch; ``perm`` is None (SWA) or already a checked [B|1, H|1, n] permutation."""
    check_qkv(q, k, v)
    window = check_window(window)
    sinks = check_sinks(sinks)
    layout = check_layout(layout)
    local = check_local(local, causal)
    B, H, n, D = q.shape
    check_key_mask(key_mask, B, n, q.device)
    scale = check_scale(scale, D)
    backend = _resolve_backend(backend, q, k, v, local)
    if n == 0:
        return q.new_zeros(q.shape)
    if key_mask is not None:
        # Selection, not multiplication: padded keys and values (even NaN or inf) are replaced
        # before any product, so they cannot reach an output.
        k, v = zero_padding(k, key_mask), zero_padding(v, key_mask)
    if backend == "reference":
        return reference.attention(q, k, v, window, perm=perm, layout=layout, causal=causal,
                                   sinks=sinks, key_mask=key_mask, scale=scale,
                                   local=local)
    if window >= n or local >= n:  # the window covers the sequence: plain full attention
        return full_attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale)
    if backend == "flex":
        return flex_backend.attention(q, k, v, window, perm=perm, layout=layout, causal=causal,
                                      sinks=min(sinks, n), key_mask=key_mask,
                                      scale=scale)
    return _blocked(q, k, v, window, perm=perm, layout=layout, causal=causal, sinks=min(sinks, n),
                    key_mask=key_mask, scale=scale, local=local)


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


def zero_padding(x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, D] with the padded positions (mask False) set to 0, by selection."""
    return x.masked_fill(~key_mask[:, None, :, None], 0)


def full_attention(q, k, v, *, causal: bool, key_mask, scale: float) -> torch.Tensor:
    """Full (causal) attention through SDPA, with the zero-row rule for padding.

    SDPA adds its mask to the scores, so a non-finite key would reach hidden queries too
    (NaN + -inf = NaN): such inputs take the explicit, selecting reference path instead.
    """
    n = q.shape[2]
    if not blocked.all_finite(k):
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device)
        mask = mask.tril() if causal else mask
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return reference.masked_attention(q, k, v, mask, scale)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = key_mask[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    has_key = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=scale)
    return out * has_key


def _blocked(q, k, v, window, *, perm, layout, causal, sinks, key_mask, scale, local=0):
    groups = q.shape[1] // k.shape[1]
    if local:
        return _blocked_union(q, k, v, window, perm=perm, layout=layout, sinks=sinks,
                              key_mask=key_mask, scale=scale, local=local)
    if flashband.serves(q, k, v, key_mask=key_mask, sinks=sinks, layout=layout, perm=perm):
        return flashband.windowed(q, k, v, window, perm=perm, layout=layout, causal=causal,
                                  scale=scale)
    sink = _SinkParts(k, v, sinks, key_mask, groups)

    if perm is None:  # SWA: slot == position, nothing to move
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        key_valid = key_mask[:, None, :] if key_mask is not None else None
        return blocked.windowed_attention(
            q, k, v, window, pos=None, key_valid=key_valid, layout=layout, causal=causal,
            scale=scale, **sink.slot_order(None))

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
    if (layout == "block" and sinks == 0 and key_mask is None
            and (causal or n % window == 0) and blocked.all_finite(ks)):
        out = blocked.dense_tiles(qs, ks, vs, window, scale, causal)
    else:
        key_valid = gather_mask(key_mask, perm) if key_mask is not None else None
        out = blocked.windowed_attention(
            qs, ks, vs, window, pos=perm, key_valid=key_valid, layout=layout, causal=causal,
            scale=scale, **sink.slot_order(perm))
    return permute_seq(out, inv, perm)


class _SinkParts:
    """The sink keys of each row (its first real tokens) and which keys are sinks."""

    def __init__(self, k, v, sinks, key_mask, groups):
        self.sinks = sinks
        if sinks == 0:
            return
        B, Hkv, n, D = k.shape
        pos, valid, self.is_sink = sink_keys(key_mask, sinks, n, k.device)
        index = pos[:, None, :, None].expand(B, Hkv, pos.shape[-1], D)
        self.k, self.v = torch.gather(k, 2, index), torch.gather(v, 2, index)
        if groups > 1:
            self.k = self.k.repeat_interleave(groups, dim=1)
            self.v = self.v.repeat_interleave(groups, dim=1)
        self.pos = pos[:, None, :]  # [B|1, 1, S]
        self.valid = None if valid is None else valid[:, None, :]

    def slot_order(self, perm) -> dict:
        """Keyword arguments of :func:`blocked.windowed_attention` for keys in slot order."""
        if self.sinks == 0:
            return dict(sinks=0, sink_k=None, sink_v=None, sink_valid=None)
        is_sink = (self.is_sink[:, None, :] if perm is None
                   else gather_mask(self.is_sink, perm))
        return dict(sinks=self.sinks, sink_k=self.k, sink_v=self.v, sink_valid=self.valid,
                    sink_pos=self.pos, key_is_sink=is_sink)



def _blocked_union(q, k, v, window, *, perm, layout, sinks, key_mask, scale, local):
    """Causal SA + local union as two disjoint parts merged by log-sum-exp, each O(n * window).

    Part A (slot space): the SA window minus each query's last ``local`` positions, plus the
    sinks. Part B (original order): a sliding window of ``local`` without the sink positions.
    Together they are exactly the keys :func:`.ops.patterns.visible` gives with ``local``.
    """
    if flashband.serves(q, k, v, key_mask=key_mask, sinks=sinks, layout=layout, perm=perm,
                        window=window, local=local):
        return flashband.union(q, k, v, window, perm=perm, layout=layout, local=local, scale=scale)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    sink = _SinkParts(k, v, sinks, key_mask, 1)
    if layout == "block":
        perm = blocked.sort_groups(perm, window)
    inv = inverse_permutation(perm)
    qs, ks, vs = (permute_seq(x, perm, inv) for x in (q, k, v))
    key_valid = gather_mask(key_mask, perm) if key_mask is not None else None
    if key_mask is None and blocked.all_finite(k):
        return _union_parts(q, k, v, qs, ks, vs, window, perm=perm, inv=inv, layout=layout,
                            sinks=sinks, sink=sink, scale=scale, local=local)
    out_a, lse_a = blocked.windowed_attention(
        qs, ks, vs, window, pos=perm, key_valid=key_valid, layout=layout, causal=True,
        scale=scale, exclude_recent=local, return_lse=True, **sink.slot_order(perm))
    out_a = permute_seq(out_a, inv, perm)
    lse_a = permute_seq(lse_a.unsqueeze(-1), inv, perm).squeeze(-1)
    # Part B drops the window keys that are sinks (part A has them) and adds no sink keys.
    sinks_b = sink.slot_order(None)
    sinks_b.update(sink_k=None, sink_v=None, sink_valid=None, sink_pos=None)
    out_b, lse_b = blocked.windowed_attention(
        q, k, v, local, pos=None, layout="band", causal=True, scale=scale, return_lse=True,
        key_valid=key_mask[:, None, :] if key_mask is not None else None,
        **sinks_b)
    return blocked.merge_parts(out_a, lse_a, out_b, lse_b).to(q.dtype)


def _union_parts(q, k, v, qs, ks, vs, window, *, perm, inv, layout, sinks, sink, scale, local):
    """The union without padding and with finite keys, through :func:`.ops.merge.attend_parts`:
    the CPU flash kernel for wide parts, offset-wise products for parts of a few keys per query
    (whose cost the kernel does not reduce). Without padding the sinks are the first positions.
    """
    unpermute = (lambda x: permute_seq(x, inv, perm), lambda x, fill: permute_seq(x, perm, inv))
    if layout == "band" and window <= merge.BAND_PART_MAX_WIDTH:  # few keys: offsets, sink rows
        sa_parts = [parts.permuted_band_part(qs, ks, vs, window, pos=perm, key_valid=None,
                                             exclude_recent=local, sinks=sinks, outer=unpermute)]
        if sinks > 0:
            sa_parts.append(parts.sink_rows_part(q, k, v, sinks, None))
    else:
        sa_parts = [parts.window_part(blocked.windowed_attention(
            qs, ks, vs, window, pos=perm, key_valid=None, layout=layout, causal=True, scale=scale,
            exclude_recent=local, return_tiles=True, **sink.slot_order(perm)), unpermute)]
    if local <= merge.BAND_PART_MAX_WIDTH:  # a few keys per query: cheaper than kernel tiles
        part_b = parts.recent_band_part(q, k, v, local, skip_first=sinks, key_mask=None)
    else:
        sinks_b = sink.slot_order(None)
        sinks_b.update(sink_k=None, sink_v=None, sink_valid=None, sink_pos=None)
        part_b = parts.window_part(blocked.windowed_attention(
            q, k, v, local, pos=None, layout="band", causal=True, scale=scale, return_tiles=True,
            key_valid=None, **sinks_b))
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
    key_mask: torch.Tensor | None = None,
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
    Bp, Hp = perm.shape[:2]
    key_valid = (key_mask[:, None, :] if key_mask is not None
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
    s_pos, _, is_sink = sink_keys(key_mask, sinks, n, device)
    if local:  # recent non-sink keys are counted once, below, with the local window
        k_sink = torch.gather(is_sink[:, None].expand(batch, Hp, n), -1,
                              k_pos.expand(batch, Hp, n, k_pos.shape[-1]).reshape(batch, Hp, -1))
        vis = vis & ((k_pos <= q_pos - local) | k_sink.view(batch, Hp, n, -1))
    counts = vis.sum(-1)  # per query slot
    if sinks > 0 and n > 0:
        slot_of = inverse_permutation(perm).expand(batch, Hp, n)
        s_pos = s_pos.expand(batch, -1)[:, None, :].expand(batch, Hp, -1)  # [B, Hp, S]
        s_slot = torch.gather(slot_of, -1, s_pos)
        extra = ~in_window(q_slot, s_slot[..., None, :], window, layout, causal, n)
        if causal:
            extra = extra & (s_pos[..., None, :] <= q_pos)
        extra = extra & torch.gather(key_valid.expand(batch, 1, n), -1, s_pos[:, :1])[..., None, :]
        counts = counts + extra.sum(-1)
    counts = counts.expand(batch, heads if Hp == 1 else Hp, n)
    # Slot order -> original order.
    counts = torch.gather(counts, -1, inverse_permutation(perm).expand_as(counts))
    if local:  # valid non-sink keys among positions (q - local, q]
        recent_ok = key_valid.expand(batch, 1, n) & ~is_sink[:, None, :]
        seen = F.pad(torch.cumsum(recent_ok.long(), -1), (1, 0))  # seen[j + 1]: among 0..j
        q_pos = torch.arange(n, device=counts.device)
        low = torch.clamp(q_pos - local, min=-1)
        counts = counts + seen[..., q_pos + 1] - seen[..., low + 1]
    return counts
