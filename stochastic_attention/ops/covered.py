"""Rows the window covers: full attention over their real tokens, in O(n * window).

The visibility rule (:mod:`.patterns`) makes a row whose real length is at most ``window`` full
(causal) attention over its real tokens, whatever the padded length ``n``: a sequence the window
covers then gives the same result alone (where ``window >= n``) and padded in any batch. The
fast backends cannot attend such a row through their windows (a window of slots around a query
need not hold every real token once padding is there), so :func:`attend_by_coverage` splits a
batch: the covered rows attend a compact copy of their real tokens (at most ``window`` keys per
row, :func:`covered_attention`), the other rows go through the backend's windowed path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dense import keys_finite, masked_attention, masked_sdpa, repeat_kv
from .patterns import covered_rows, first_real

# attend(q [B, H, n, D], k [B, H, W, D], v [B, H, W, D], mask bool [B, 1, n, W]) -> [B, H, n, D]
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["attend_by_coverage", "covered_attention", "take_rows"]


def take_rows(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """x[rows] along the batch; None rows (every row), None x and a batch of 1 (shared by every
    row, e.g. a permutation [1, H, n]) are returned as they are."""
    if x is None or rows is None or x.shape[0] == 1:
        return x
    return x.index_select(0, rows)


def softmax_attend(scale: float) -> Attend:
    """The softmax attention of the windowed operators, with the zero-row rule; a non-finite key
    takes the selecting path so that it reaches only the queries that see it."""
    def attend(q, k, v, mask):
        if keys_finite(k):
            return masked_sdpa(q, k, v, mask, scale)
        return masked_attention(q, k, v, mask, scale)
    return attend


def covered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                      *, causal: bool, attend: Attend, width: int | None = None) -> torch.Tensor:
    """Every query against every real key of its row (causal: at a position <= its own).

    q [B, Hq, n, D]; k, v [B, Hkv, n, D] (padding already zeroed); ``key_mask`` [B, n] with at
    most W real tokens per row. The real keys are gathered, in order, into [B, Hkv, W, D], so
    memory and time are O(n * W), never O(n^2). Padded queries see the real keys too (as in the
    dense rule); a row without a real token gives zeros. ``width``: the keys gathered per row
    (default: the most real tokens of any row); a row with more real tokens keeps its first.
    """
    B, Hkv, n, D = k.shape
    if width is None:
        width = max(int(key_mask.sum(-1).max()), 1) if B else 1  # >= 1 keeps the graph connected
    pos, real = first_real(key_mask, min(width, n))  # [B, W]
    index = pos[:, None, :, None].expand(B, Hkv, pos.shape[-1], D)
    groups = q.shape[1] // Hkv
    kc = repeat_kv(torch.gather(k, 2, index), groups)
    vc = repeat_kv(torch.gather(v, 2, index), groups)
    mask = real[:, None, None, :]
    if causal:
        mask = mask & (pos[:, None, None, :] <= torch.arange(n, device=q.device)[:, None])
    return attend(q, kc, vc, mask)


def attend_by_coverage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                       key_mask: torch.Tensor | None, *,
                       windowed: Callable[[torch.Tensor | None], torch.Tensor], causal: bool,
                       attend: Attend) -> torch.Tensor:
    """The rows the window covers through :func:`covered_attention`, the others through
    ``windowed(rows)``: it returns the outputs of the batch rows ``rows`` (LongTensor; None for
    every row), e.g. by slicing its inputs with :func:`take_rows`.

    q, k, v as for :func:`covered_attention`; the result is [B, Hq, n, D] in the batch's order.
    """
    covered = covered_rows(key_mask, window)
    if covered is not None and torch.compiler.is_compiling():
        # A graph cannot branch on values: every row both ways, then each row takes its own.
        full = covered_attention(q, k, v, key_mask, causal=causal, attend=attend,
                                 width=min(window, q.shape[2]))
        return torch.where(covered[:, None, None, None], full, windowed(None).to(full.dtype))
    if covered is None or not bool(covered.any()):
        return windowed(None)
    if bool(covered.all()):
        return covered_attention(q, k, v, key_mask, causal=causal, attend=attend)
    short = covered.nonzero().squeeze(1)
    rest = (~covered).nonzero().squeeze(1)
    full = covered_attention(*(x.index_select(0, short) for x in (q, k, v, key_mask)),
                             causal=causal, attend=attend)
    out = torch.cat([windowed(rest).to(full.dtype), full])
    order = torch.cat([rest, short])
    return out.index_select(0, torch.argsort(order))
