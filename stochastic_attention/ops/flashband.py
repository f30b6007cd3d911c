"""Windowed attention through PyTorch's fused CPU flash kernel, one chunk of query tiles at a time.

The fast CPU path of the blocked backend for inputs without padding or sinks (SWA, SA in the band
and block layouts, the SA + local union). Queries, in slot order, are cut into tiles of ``T``
slots; a tile reads the run of key slots its windows reach (band: ``T + window - 1`` when causal;
block: its own group). A chunk of tiles is one call of
``aten._scaled_dot_product_flash_attention_for_cpu`` (one sample; the kernel's batch axis is the
tiles, its head axis the heads), and:

- key tiles are an overlapping strided view of the chunk's keys: no tile is ever copied;
- without a permutation (SWA, and the local part of the union) the rows are views of q, k, v and
  the band is the same in every tile: one additive [T, L] table broadcast over tiles and heads
  (only chunks whose key run leaves the sequence build their own);
- with a permutation, the chunk's rows are gathered (``index_select`` by flat row index, which
  also maps a query head to its GQA key/value head) and the outputs written back to original
  order (``index_copy_``): no full-size permuted copy of q, k, v or the output is made. The mask
  is the band table AND position causality, built per chunk (per head only when each head has
  its own permutation); the kernel visits a tile's heads one after the other, so that mask stays
  in cache;
- chunk-sized buffers are re-used by the allocator, where full-size ones (32 MB at 16k tokens)
  would be fresh pages to fault in on every call.

Several parts (the union's SA window and local window) are merged by log-sum-exp as they are
produced. The backward pass recomputes chunk by chunk through the kernel's own backward, given
the MERGED output and log-sum-exp (the split-KV identity, see :mod:`.merge`), with its own tile
size; the key-tile gradients are folded back onto the keys by shifted adds.

Every key in a tile is multiplied, then masked by addition, so keys must be finite (a NaN key
would reach queries that do not see it): callers check (:func:`.blocked.all_finite`) and send
other inputs to :func:`.blocked.windowed_attention`, which selects.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .patterns import band_extent

__all__ = ["WindowPart", "attention", "serves"]

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")

# Query tile of the band layout. The kernel splits fewer than 192 queries into blocks of 32, so a
# tile of 32 is one block and reads the fewest keys (T + window - 1 when causal). Its backward
# does better with larger tiles. Measured on a 2-core CPU, fp32, window 256, head_dim 64.
FORWARD_TILE = 32
BACKWARD_TILE = 64
# Query slots per kernel call: enough tiles for every thread, small enough that a chunk's rows,
# mask and key-tile gradients stay in cache and come back from the allocator's free lists.
FORWARD_CHUNK = 2048
BACKWARD_CHUNK = 1024
# A chunk's mask is [tiles, heads (1 unless every head has its own permutation), T, L]; fewer rows
# per chunk keep it in cache, which halves the cost of building and reading it.
MASK_BYTES = 4 << 20
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class WindowPart:
    """One window of a (merged) attention, in a slot order.

    ``perm`` [B|1, H|1, n]: the original position of each slot, or None when slot == position.
    For ``layout="block"`` each group of ``window`` slots must be sorted by position
    (:func:`.blocked.sort_groups`), so that causality inside a group is a lower triangle.
    ``exclude_recent`` (causal, with ``perm``): window keys among the query's last
    ``exclude_recent`` positions are left to another part.
    """

    window: int
    layout: str = "band"
    causal: bool = True
    perm: torch.Tensor | None = None
    exclude_recent: int = 0


def serves(q: torch.Tensor, key_mask: torch.Tensor | None, sinks: int) -> bool:
    """Can this path serve the call? (The caller still checks that the keys are finite.)"""
    return (q.device.type == "cpu" and key_mask is None and sinks == 0 and q.dtype in DTYPES
            and q.shape[-2] > 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: Sequence[WindowPart],
              scale: float) -> torch.Tensor:
    """One softmax over the union of the parts' (disjoint) key sets, in original order.

    q [B, H, n, D]; k, v [B, Hkv, n, D] with H a multiple of Hkv; finite keys. Returns
    [B, H, n, D] in q's dtype. A row with no visible key in any part gives 0 (zero gradients).
    """
    q, k, v = (x.contiguous() for x in (q, k, v))
    return _WindowParts.apply(float(scale), tuple(parts), q, k, v)


# ---------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class _Tiling:
    """Query tiles of ``T`` slots; a tile reads key slots [start - left, start + T + right)."""

    n: int
    T: int
    left: int
    right: int
    block: bool

    @classmethod
    def make(cls, part: WindowPart, n: int, tile: int) -> _Tiling:
        if part.layout == "block":
            return cls(n, part.window, 0, 0, True)
        left, right = band_extent(part.window, part.causal)
        return cls(n, max(1, min(tile, n)), left, right, False)

    @property
    def L(self) -> int:
        return self.T + self.left + self.right

    def chunks(self, rows: int, mask_heads: int = 1, itemsize: int = 4):
        """(s, e, m): real query slots [s, e), m = whole tiles' worth of slots (>= e - s)."""
        rows = min(rows, MASK_BYTES // (self.L * mask_heads * itemsize))
        step = max(1, rows // self.T) * self.T
        for s in range(0, self.n, step):
            e = min(self.n, s + step)
            yield s, e, -(-(e - s) // self.T) * self.T

    def key_slots(self, s: int, m: int) -> tuple[int, int]:
        return s - self.left, s + m + self.right


@functools.lru_cache(maxsize=32)
def _band_table(T: int, left: int, right: int, dtype: torch.dtype, device: torch.device):
    """[T, L] additive band of a tile: query a sees key column c when a <= c <= a + left + right."""
    a = torch.arange(T, device=device)[:, None]
    c = torch.arange(T + left + right, device=device)[None, :]
    band = (c >= a) & (c <= a + left + right)
    return torch.zeros(band.shape, dtype=dtype, device=device).masked_fill_(~band, NEG_INF)


class _Rows:
    """Rows of one sample's [Hx, n, C] tensors in a part's slot order, as [m, H, C] chunks."""

    def __init__(self, perm: torch.Tensor | None, b: int, H: int, n: int, device):
        self.perm = None if perm is None else perm[b if perm.shape[0] > 1 else 0]  # [Hp, n]
        self.H, self.n, self.device = H, n, device

    def positions(self, a: int, b: int) -> torch.Tensor:
        """Original positions of slots [a, b) (clamped into the sequence): [m, Hp] (Hp 1 or H)."""
        slots = torch.arange(a, b, device=self.device).clamp_(0, self.n - 1)
        if self.perm is None:
            return slots[:, None]
        return self.perm[:, slots].t()

    def _index(self, pos: torch.Tensor, heads: int) -> torch.Tensor:
        """Flat row indices [m * H] into a [heads, n, C] tensor (heads < H: GQA heads)."""
        head = torch.arange(self.H, device=self.device) // (self.H // heads)
        return (head * self.n + pos).reshape(-1)

    def take(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """x [Hx, n, C] at slots [a, b) -> [b - a, H, C]; out-of-range slots repeat an edge row."""
        if self.perm is None and x.shape[0] == self.H and a >= 0 and b <= self.n:
            return x[:, a:b].transpose(0, 1)
        pos = self.positions(a, b)
        if pos.shape[1] == 1 and x.shape[0] == self.H:  # one order for all heads
            return x.index_select(1, pos[:, 0]).transpose(0, 1)
        flat = x.reshape(-1, x.shape[-1]).index_select(0, self._index(pos, x.shape[0]))
        return flat.view(b - a, self.H, x.shape[-1])

    def put(self, dest: torch.Tensor, a: int, rows: torch.Tensor, add: bool = False) -> None:
        """Write (or add) rows [m, H, C] into dest [Hd, n, C] at slots [a, a + m) (in range)."""
        b = a + rows.shape[0]
        if self.perm is None and dest.shape[0] == self.H:
            view = dest[:, a:b].transpose(0, 1)
            view.add_(rows) if add else view.copy_(rows)
            return
        pos = self.positions(a, b)
        if pos.shape[1] == 1 and dest.shape[0] == self.H:
            rows = rows.transpose(0, 1)
            dest.index_add_(1, pos[:, 0], rows) if add else dest.index_copy_(1, pos[:, 0], rows)
            return
        flat = dest.view(-1, dest.shape[-1])
        index = self._index(pos, dest.shape[0])
        rows = rows.reshape(-1, dest.shape[-1])
        flat.index_add_(0, index, rows) if add else flat.index_copy_(0, index, rows)


def _mask(part: WindowPart, til: _Tiling, rows: _Rows, s: int, m: int, dtype, device):
    """The chunk's additive mask, broadcastable to [nt, H, T, L], or None; and is_causal."""
    n, T, L = til.n, til.T, til.L
    nt = m // T
    ks, ke = til.key_slots(s, m)
    keys_in = ks >= 0 and ke <= n
    big = 2 * n + 1  # a position past every query: hides out-of-range key slots

    def key_positions():  # [nt, Hp, 1, L] with out-of-range slots at `big`
        pos = rows.positions(ks, ke)
        slot = torch.arange(ks, ke, device=device)[:, None]
        pos = pos.masked_fill((slot < 0) | (slot >= n), big)
        return pos.unfold(0, L, T).unsqueeze(-2) if not til.block else pos.view(nt, L, -1).permute(
            0, 2, 1).unsqueeze(-2)

    def query_positions():  # [nt, Hp, T, 1]
        return rows.positions(s, s + m).view(nt, T, -1).transpose(1, 2).unsqueeze(-1)

    if til.block:
        if part.exclude_recent:
            ok = key_positions() <= query_positions() - part.exclude_recent
            return torch.zeros((), dtype=dtype, device=device).masked_fill(~ok, NEG_INF), False
        if part.causal or keys_in:  # padding slots sort last: no real query sees them
            return None, part.causal
        slot = torch.arange(ks, ke, device=device).view(nt, 1, 1, L)
        return torch.zeros((), dtype=dtype, device=device).masked_fill(slot >= n, NEG_INF), False
    table = _band_table(T, til.left, til.right, dtype, device)
    if part.perm is None or not part.causal:  # the window alone, in slot space
        if keys_in:
            return table.view(1, 1, T, L), False
        slot = torch.arange(ks, ke, device=device)
        out = ((slot < 0) | (slot >= n)).unfold(0, L, T).view(nt, 1, 1, L)
        return table.masked_fill(out, NEG_INF), False
    ok = key_positions() <= query_positions() - part.exclude_recent
    return torch.where(ok, table, NEG_INF), False


def _tiles(rows_q, rows_k, rows_v, til: _Tiling, nt: int):
    """Kernel views: q [nt, H, T, D], k/v [nt, H, L, D] (overlapping, never copied)."""
    qt = rows_q.unflatten(0, (nt, til.T)).permute(0, 2, 1, 3)
    if til.block:
        kt, vt = (x.unflatten(0, (nt, til.T)).permute(0, 2, 1, 3) for x in (rows_k, rows_v))
    else:
        kt, vt = (x.unfold(0, til.L, til.T).permute(0, 1, 3, 2) for x in (rows_k, rows_v))
    return qt, kt, vt


def _has_key(mask: torch.Tensor, nt: int, H: int, T: int) -> torch.Tensor:
    """[m, H, 1] bool: the chunk's rows that see at least one key."""
    seen = (mask > NEG_INF).any(dim=-1).expand(nt, H, T)
    return seen.transpose(1, 2).reshape(nt * T, H, 1)


def _mask_heads(part: WindowPart) -> int:
    return 1 if part.perm is None else part.perm.shape[1]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Forward and backward


def _merge_rows(out, lse, o, l_):
    """Log-sum-exp merge of rows (out, lse) with a new part's (o, l_), all [m, H, .]; -inf = none."""
    top = torch.maximum(lse, l_)
    top = torch.where(top > NEG_INF, top, torch.zeros((), dtype=top.dtype))
    w1, w2 = torch.exp(lse - top), torch.exp(l_ - top)
    total = w1 + w2
    merged = (out * w1 + o * w2) / torch.where(total > 0, total, torch.ones((), dtype=total.dtype))
    return merged, top + torch.log(total)


def _forward(q, k, v, parts, scale, need_lse):
    B, H, n, D = q.shape
    work = _work_dtype(q.dtype)
    out = torch.empty(B, H, n, D, dtype=work, device=q.device)
    lse = torch.empty(B, H, n, 1, dtype=work, device=q.device) if need_lse or len(parts) > 1 else None
    for i, part in enumerate(parts):
        til = _Tiling.make(part, n, FORWARD_TILE)
        empty_rows = part.exclude_recent > 0
        for b in range(B):
            rows = _Rows(part.perm, b, H, n, q.device)
            for s, e, m in til.chunks(FORWARD_CHUNK, _mask_heads(part), q.element_size()):
                ks, ke = til.key_slots(s, m)
                nt = m // til.T
                mask, causal = _mask(part, til, rows, s, m, q.dtype, q.device)
                qt, kt, vt = _tiles(rows.take(q[b], s, s + m), rows.take(k[b], ks, ke),
                                    rows.take(v[b], ks, ke), til, nt)
                o, l_ = _FORWARD(qt, kt, vt, 0.0, causal, attn_mask=mask, scale=scale)
                o = o.permute(0, 2, 1, 3).reshape(m, H, D)[: e - s].to(work)
                l_ = l_.permute(0, 2, 1).reshape(m, H, 1)[: e - s].to(work)
                if empty_rows:  # the kernel gives such a row out 0 and a finite lse
                    l_ = l_.masked_fill(~_has_key(mask, nt, H, til.T)[: e - s], NEG_INF)
                if i > 0:
                    o, l_ = _merge_rows(rows.take(out[b], s, e), rows.take(lse[b], s, e), o, l_)
                rows.put(out[b], s, o)
                if lse is not None:
                    rows.put(lse[b], s, l_)
    return out, lse


def _fold(gk: torch.Tensor, til: _Tiling, nt: int) -> torch.Tensor:
    """Key-tile gradients [nt, H, L, D] -> gradients of the chunk's key rows [m + L - T, H, D]."""
    T, L = til.T, til.L
    if til.block:
        return gk.permute(0, 2, 1, 3).reshape(nt * T, gk.shape[1], gk.shape[-1])
    H, D = gk.shape[1], gk.shape[-1]
    segments = -(-L // T)
    acc = torch.zeros((nt + segments - 1) * T, H, D, dtype=gk.dtype, device=gk.device)
    tiles = gk.permute(0, 2, 1, 3)  # [nt, L, H, D]
    for j in range(segments):
        width = min(T, L - j * T)
        acc[j * T: j * T + nt * T].view(nt, T, H, D)[:, :width] += tiles[:, j * T: j * T + width]
    return acc[: nt * T + L - T]


def _backward(grad, q, k, v, out, lse_b, parts, scale):
    B, H, n, D = q.shape
    work = _work_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    for part in parts:
        til = _Tiling.make(part, n, BACKWARD_TILE)
        for b in range(B):
            rows = _Rows(part.perm, b, H, n, q.device)
            for s, e, m in til.chunks(BACKWARD_CHUNK, _mask_heads(part), q.element_size()):
                ks, ke = til.key_slots(s, m)
                nt = m // til.T
                mask, causal = _mask(part, til, rows, s, m, q.dtype, q.device)
                g = rows.take(grad[b], s, s + m)
                if e - s < m:  # padding rows of the last tile: no gradient flows from them
                    g = g.clone()
                    g[e - s:] = 0
                qt, kt, vt = _tiles(rows.take(q[b], s, s + m), rows.take(k[b], ks, ke),
                                    rows.take(v[b], ks, ke), til, nt)
                gt, ot = (x.unflatten(0, (nt, til.T)).permute(0, 2, 1, 3)
                          for x in (g, rows.take(out[b], s, s + m)))
                lt = rows.take(lse_b[b], s, s + m).reshape(nt, til.T, H).transpose(1, 2).contiguous()
                gq, gk, gv = _BACKWARD(gt, qt, kt, vt, ot, lt, 0.0, causal, attn_mask=mask,
                                       scale=scale)
                rows.put(dq[b], s, gq.permute(0, 2, 1, 3).reshape(m, H, D)[: e - s].to(work),
                         add=True)
                lo, hi = max(ks, 0), min(ke, n)
                for dest, gx in ((dk, gk), (dv, gv)):
                    rows.put(dest[b], lo, _fold(gx, til, nt)[lo - ks: hi - ks].to(work), add=True)
    return dq, dk, dv


class _WindowParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, parts, q, k, v):
        need_grad = any(ctx.needs_input_grad[2:])
        out, lse = _forward(q, k, v, parts, scale, need_grad)
        result = out.to(q.dtype)
        if need_grad:
            # The backward reads P = exp(S - lse): +inf on rows with no key makes every P there 0.
            lse_b = torch.where(lse > NEG_INF, lse, float("inf"))
            ctx.scale, ctx.parts = scale, parts
            ctx.save_for_backward(q, k, v, result, lse_b)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse_b = ctx.saved_tensors
        grad = grad.to(q.dtype).contiguous()
        dq, dk, dv = _backward(grad, q, k, v, out, lse_b, ctx.parts, ctx.scale)
        return None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# The operators' parts


def windowed(q, k, v, window: int, *, perm: torch.Tensor | None, layout: str, causal: bool,
             scale: float) -> torch.Tensor:
    """SWA (``perm`` None) or SA in ``layout`` (window < n, validated inputs, finite keys)."""
    if perm is not None and layout == "block":
        perm = _sort_groups(perm, window)
    return attention(q, k, v, [WindowPart(window, layout, causal, perm)], scale)


def union(q, k, v, window: int, *, perm: torch.Tensor, layout: str, local: int,
          scale: float) -> torch.Tensor:
    """The causal SA + local union: the SA window without each query's last ``local`` positions,
    and a sliding window of ``local``, merged (window, local < n; finite keys)."""
    if layout == "block":
        perm = _sort_groups(perm, window)
    return attention(q, k, v, [WindowPart(window, layout, True, perm, exclude_recent=local),
                               WindowPart(local, "band", True, None)], scale)


def _sort_groups(perm, window):
    from .blocked import sort_groups  # blocked imports nothing from here; kept local for clarity

    return sort_groups(perm, window)
