"""Dense attention primitives shared by every operator: GQA, masked softmax, SDPA, merges.

GQA expansion (:func:`repeat_kv`), padding (:func:`zero_padding`), the explicit masked softmax
(:func:`masked_attention`), SDPA with empty rows (:func:`masked_sdpa`), full attention and the
log-sum-exp merge of partial results (:func:`merge_attention`).

Two rules hold everywhere: a query with no visible key returns zeros (with zero gradients,
never NaN), and a hidden key never reaches an output, even when it holds NaN or inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")

__all__ = ["all_finite", "compute_dtype", "full_attention", "guard_empty_rows", "keys_finite", "masked_attention",
           "masked_sdpa", "merge_attention", "repeat_kv", "zero_padding"]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Key/value heads [B, Hkv, ...] -> [B, Hkv * groups, ...] for grouped-query attention.

    Each kv head is repeated for the ``groups`` consecutive query heads it serves; ``groups == 1``
    returns ``x`` itself (no copy).
    """
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def zero_padding(x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, H, n, D] with the padded positions (mask False) set to 0, by selection.

    Selection, not multiplication: padded keys and values (even NaN or inf) are replaced before
    any product, so they cannot reach an output. ``key_mask`` None returns ``x``.
    """
    if key_mask is None:
        return x
    return x.masked_fill(~key_mask[:, None, :, None], 0)


def all_finite(x: torch.Tensor) -> bool:
    """Are all entries finite? SDPA adds its mask to the scores, and NaN + -inf is NaN, so a
    non-finite key would reach the queries that do not see it: callers then take an explicit
    path that selects (:func:`masked_attention`, :func:`.blocked.attend_with_lse`).

    Read through the sum, one pass without a temporary (a quarter of the time of
    ``isfinite(x).all()``): a non-finite entry always makes the sum non-finite. Finite entries
    whose sum overflows also answer False, which only sends them down the exact selecting path.
    """
    return bool(torch.isfinite(x.sum(dtype=compute_dtype(x))))


def keys_finite(x: torch.Tensor) -> bool:
    """May the paths that are exact for finite keys only (SDPA, which adds its mask) read ``x``?

    Eager code checks (:func:`all_finite`). A ``torch.compile`` graph cannot branch on tensor
    values, so it decides from static facts and takes the keys as finite: padded keys are
    replaced by selection before any kernel (:func:`zero_padding`), so padding never reaches
    an output, compiled or not; a NaN or inf in a REAL key may reach the other queries of its
    tile in compiled code (keeping it to the queries that see it, by selection, cost more than
    compiling gains on a CPU: docs/benchmarks.md, "torch.compile").
    """
    return torch.compiler.is_compiling() or all_finite(x)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs are computed in float64 (gradcheck), everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) v over visible keys; rows with no visible key give zeros.

    q [..., Lq, D], k/v [..., Lk, D], mask bool broadcastable to [..., Lq, Lk]. Computed in fp32
    (fp64 for fp64 inputs, so gradcheck holds). Hidden keys are selected away, never added to
    -inf: a NaN key reaches only the queries that see it. The explicit reference of every
    operator; O(Lq * Lk) memory.
    """
    dt = compute_dtype(q)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, NEG_INF)
    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully masked row has max -inf; shift it by 0 so exp gives 0 instead of NaN.
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v.to(dt)).to(q.dtype)


def guard_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask for a kernel that applies it, has_key [..., Lq, 1]) for a bool mask (True = visible)
    or an additive one (0 / -inf).

    A row with no visible key would be softmax(-inf, ...) = NaN in both passes: it is let see
    every key instead, and the caller multiplies the result by ``has_key`` (its gradient is
    then zero too).
    """
    if mask.dtype == torch.bool:
        has_key = mask.any(dim=-1, keepdim=True)
        return mask | ~has_key, has_key
    has_key = (mask > NEG_INF).any(dim=-1, keepdim=True)
    return mask.masked_fill(~has_key, 0.0), has_key


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` under ``mask`` (bool, True = visible, or additive
    0 / -inf), with zeros for rows that see no key.

    SDPA adds its mask to the scores: keys must be finite (see :func:`all_finite`); otherwise
    use :func:`masked_attention`, which selects. ``scale`` None is SDPA's default.
    """
    mask, has_key = guard_empty_rows(mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) * has_key


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Full (causal) attention through SDPA, with the zero-row rule for padding.

    q [B, Hq, n, D], k/v [B, Hkv, n, D] (GQA heads are expanded here), key_mask [B, n] or None.
    SDPA adds its mask to the scores, so a non-finite key would reach hidden queries too
    (NaN + -inf = NaN): such inputs take the explicit, selecting reference path instead.
    """
    n = q.shape[2]
    finite = keys_finite(k)
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if not finite:
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device)
        mask = mask.tril() if causal else mask
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
        return masked_attention(q, k, v, mask, scale)
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = key_mask[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return masked_sdpa(q, k, v, mask, scale)


def merge_attention(outs: Sequence[torch.Tensor],
                    lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over DISJOINT key sets from each set's partial result (log-sum-exp merge).

    outs [..., n, D] are the parts' normalised outputs (0 where a part has no key), lses [..., n]
    their log-sum-exps (-inf there). Returns the merged output (0 on rows with no key in any part) and
    its log-sum-exp (-inf there). Differentiable; the shift is detached, as any finite shift
    gives the same result.
    """
    m = lses[0]
    for lse in lses[1:]:
        m = torch.maximum(m, lse)
    m = m.detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    out = total = None
    for o, lse in zip(outs, lses):
        w = torch.exp(lse - m)  # 0 where the part has no key (its output is 0 there)
        term = o * w.unsqueeze(-1)  # a NaN key's NaN reaches the rows that see it, no other
        out = term if out is None else out + term
        total = w if total is None else total + w
    lse = m + torch.log(total)  # -inf exactly where total == 0
    out = out / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out, lse
