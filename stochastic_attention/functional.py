"""Public functional API: sliding-window and stochastic attention, validated and dispatched.

Tensor layout is [batch, heads, seq, head_dim], as in ``F.scaled_dot_product_attention``.
See :mod:`stochastic_attention.ops.patterns` for the exact rule of which keys a query sees.
Each operator checks its arguments once, resolves the backend and calls that backend's
``attention`` (:mod:`.ops.reference`, :mod:`.ops.blocked`, :mod:`.ops.flex`: one signature).
"""

from __future__ import annotations

import torch

from .ops import blocked, documents, flex, reference
from .ops.budget import METHODS, attended_keys
from .ops.permute import random_permutation, routing_permutation
from .ops.validate import (
    check_bool,
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
# Every backend module exposes attention(q, k, v, window, *, perm, layout, causal, sinks,
# key_mask, scale, local) for validated inputs.
BACKEND_MODULES = {"reference": reference, "blocked": blocked, "flex": flex}

__all__ = [
    "BACKENDS",
    "METHODS",
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
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window attention (SWA).

    Causal: query i sees keys j with ``i - window < j <= i`` (``window`` keys, itself included).
    Non-causal: a centred band of ``window`` keys. A row the window covers, i.e. whose real
    length (per ``key_mask``; without one, ``seq_len``) is at most ``window``, is full attention
    over its real tokens, so a sequence that short gives the same output alone or padded.

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
        document_ids, cu_seqlens: packed documents (int [batch, seq], equal ids = one
            document; or FlashAttention-style cumulative lengths over a batch of one row):
            each document is attended exactly as alone (:mod:`.ops.documents`).

    Returns:
        [batch, heads_q, seq, head_dim], in q's dtype.
    """
    if document_ids is not None or cu_seqlens is not None:
        return documents.packed_operator(
            sliding_window_attention, q, k, v, window, document_ids=document_ids,
            cu_seqlens=cu_seqlens, causal=causal, sinks=sinks, key_mask=key_mask, scale=scale,
            backend=backend)
    args = _checked(q, k, v, window, layout="band", causal=causal, sinks=sinks, local=0,
                    key_mask=key_mask, scale=scale)
    backend = _resolve_backend(backend, q, k, v)
    return BACKEND_MODULES[backend].attention(q, k, v, perm=None, **args)


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
    document_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
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
    A row the window covers (real length per ``key_mask``, else ``seq_len``, at most ``window``)
    is full (causal) attention over its real tokens, whatever the layout and padding.

    ``local`` (causal only): every query also sees its last ``local`` positions, in the same
    softmax as its SA window and sinks (a key in several of these sets counts once). This is the
    SA + local union that keeps a pretrained model's neighbourhood intact. It runs as two
    O(n * window) passes, the SA window without the recent keys and a sliding window of
    ``local``, merged exactly through their log-sum-exp (backends "blocked" and "reference").
    With ``document_ids`` / ``cu_seqlens`` (packed documents) the routing is drawn per
    document, and a given ``perm`` must permute every document within itself.
    Other arguments as in :func:`sliding_window_attention`.
    """
    if document_ids is not None or cu_seqlens is not None:
        return documents.packed_operator(
            stochastic_attention, q, k, v, window, document_ids=document_ids,
            cu_seqlens=cu_seqlens, perm=perm, generator=generator, causal=causal, layout=layout,
            sinks=sinks, local=local, key_mask=key_mask, scale=scale, backend=backend)
    args = _checked(q, k, v, window, layout=layout, causal=causal, sinks=sinks, local=local,
                    key_mask=key_mask, scale=scale)
    backend = _resolve_backend(backend, q, k, v, args["local"])
    B, H, n, _ = q.shape
    if perm is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        # One permutation per sample, shared by the heads (the paper draws one per layer): the
        # per-head mask work disappears and GQA keys/values are moved before being expanded.
        perm = routing_permutation(B, 1, n, key_mask=key_mask,
                                   generator=generator, device=q.device)
    else:
        perm = normalize_perm(perm, B, H, n, q.device)
    return BACKEND_MODULES[backend].attention(q, k, v, perm=perm, **args)


def _checked(q, k, v, window, *, layout, causal, sinks, local, key_mask, scale) -> dict:
    """Every argument of a windowed operator checked once: the backend keywords, normalised."""
    check_qkv(q, k, v)
    B, _, n, D = q.shape
    causal = check_bool("causal", causal)
    check_key_mask(key_mask, B, n, q.device)
    return dict(window=check_window(window), layout=check_layout(layout), causal=causal,
                sinks=check_sinks(sinks), local=check_local(local, causal), key_mask=key_mask,
                scale=check_scale(scale, D))


def _resolve_backend(backend: str, q, k, v, local: int = 0) -> str:
    """The backend that serves this call ("auto" resolved), or a ValueError saying why not."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return choose_backend(backend, device_type=q.device.type, needs_grad=needs_grad, local=local)


def choose_backend(backend: str, *, device_type: str, needs_grad: bool, local: int = 0,
                   flex_available: bool | None = None) -> str:
    """The backend that serves a call on ``device_type`` ("auto" resolved), or a ValueError
    saying why ``backend`` cannot. A function of facts only, so that the choice made on a GPU
    is tested on any machine. ``flex_available`` None asks this PyTorch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if flex_available is None:
        flex_available = flex.available()
    if backend == "auto":
        return "flex" if device_type == "cuda" and flex_available and not local else "blocked"
    if backend == "flex" and local:
        raise ValueError(flex.LOCAL_UNSUPPORTED)
    if backend == "flex":
        reason = flex.unsupported_reason(device_type, needs_grad, flex_available)
        if reason:
            raise ValueError(f"backend='flex' cannot serve this call: {reason}")
    return backend
