"""BigBird-style causal attention: a local window, global sink tokens and random earlier keys.

Query i sees, in one softmax (Zaheer et al. 2020, causal form):
  (a) the local causal window ``(i - window, i]`` (itself included);
  (b) the sinks: each row's first ``sinks`` REAL tokens (per the key padding mask; positions
      ``0 .. sinks - 1`` without one), subject to causality, as for every operator;
  (c) up to ``random_keys`` random earlier positions j with ``sinks <= j <= i - window``, i.e.
      outside its window and outside the sinks. Draws are uniform with replacement; a position
      drawn twice counts once (repeats are masked, as are padded keys and sinks). With padding
      the draws are made over each row's real tokens (:func:`bigbird_indices`), so a sequence
      gets the same keys alone or padded in a batch.
A row the window covers (real length <= ``window``, see :mod:`.patterns`) is full causal attention
over its real tokens, as the same sequence alone, whatever the padding around it.

The random positions are an explicit index tensor ``indices`` [B|1, H|1, n, r] (-1 = no key),
drawn by :func:`bigbird_indices` (one draw per sample shared by the heads by default, like SA's
permutation; pass heads > 1 for per-head draws). The fast path :func:`bigbird_attention` is
O(n * (window + random_keys + sinks)) in time and memory: the window and the sinks go through
the blocked sliding-window kernel, the random keys are gathered ([B, H, n, r, D]) and attended
in one pass, and the two disjoint parts are merged exactly by their log-sum-exps.
:func:`bigbird_reference` builds the dense n x n mask from the same indices (tests only).
"""

from __future__ import annotations

import torch

from . import blocked, documents, merge, parts
from .budget import attended_keys
from .covered import attend_by_coverage, softmax_attend, take_rows
from .dense import all_finite, compute_dtype, full_attention, masked_attention, merge_attention, repeat_kv, zero_padding
from .patterns import covered_rows, sink_keys
from .validate import (
    check_bool,
    check_causal_only,
    check_index_tensor,
    check_int,
    check_key_mask,
    check_qkv,
    check_scale,
    check_sinks,
    check_window,
    reject_renamed,
)

__all__ = [
    "bigbird_attended_keys",
    "bigbird_attention",
    "bigbird_indices",
    "bigbird_mask",
    "bigbird_reference",
]


def check_random_keys(random_keys: int) -> int:
    return check_int("random_keys", random_keys, 0,
                     hint=" (random earlier keys per query; 0 leaves the window and the sinks)")


def bigbird_indices(
    batch: int,
    heads: int,
    seq_len: int,
    window: int,
    random_keys: int,
    *,
    sinks: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random earlier keys of every query: a LongTensor [batch, heads, seq_len, random_keys].

    Query i draws uniformly, with replacement, among positions ``sinks .. i - window``; an entry
    is -1 where that range is empty or the position repeats an earlier draw of the same query
    (so every kept position counts once). Drawn on the generator's device, like
    :func:`stochastic_attention.random_permutation` (a CPU generator gives the same draw
    whatever ``device`` is), then moved to ``device``.

    With a ``key_mask`` (or a ``generator``) each row draws over its REAL tokens only,
    as SA's routing does (:func:`~stochastic_attention.ops.permute.routing_permutation`): the
    real token of rank i draws among the real tokens of rank ``sinks .. i - window``, padded
    queries draw nothing, and with a generator every row draws from its own copy of its state
    (same seed and real length, same keys, whatever the padding or the batch), after which the
    generator is advanced once.
    """
    for name, value in (("batch", batch), ("heads", heads), ("seq_len", seq_len)):
        check_int(name, value, 0)
    window, sinks = check_window(window), check_sinks(sinks)
    r = check_random_keys(random_keys)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    draw_on = generator.device if generator is not None else device
    if key_mask is None and generator is None:
        u = torch.rand(batch, heads, seq_len, r, device=draw_on, dtype=torch.float64)
        return _draws_to_indices(u, window, sinks).to(device if device is not None else u.device)
    if key_mask is not None:
        batch = key_mask.shape[0]
        device = key_mask.device if device is None else device
    lengths = (key_mask.sum(-1).tolist() if key_mask is not None
               else [seq_len] * batch)
    draws = {}
    if generator is not None:
        state = generator.get_state()
        for length in sorted(set(lengths)):
            generator.set_state(state)
            draws[length] = torch.rand(heads, length, r, generator=generator, device=draw_on,
                                       dtype=torch.float64)
        generator.set_state(state)
        generator.manual_seed(int(torch.randint(0, 2**62, (), generator=generator,
                                                device=draw_on)))
    out = torch.full((batch, heads, seq_len, r), -1, dtype=torch.long, device=device)
    for b, length in enumerate(lengths):
        u = draws[length] if generator is not None else torch.rand(
            heads, length, r, device=device, dtype=torch.float64)
        idx = _draws_to_indices(u, window, sinks).to(device)  # in ranks among real tokens
        if key_mask is None:
            out[b] = idx
            continue
        real = key_mask[b].nonzero().flatten()  # rank -> position
        out[b][:, real] = torch.where(idx >= 0, real[idx.clamp(min=0)], -1)
    return out


def _draws_to_indices(u: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Uniform draws [..., n, r] in [0, 1) -> indices in sinks .. i - window (-1: none, repeat)."""
    i = torch.arange(u.shape[-2], device=u.device).view(-1, 1)
    choices = (i - window + 1 - sinks).clamp(min=0)  # eligible positions per query
    offset = (u * choices).long().clamp(max=(choices - 1).clamp(min=0))
    return dedupe(torch.where(choices > 0, sinks + offset, -1))


def dedupe(indices: torch.Tensor) -> torch.Tensor:
    """Sort each query's indices and set repeats to -1 (the order of a key set is irrelevant)."""
    idx = indices.sort(dim=-1).values
    repeat = torch.zeros_like(idx, dtype=torch.bool)
    repeat[..., 1:] = idx[..., 1:] == idx[..., :-1]
    return idx.masked_fill(repeat, -1)


def check_indices(indices: torch.Tensor, batch: int, heads: int, seq_len: int, window: int,
                  random_keys: int, sinks: int, device) -> torch.Tensor:
    """Validate user indices [B|1, H|1, n, r]; returns them as long with repeats masked."""
    check_index_tensor("indices", indices, device)
    if (indices.dim() != 4 or indices.shape[0] not in (1, batch)
            or indices.shape[1] not in (1, heads) or indices.shape[2] != seq_len
            or indices.shape[3] != random_keys):
        raise ValueError(
            f"indices must have shape [batch|1, heads|1, seq, random_keys] = "
            f"[{batch}|1, {heads}|1, {seq_len}, {random_keys}], got {tuple(indices.shape)}; "
            "draw them with bigbird_indices")
    indices = indices.long()
    i = torch.arange(seq_len, device=device).view(seq_len, 1)
    ok = (indices == -1) | ((indices >= sinks) & (indices <= i - window))
    if not bool(ok.all()):
        raise ValueError(
            "indices must be -1 or an earlier position outside the query's window and the sinks "
            f"(sinks <= j <= i - window, with window={window}, sinks={sinks}); draw them with "
            "bigbird_indices")
    return dedupe(indices)


def _prepare(q, k, v, window, random_keys, causal, sinks, key_mask, scale, generator, indices):
    """Every argument checked once; the random keys drawn unless given."""
    check_qkv(q, k, v)
    check_causal_only("bigbird_attention", check_bool("causal", causal))
    window, sinks = check_window(window), check_sinks(sinks)
    random_keys = check_random_keys(random_keys)
    B, H, n, D = q.shape
    check_key_mask(key_mask, B, n, q.device)
    scale = check_scale(scale, D)
    if indices is None:
        # One draw per sample, shared by the heads (as SA's default permutation).
        indices = bigbird_indices(B, 1, n, window, random_keys, sinks=sinks, generator=generator,
                                  device=q.device, key_mask=key_mask)
    else:
        indices = check_indices(indices, B, H, n, window, random_keys, sinks, q.device)
    return window, sinks, scale, indices


@reject_renamed
def bigbird_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    random_keys: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    indices: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal BigBird attention (see the module doc), O(n * (window + random_keys + sinks)).

    Args:
        q: [batch, heads_q, seq, head_dim]; k, v: [batch, heads_kv, seq, head_dim], heads_q a
            multiple of heads_kv (grouped-query attention).
        window: local causal window, itself included (>= 1).
        causal: BigBird here is causal only (True).
        random_keys: random earlier keys per query (>= 0), drawn from ``generator`` over each
            row's real tokens (shared by the heads; see :func:`bigbird_indices`) unless
            ``indices`` is given.
        sinks: the first ``sinks`` real tokens of each row are visible to every later query.
        key_mask: bool [batch, seq], True for real tokens; padded keys are never seen.
            A query with no visible key returns zeros.
        scale: softmax scale, default ``head_dim ** -0.5``.
        indices: [batch|1, heads_q|1, seq, random_keys] random positions, -1 for none (see
            :func:`bigbird_indices`); repeats are counted once.
        document_ids, cu_seqlens: packed documents, each attended as alone (random keys drawn
            per document; given ``indices`` must stay in their query's document).

    Returns:
        [batch, heads_q, seq, head_dim] in q's dtype.
    """
    if document_ids is not None or cu_seqlens is not None:
        return documents.packed_operator(
            bigbird_attention, q, k, v, window, random_keys, document_ids=document_ids,
            cu_seqlens=cu_seqlens, causal=causal, sinks=sinks, key_mask=key_mask, scale=scale,
            generator=generator, indices=indices)
    window, sinks, scale, indices = _prepare(q, k, v, window, random_keys, causal, sinks,
                                             key_mask, scale, generator, indices)
    n = q.shape[2]
    if n == 0:
        return q.new_zeros(q.shape)
    kpm = key_mask
    # padded keys and values never reach an output, even NaN
    k, v = zero_padding(k, kpm), zero_padding(v, kpm)
    if window >= n:  # no random candidates exist: plain causal attention
        return full_attention(q, k, v, causal=True, key_mask=kpm, scale=scale)
    sinks = min(sinks, n)

    def windowed(rows):
        qr, kr, vr, mask, idx = (take_rows(x, rows) for x in (q, k, v, kpm, indices))
        return _windowed(qr, kr, vr, window, idx, sinks=sinks, key_mask=mask, scale=scale)

    # Rows the window covers (real length <= window): full causal attention over their real
    # tokens, as alone (no random candidate exists there).
    return attend_by_coverage(q, k, v, window, kpm, windowed=windowed, causal=True,
                              attend=softmax_attend(scale))


def _windowed(q, k, v, window, indices, *, sinks, key_mask, scale):
    """:func:`bigbird_attention` for window < n (padding zeroed): window and sinks, merged with
    the random keys."""
    groups = q.shape[1] // k.shape[1]
    kpm = key_mask
    ke, ve = repeat_kv(k, groups), repeat_kv(v, groups)
    sink = blocked.SinkParts(ke, ve, sinks, kpm, 1)  # each row's first real tokens
    is_sink = sink.is_sink if sinks else None
    local = dict(pos=None, key_valid=None if kpm is None else kpm[:, None, :], layout="band",
                 causal=True, scale=scale, **sink.slot_order(None))
    if not bool((indices >= 0).any()):
        return blocked.windowed_attention(q, ke, ve, window, **local).to(q.dtype)
    if kpm is None and all_finite(k):  # no padding: sinks are the first positions
        return merge.attend_parts([*_window_parts(q, ke, ve, window, sinks, kpm, local),
                                   _random_rows_part(q, k, v, indices, kpm)], scale)
    out_a, lse_a = blocked.windowed_attention(q, ke, ve, window, return_lse=True, **local)
    out_b, lse_b = _random_part(q, k, v, indices, kpm, scale, is_sink)
    return merge_attention([out_a, out_b], [lse_a, lse_b])[0].to(q.dtype)


def _window_parts(q, ke, ve, window, sinks, kpm, local):
    """The local window and the sinks: offsets and sink rows for a few keys, else kernel tiles."""
    if window > merge.BAND_PART_MAX_WIDTH:
        return [parts.window_part(blocked.windowed_attention(q, ke, ve, window, return_tiles=True,
                                                             **local))]
    found = [parts.recent_band_part(q, ke, ve, window, skip_first=sinks, key_mask=kpm)]
    if sinks:
        found.append(parts.sink_rows_part(q, ke, ve, sinks, kpm))
    return found


def _gather_random(q, k, v, indices, kpm, is_sink=None):
    """The random keys and values of each query, gathered from the kv heads, and which count.

    Keys are gathered from the kv heads, never expanded to the query heads: with one draw per
    sample the G query heads of a kv head share its gathered keys. Returns kg, vg as
    [B * (1 or Hkv) * ..., D] rows and ``seen`` [B, Hi, n, r].
    """
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    Hi, r = indices.shape[1], indices.shape[-1]
    indices = indices.expand(B, Hi, n, r)
    seen = indices >= 0
    # Padded keys are never seen; sinks come once, through the window part.
    ok = kpm if kpm is not None else None
    if is_sink is not None:
        ok = ~is_sink if ok is None else ok & ~is_sink
    if ok is not None:
        ok = ok.expand(B, n)
        seen = seen & torch.gather(ok[:, None, :].expand(B, Hi, n), 2,
                                   indices.clamp(min=0).reshape(B, Hi, n * r)).view(B, Hi, n, r)
    # Rows of k viewed as [B * Hkv * n, D] (a row gather is faster than torch.gather with an
    # expanded index on CPU). Per query head, indices [B, Hq, n, r] are grouped as
    # [B, Hkv, G * n * r] under their kv head; shared ones [B, 1, n * r] serve every kv head.
    flat = indices.clamp(min=0).reshape(B, 1 if Hi == 1 else Hkv, -1)
    base = (torch.arange(B, device=q.device).view(B, 1, 1) * Hkv
            + torch.arange(Hkv, device=q.device).view(1, Hkv, 1)) * n
    rows = (base + flat).reshape(-1)
    return k.reshape(-1, D)[rows], v.reshape(-1, D)[rows], seen


def _random_part(q, k, v, indices, kpm, scale, is_sink=None):
    """Attention of each query to its gathered random keys alone: out [B, Hq, n, D], lse."""
    B, Hq, n, D = q.shape
    Hkv, G = k.shape[1], Hq // k.shape[1]
    Hi, r = indices.shape[1], indices.shape[-1]
    kg, vg, seen = _gather_random(q, k, v, indices, kpm, is_sink)
    bias = torch.zeros(seen.shape, dtype=compute_dtype(q), device=q.device)
    bias = bias.masked_fill(~seen, float("-inf"))
    if Hi == 1:  # queries [B, Hkv, n, G, D] against keys [B, Hkv, n, r, D]
        qg = q.view(B, Hkv, G, n, D).transpose(2, 3)
        kg, vg = kg.view(B, Hkv, n, r, D), vg.view(B, Hkv, n, r, D)
        out, lse = blocked.attend_with_lse(qg, kg, vg, bias.unsqueeze(-2), scale)
        return out.transpose(2, 3).reshape(B, Hq, n, D), lse.transpose(2, 3).reshape(B, Hq, n)
    kg, vg = kg.view(B, Hq, n, r, D), vg.view(B, Hq, n, r, D)  # one query per key set
    out, lse = blocked.attend_with_lse(q.unsqueeze(-2), kg, vg, bias.unsqueeze(-2), scale)
    return out.squeeze(-2), lse.squeeze(-1)


def _random_rows_part(q, k, v, indices, kpm) -> merge.RowsPart:
    """Each query against its gathered random keys, as one part of the merged softmax."""
    B, Hq, n, D = q.shape
    Hkv, G = k.shape[1], Hq // k.shape[1]
    Hi, r = indices.shape[1], indices.shape[-1]
    kg, vg, seen = _gather_random(q, k, v, indices, kpm)
    if Hi == 1:  # the G query heads of a kv head share its gathered keys
        kg, vg = kg.view(B, Hkv, 1, n, r, D), vg.view(B, Hkv, 1, n, r, D)
        return merge.RowsPart(q.view(B, Hkv, G, n, D), kg, vg, seen.view(B, 1, 1, n, r),
                              lambda x: x.reshape(B, Hq, n, x.shape[-1]),
                              lambda x, fill: x.reshape(B, Hkv, G, n, x.shape[-1]))
    # One key set per query head.
    return merge.RowsPart(q, kg.view(B, Hq, n, r, D), vg.view(B, Hq, n, r, D), seen)


def bigbird_mask(
    seq_len: int,
    window: int,
    indices: torch.Tensor,
    *,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense visibility [B|1, H|1, n, n] (bool) of the rule in the module doc. O(n^2)."""
    n = seq_len
    device = indices.device
    i = torch.arange(n, device=device).view(n, 1)
    j = torch.arange(n, device=device).view(1, n)
    is_sink = sink_keys(key_mask, sinks, n, device)[2][:, None, None, :]  # first real
    base = (j <= i) & ((j > i - window) | is_sink)
    if key_mask is not None:  # a row the window covers sees all its real tokens (causal)
        base = base | ((j <= i) & covered_rows(key_mask, window)[:, None, None, None])
    rand = torch.zeros(*indices.shape[:2], n, n + 1, dtype=torch.bool, device=device)
    # Column n collects the -1 entries, then is dropped.
    rand.scatter_(-1, torch.where(indices >= 0, indices, n), True)
    mask = base | rand[..., :n]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    return mask


def bigbird_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    random_keys: int,
    *,
    causal: bool = True,
    sinks: int = 0,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same attention through the dense mask and an explicit softmax: O(n^2), for tests."""
    window, sinks, scale, indices = _prepare(q, k, v, window, random_keys, causal, sinks,
                                             key_mask, scale, generator, indices)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    mask = bigbird_mask(q.shape[2], window, indices, sinks=sinks,
                        key_mask=key_mask)
    return masked_attention(q, k, v, mask, scale)


def bigbird_attended_keys(
    seq_len: int,
    window: int,
    random_keys: int,
    sinks: int = 0,
    indices: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """How many keys each query sees: LongTensor [B|1, H|1, seq_len], in O(n * (window +
    random_keys)).

    Equal to the row sums of :func:`bigbird_mask` for the same ``indices``; without
    ``indices`` one draw (batch 1, shared heads) is taken from ``generator`` exactly as
    :func:`bigbird_attention` draws it.
    """
    check_int("seq_len", seq_len, 0)
    window, sinks = check_window(window), check_sinks(sinks)
    random_keys = check_random_keys(random_keys)
    n = seq_len
    device = (indices.device if indices is not None else
              key_mask.device if key_mask is not None else None)
    batch = key_mask.shape[0] if key_mask is not None else 1
    check_key_mask(key_mask, batch, n, device)
    if indices is None:
        indices = bigbird_indices(batch, 1, n, window, random_keys, sinks=sinks,
                                  generator=generator, device=device,
                                  key_mask=key_mask)
    else:
        indices = check_indices(indices, indices.shape[0], indices.shape[1], n, window,
                                random_keys, sinks, indices.device)
    valid = (key_mask if key_mask is not None
             else torch.ones(1, n, dtype=torch.bool, device=indices.device))
    is_sink = sink_keys(key_mask, sinks, n, indices.device)[2].expand_as(valid)
    other = valid & ~is_sink  # real keys that are not sinks: the random keys count among these
    if key_mask is not None:  # in a row the window covers, every real key is already counted
        other = other & ~covered_rows(key_mask, window)[:, None]
    # The window and the sinks are a sliding window with sinks: [B|1, 1, n].
    counts = attended_keys(n, window, method="sliding_window", sinks=sinks,
                           key_mask=key_mask).to(indices.device)
    Bt, Hi, r = max(valid.shape[0], indices.shape[0]), indices.shape[1], indices.shape[-1]
    indices = indices.expand(Bt, Hi, n, r)
    real = torch.gather(other.expand(Bt, n)[:, None, :].expand(Bt, Hi, n), 2,
                        indices.clamp(min=0).reshape(Bt, Hi, n * r)).view(Bt, Hi, n, r)
    return counts + ((indices >= 0) & real).sum(-1)
