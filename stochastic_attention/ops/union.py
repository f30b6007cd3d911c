"""The SA + local union of the blocked backend: SA windows and a local window in one softmax.

:func:`stochastic_attention.stochastic_attention` with ``local`` > 0 (causal): every query sees
its SA window, the sinks and its last ``local`` positions, each key once. Computed as two
disjoint parts, each O(n * window), merged exactly through their log-sum-exps.
"""

from __future__ import annotations

import torch

from . import flashband, merge, parts
from .blocked import SinkParts, sort_groups, windowed_attention
from .dense import all_finite, merge_attention, repeat_kv
from .patterns import inverse_permutation
from .permute import gather_mask, permute_seq

__all__ = ["union_attention"]


def union_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *,
                    perm: torch.Tensor, layout: str, sinks: int, key_mask: torch.Tensor | None,
                    scale: float, local: int) -> torch.Tensor:
    """Causal SA + local union as two disjoint parts merged by log-sum-exp, each O(n * window).

    Part A (slot space): the SA window minus each query's last ``local`` positions, plus the
    sinks. Part B (original order): a sliding window of ``local`` without the sink positions.
    Together they are exactly the keys :func:`.patterns.visible` gives with ``local``.
    Inputs as for :func:`.blocked.attention` (padding already zeroed, window and local < n).
    """
    if flashband.serves(q, k, v, key_mask=key_mask, sinks=sinks, layout=layout, perm=perm,
                        window=window, local=local):
        return flashband.union(q, k, v, window, perm=perm, layout=layout, local=local, scale=scale,
                               sinks=sinks)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    sink = SinkParts(k, v, sinks, key_mask, 1)
    if layout == "block":
        perm = sort_groups(perm, window)
    inv = inverse_permutation(perm)
    qs, ks, vs = (permute_seq(x, perm, inv) for x in (q, k, v))
    key_valid = gather_mask(key_mask, perm) if key_mask is not None else None
    # (compiled graphs take the two passes below: torch.compile cannot trace the merged parts'
    # autograd.Function, which gets the same tensor twice)
    if key_mask is None and not torch.compiler.is_compiling() and all_finite(k):
        return _union_parts(q, k, v, qs, ks, vs, window, perm=perm, inv=inv, layout=layout,
                            sinks=sinks, sink=sink, scale=scale, local=local)
    out_a, lse_a = windowed_attention(
        qs, ks, vs, window, pos=perm, key_valid=key_valid, layout=layout, causal=True,
        scale=scale, exclude_recent=local, return_lse=True, **sink.slot_order(perm))
    out_a = permute_seq(out_a, inv, perm)
    lse_a = permute_seq(lse_a.unsqueeze(-1), inv, perm).squeeze(-1)
    # Part B drops the window keys that are sinks (part A has them) and adds no sink keys.
    out_b, lse_b = windowed_attention(
        q, k, v, local, pos=None, layout="band", causal=True, scale=scale, return_lse=True,
        key_valid=key_mask[:, None, :] if key_mask is not None else None,
        **sink.flags_only())
    return merge_attention([out_a, out_b], [lse_a, lse_b])[0].to(q.dtype)


def _union_parts(q, k, v, qs, ks, vs, window, *, perm, inv, layout, sinks, sink, scale, local):
    """The union without padding and with finite keys, through :func:`.merge.attend_parts`:
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
        sa_parts = [parts.window_part(windowed_attention(
            qs, ks, vs, window, pos=perm, key_valid=None, layout=layout, causal=True, scale=scale,
            exclude_recent=local, return_tiles=True, **sink.slot_order(perm)), unpermute)]
    if local <= merge.BAND_PART_MAX_WIDTH:  # a few keys per query: cheaper than kernel tiles
        part_b = parts.recent_band_part(q, k, v, local, skip_first=sinks, key_mask=None)
    else:
        part_b = parts.window_part(windowed_attention(
            q, k, v, local, pos=None, layout="band", causal=True, scale=scale, return_tiles=True,
            key_valid=None, **sink.flags_only()))
    return merge.attend_parts([*sa_parts, part_b], scale)
