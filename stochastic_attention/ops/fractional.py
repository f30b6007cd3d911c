"""Fractional Neural Attention (FNA): attention weights from a Levy-diffusion kernel of distances.

For each head, with D_ij = ||q_i - k_j|| / scale (Euclidean distances, not dot products):
  - alpha < 2:  K_ij = (1 + D_ij / sqrt(eps)) ** -(head_dim + alpha)   (power-law tail)
  - alpha = 2:  K_ij = exp(-D_ij ** 2 / eps)                            (Gaussian)
Invisible keys get K_ij = 0, then every row is divided by its sum (there is no softmax);
a row with no visible key gives zeros. Output: P @ v.

alpha = 2 with row normalisation is softmax(2 q.k / s^2 - ||k||^2 / s^2) (for eps = 1), i.e.
plain softmax attention when all keys have the same norm. alpha < 2 gives a heavy tail: every
visible key keeps a non-negligible weight, so short- and long-range links coexist.

Backends (all share the visibility rule of :mod:`.patterns`):
  - ``reference``: the kernel written out literally on a dense n x n matrix. O(n^2).
  - ``chunked``: full attention, queries processed in chunks with checkpointing, so neither
    the forward nor the backward pass holds an n x n matrix. O(n^2) time, O(chunk * n) memory.
  - ``blocked``: with a ``window`` (SWA) and a ``perm`` (stochastic attention), tiles of queries
    attend to the run of key slots they can reach, as in :mod:`.blocked`. O(n * window).
The fast backends evaluate the kernel in log space and subtract each row's maximum before
exponentiating: the normalised weights are the same, but rows of far-away keys cannot
underflow to 0 / 0.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from . import documents
from .blocked import TilePlan, static_tiles
from .covered import attend_by_coverage, take_rows
from .dense import compute_dtype, guard_empty_rows, repeat_kv, zero_padding
from .patterns import dense_mask, inverse_permutation, visible
from .permute import gather_mask, gather_seq
from .validate import (
    check_bool,
    check_key_mask,
    check_layout,
    check_qkv,
    check_window,
    normalize_perm,
    reject_renamed,
)

BACKENDS = ("auto", "reference", "chunked", "blocked")
SCALE_RULES = ("auto", "sqrt_dim", "levy", "dim")

# Queries per chunk of the chunked backend: the chunk's [chunk, n] score matrix is the largest
# tensor it holds (one more during its recomputation in the backward pass).
QUERY_CHUNK = 256

__all__ = ["BACKENDS", "fractional_attention", "fractional_scale", "fractional_weights"]


def fractional_scale(head_dim: int, alpha: float, rule: str = "auto") -> float:
    """The distance scale s (D = ||q - k|| / s) for a rule of the published code.

    - ``"sqrt_dim"``: sqrt(head_dim), the softmax convention.
    - ``"levy"``: sqrt(head_dim) / (2 ** (1 / head_dim) - 1), about head_dim ** 1.5 / ln 2.
      It puts the kernel's half-point, (1 + D) ** -head_dim = 1/2, at ||q - k|| = sqrt(head_dim),
      the typical distance of vectors with unit-variance entries.
    - ``"dim"``: head_dim.
    - ``"auto"`` (the default): ``"sqrt_dim"`` for alpha = 2 and ``"levy"`` for alpha < 2.
    """
    if rule not in SCALE_RULES:
        raise ValueError(
            f"scale rule must be one of {SCALE_RULES} or a positive float, got {rule!r}")
    if rule == "auto":
        rule = "sqrt_dim" if alpha == 2 else "levy"
    if rule == "sqrt_dim":
        return math.sqrt(head_dim)
    if rule == "dim":
        return float(head_dim)
    return math.sqrt(head_dim) / (2 ** (1 / head_dim) - 1)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float in (0, 2], got {alpha!r}")
    if not 0 < alpha <= 2:
        raise ValueError(
            f"alpha must be in (0, 2] (the fractional Laplacian's order; 2 is the Gaussian"
            f" kernel, 1.2 the usual heavy-tailed choice), got {alpha}"
        )
    return float(alpha)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps (the kernel bandwidth) must be a positive float, got {eps!r}")
    return float(eps)


def _resolve_scale(scale, head_dim: int, alpha: float) -> float:
    if scale is None or isinstance(scale, str):
        return fractional_scale(head_dim, alpha, scale or "auto")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(
            f"scale must be a positive float, one of {SCALE_RULES} or None, got {scale!r}")
    return float(scale)


def log_kernel(d2: torch.Tensor, alpha: float, eps: float, head_dim: int) -> torch.Tensor:
    """log K from squared scaled distances D^2 (any shape)."""
    if alpha == 2:
        return d2 * (-1.0 / eps)
    # clamp: sqrt has an infinite slope at 0 (q_i == k_j exactly), which would give NaN gradients;
    # it also absorbs the slightly negative D^2 that rounding can produce.
    dist = d2.clamp(min=1e-12).sqrt()
    if eps != 1:
        dist = dist * eps**-0.5
    return torch.log1p(dist) * -(head_dim + alpha)


def _normalise(logk: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Row-normalised exp(logk) over visible entries; rows with nothing visible give zeros.

    exp(logk) / sum exp(logk) is a softmax of log K: the fused, max-shifted softmax evaluates it
    without underflow.
    """
    if mask is None:
        return torch.softmax(logk, dim=-1)
    mask, has_key = guard_empty_rows(mask)  # rows with no visible key give 0, never NaN
    p = torch.softmax(logk.masked_fill(~mask, float("-inf")), dim=-1)
    return p * has_key


def _sq_distances(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """||q_i - k_j||^2 / scale^2 via one matmul: [..., Lq, D], [..., Lk, D] -> [..., Lq, Lk]."""
    q, k = q * (1.0 / scale), k * (1.0 / scale)  # on the small [n, D] tensors
    norms = (q * q).sum(-1, keepdim=True) + (k * k).sum(-1).unsqueeze(-2)
    return torch.baddbmm(norms.flatten(0, -3), q.flatten(0, -3), k.flatten(0, -3).transpose(1, 2),
                         alpha=-2).view(norms.shape)


# ----------------------------------------------------------------------------------------------
# Reference: literal kernel on the dense matrix.
# ----------------------------------------------------------------------------------------------


def fractional_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    alpha: float,
    *,
    eps: float = 1.0,
    scale: float | str | None = None,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    window: int | None = None,
    perm: torch.Tensor | None = None,
    layout: str = "band",
) -> torch.Tensor:
    """The dense FNA weight matrix P [batch, heads_q, n, n] (rows sum to 1 or are all 0). O(n^2).

    Written as literally as possible (explicit differences, kernel, zeroing, division): the ground
    truth the fast backends are tested against, and the attention graph for analysis. Arguments as
    in :func:`fractional_attention`.
    """
    alpha, eps = _check_alpha(alpha), _check_eps(eps)
    check_qkv(q, k, k)
    B, H, n, D = q.shape
    s = _resolve_scale(scale, D, alpha)
    mask = _dense_visibility(B, H, n, q.device, causal, key_mask, window, perm, layout)
    dt = compute_dtype(q)
    k = repeat_kv(zero_padding(k, key_mask), H // k.shape[1])
    diff = q.to(dt).unsqueeze(-2) - k.to(dt).unsqueeze(-3)  # [B, H, n, n, D]
    d2 = (diff * diff).sum(-1) / s**2
    if alpha == 2:
        kern = torch.exp(-d2 / eps)
    else:
        dist = d2.clamp(min=1e-12).sqrt()
        kern = (1 + dist / math.sqrt(eps)) ** -(D + alpha)
    kern = torch.where(mask, kern, torch.zeros((), dtype=kern.dtype))  # selection: NaN stays out
    denom = kern.sum(-1, keepdim=True)
    return kern / torch.where(denom > 0, denom, torch.ones_like(denom))


def _dense_visibility(B, H, n, device, causal, key_mask, window, perm, layout):
    check_key_mask(key_mask, B, n, device)
    layout = check_layout(layout)
    if window is None:
        if perm is not None:
            raise ValueError("perm only acts inside windows: pass window= as well (or drop perm)")
        window = max(n, 1)
    window = check_window(window)
    if perm is not None:
        perm = normalize_perm(perm, B, H, n, device)
    return dense_mask(n, window, perm=perm, layout=layout, causal=causal,
                      key_mask=key_mask, device=device)


# ----------------------------------------------------------------------------------------------
# Public op.
# ----------------------------------------------------------------------------------------------


@reject_renamed
def fractional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: float,
    *,
    eps: float = 1.0,
    scale: float | str | None = None,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    window: int | None = None,
    perm: torch.Tensor | None = None,
    layout: str = "band",
    backend: str = "auto",
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fractional Neural Attention, optionally inside sliding or stochastic-attention windows.

    Args:
        q: [batch, heads_q, seq, head_dim]; k, v: [batch, heads_kv, seq, head_dim] with heads_q a
            multiple of heads_kv (grouped-query attention).
        alpha: order of the fractional Laplacian, in (0, 2]. 2 is the Gaussian kernel (softmax-
            like), alpha < 2 the power-law kernel (1 + D / sqrt(eps)) ** -(head_dim + alpha).
        eps: kernel bandwidth (1 in the published runs).
        scale: distances are ||q_i - k_j|| / scale. A positive float, or a rule of
            :func:`fractional_scale`; None means ``"auto"``: sqrt(head_dim) for alpha = 2 and
            sqrt(head_dim) / (2 ** (1 / head_dim) - 1) for alpha < 2.
        causal: hide keys after the query (FNA is usually bidirectional: default False).
        key_mask: bool [batch, seq], True for real tokens; padded keys get weight 0 and a
            query with no visible key returns zeros.
        window: if given, each query only sees the keys of its window (the rule of
            :mod:`stochastic_attention.ops.patterns`; ``window`` counts the query itself):
            sliding-window FNA, or stochastic-attention FNA with ``perm``. None is full
            attention, and so is every row whose real length (per ``key_mask``; else ``seq``)
            is at most ``window``.
        perm: [seq], [batch, seq] or [batch, heads_q, seq]; ``perm[..., slot]`` is the original
            position placed at permuted slot ``slot`` (see
            :func:`stochastic_attention.random_permutation`). Needs ``window``.
        layout: "band" or "block" window layout in permuted order (as in stochastic attention).
        backend: "auto", "reference" (dense), "chunked" (full attention, O(chunk * n) memory) or
            "blocked" (windowed, O(n * window)). "auto" picks chunked or blocked.
        document_ids, cu_seqlens: packed documents, each attended as alone; a ``perm`` must
            then permute every document within itself (:mod:`.documents`).

    Returns:
        [batch, heads_q, seq, head_dim] in q's dtype.
    """
    if document_ids is not None or cu_seqlens is not None:
        return documents.packed_operator(
            fractional_attention, q, k, v, alpha, document_ids=document_ids,
            cu_seqlens=cu_seqlens, eps=eps, scale=scale, causal=causal, key_mask=key_mask,
            window=window, perm=perm, layout=layout, backend=backend)
    check_qkv(q, k, v)
    alpha, eps = _check_alpha(alpha), _check_eps(eps)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    causal = check_bool("causal", causal)
    B, H, n, D = q.shape
    check_key_mask(key_mask, B, n, q.device)
    v = zero_padding(v, key_mask)  # padded values never reach an output, even NaN
    groups = H // k.shape[1]
    if backend == "reference":
        P = fractional_weights(q, k, alpha, eps=eps, scale=scale, causal=causal,
                               key_mask=key_mask, window=window, perm=perm,
                               layout=layout)
        return (P @ repeat_kv(v, groups).to(P.dtype)).to(q.dtype)

    s = _resolve_scale(scale, D, alpha)
    layout = check_layout(layout)
    if window is not None:
        window = check_window(window)
    if perm is not None:
        if window is None:
            raise ValueError("perm only acts inside windows: pass window= as well (or drop perm)")
        perm = normalize_perm(perm, B, H, n, q.device)
    if n == 0:
        return q.new_zeros(q.shape)
    full = window is None or window >= n
    if backend == "chunked" and not full:
        raise ValueError(
            f"backend='chunked' computes full attention but window={window} < seq={n};"
            " use backend='blocked' (or 'auto') for windowed FNA"
        )
    k, v = repeat_kv(zero_padding(k, key_mask), groups), repeat_kv(v, groups)
    out_dtype, dt = q.dtype, compute_dtype(q)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    kern = dict(alpha=alpha, eps=eps, scale=s)
    if full:
        out = _chunked(q, k, v, kern, causal=causal, key_mask=key_mask)
    else:
        def windowed(rows):
            qr, kr, vr, mask, pr = (take_rows(x, rows) for x in (q, k, v, key_mask, perm))
            return _windowed(qr, kr, vr, window, kern, perm=pr, layout=layout, causal=causal,
                             key_mask=mask)

        # Rows the window covers: every real key, on compact tensors (O(n * window)).
        out = attend_by_coverage(q, k, v, window, key_mask, windowed=windowed, causal=causal,
                                 attend=lambda q, k, v, mask: _attend(q, k, v, mask, kern))
    return out.to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Chunked full attention.
# ----------------------------------------------------------------------------------------------


def _attend(q, k, v, mask, kern):
    """P @ v for q [..., T, D], k/v [..., L, D]; mask: bool broadcastable to [..., T, L] or None."""
    d2 = _sq_distances(q, k, kern["scale"])
    p = _normalise(log_kernel(d2, kern["alpha"], kern["eps"], q.shape[-1]), mask)
    return p @ v


def _chunked(q, k, v, kern, *, causal, key_mask):
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)

    def chunk(qc, kc, vc, start):
        """Queries start.. against the first kc.shape[2] keys (all of them unless causal)."""
        m = kc.shape[2]
        if not causal and key_mask is None:  # every key visible: no mask at all
            return _attend(qc, kc, vc, None, kern)
        qpos, kpos = pos[start:start + qc.shape[2], None], pos[None, :m]
        key_valid = key_mask[:, None, None, :m] if key_mask is not None else None
        # window = n: the shared rule reduces to causality and padding.
        mask = visible(qpos, kpos, qpos, kpos, window=n, layout="band", causal=causal, sinks=0,
                       seq_len=n, key_valid=key_valid)
        return _attend(qc, kc, vc, mask, kern)

    if n <= QUERY_CHUNK:  # one chunk: checkpointing would only add a recomputation
        return chunk(q, k, v, 0)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for start in range(0, n, QUERY_CHUNK):
        qc = q[:, :, start:start + QUERY_CHUNK]
        # Causal: keys after the chunk's last query are never visible, so skip them (half the work).
        m = start + qc.shape[2] if causal else n
        kc, vc = k[:, :, :m], v[:, :, :m]
        if needs_grad:  # recompute the chunk's scores in backward instead of storing them
            outs.append(checkpoint(chunk, qc, kc, vc, start, use_reentrant=False))
        else:
            outs.append(chunk(qc, kc, vc, start))
    return torch.cat(outs, dim=2)


# ----------------------------------------------------------------------------------------------
# Windowed (SWA / SA) attention, blocked like ops/blocked.py.
# ----------------------------------------------------------------------------------------------


def _windowed(q, k, v, window, kern, *, perm, layout, causal, key_mask):
    """Windowed FNA: gather into slot order, attend tile by tile, scatter back."""
    if perm is not None:
        q, k, v = gather_seq(q, perm), gather_seq(k, perm), gather_seq(v, perm)
    key_valid = None
    if key_mask is not None:
        key_valid = (gather_mask(key_mask, perm) if perm is not None
                     else key_mask[:, None, :])
    out = _windowed_slots(q, k, v, window, kern, pos=perm, key_valid=key_valid, layout=layout,
                          causal=causal)
    return gather_seq(out, inverse_permutation(perm)) if perm is not None else out


def _windowed_slots(q, k, v, window, kern, *, pos, key_valid, layout, causal):
    """In slot space: q, k, v [B, H, n, D]; pos [B|1, H|1, n] or None (slot == position)."""
    n = q.shape[2]
    plan = TilePlan.make(n, window, layout, causal)
    qt, kt, vt = plan.query_tiles(q), plan.key_tiles(k), plan.key_tiles(v)
    query_slot, key_slot, _ = static_tiles(plan, window, causal, q.device)
    if pos is None:
        q_pos, k_pos = query_slot, key_slot
    else:
        fill = plan.n + plan.pad
        q_pos, k_pos = plan.query_index(pos, fill), plan.key_index(pos, fill)
    k_ok = key_slot >= 0  # tile padding is never a key
    if key_valid is not None:
        k_ok = k_ok & plan.key_index(key_valid, False)
    mask = visible(query_slot, key_slot, q_pos, k_pos, window=window, layout=layout,
                   causal=causal, sinks=0, seq_len=n, key_valid=k_ok)
    return plan.unpad(_attend(qt, kt, vt, mask, kern))
