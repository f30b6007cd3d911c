"""Windowed attention through PyTorch's fused CPU flash kernel, one chunk of query tiles at a time.

The fast CPU path of the blocked backend for inputs without padding (SWA, SA in the band and
block layouts, the SA + local union; with or without sinks). Queries, in slot order, are cut into tiles of ``T``
slots; a tile reads the run of key slots its windows reach (band: ``T + window - 1`` when causal;
block: its own group). A chunk of tiles is one call of
``aten._scaled_dot_product_flash_attention_for_cpu`` (the kernel's batch axis is samples x
heads, its head axis the tiles), and:

- key tiles are an overlapping strided view of the chunk's keys: no tile is ever copied;
- without a permutation (SWA, and the local part of the union) the rows are views of q, k, v and
  the band is the same in every tile: one additive [T, L] table broadcast over tiles and heads
  (only chunks whose key run leaves the sequence build their own);
- with a permutation, the chunk's rows are gathered (``index_select`` by flat row index, which
  also maps a query head to its GQA key/value head) and the outputs written back to original
  order (``index_copy_``): no full-size permuted copy of q, k, v or the output is made. The mask
  is the band table AND position causality, built per chunk (per head only when each head has
  its own permutation: the forward then sends the heads to the kernel a few at a time, so that
  chunks stay long while their mask stays small);
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

from .blocked import sort_groups as _sort_groups
from .dense import all_finite as _all_finite
from .merge import BAND_PART_MAX_WIDTH
from .patterns import band_extent

__all__ = ["WindowPart", "attention", "serves"]

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")
_HIDE = 2.0**100  # scale of the position masks (see _mask); a power of two keeps it exact

# Query tile of the band layout. The kernel splits fewer than 192 queries into blocks of 32, so a
# tile of 32 is one block and reads the fewest keys (T + window - 1 when causal). Its backward
# does better with larger tiles, up to BACKWARD_TILE, the more so the wider the window
# (:func:`backward_tile`). Measured on a 2-core CPU, fp32, windows 16-256, head_dim 32 and 64.
FORWARD_TILE = 32
BACKWARD_TILE = 128
# Query slots per kernel call: enough tiles for every thread, small enough that a chunk's rows,
# mask and key-tile gradients stay in cache and come back from the allocator's free lists.
FORWARD_CHUNK = 2048
BACKWARD_CHUNK = 1024
# A chunk's mask is [tiles, heads (1 unless every head has its own permutation), T, L]; fewer rows
# per chunk keep it in cache, which halves the cost of building and reading it.
MASK_BYTES = 8 << 20
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


def serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_mask: torch.Tensor | None,
           sinks: int, layout: str = "band", perm: torch.Tensor | None = None, window: int = 0,
           local: int = 0) -> bool:
    """Does this path serve the call, and is it the faster one?

    It serves CPU calls without padding, with finite keys (sinks are a part of their own). It is not the faster one for
    the block layout in training (the blocked path's gathered copies, kept by autograd, spare
    its backward the re-gathers) nor for a union whose SA band is a few keys wide (computed
    offset by offset there, see :data:`.merge.BAND_PART_MAX_WIDTH`).
    """
    if not (q.device.type == "cpu" and key_mask is None and q.dtype in DTYPES
            and q.shape[-2] > 0):
        return False
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if layout == "block" and perm is not None and not local and needs_grad:
        return False
    if local and layout == "band" and window <= BAND_PART_MAX_WIDTH:
        return False
    # Compiled graphs take the keys as finite (no branch on values; see dense.keys_finite) and
    # reach this path through the custom operators of .flashband_ops.
    return torch.compiler.is_compiling() or _all_finite(k)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, parts: Sequence[WindowPart],
              scale: float, sinks: int = 0) -> torch.Tensor:
    """One softmax over the union of the parts' (disjoint) key sets, in original order, and of
    the first ``sinks`` positions (hidden from the parts; causal when the parts are).

    q [B, H, n, D]; k, v [B, Hkv, n, D] with H a multiple of Hkv; finite keys; sinks <= n.
    Returns [B, H, n, D] in q's dtype. A row with no visible key in any part gives 0 (zero
    gradients).
    """
    q, k, v = (addressable(x) for x in (q, k, v))
    return _WindowParts.apply(float(scale), tuple(parts), int(sinks), q, k, v)


def addressable(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows (last dim) can be addressed by one row index (see :func:`_row_view`):
    any layout of [B, H, n, D] whose last dim is contiguous and whose other strides are whole
    rows, such as the [B, n, H, D] projection output a model transposes (copying it would cost
    a pass over q, k and v each); otherwise a contiguous copy."""
    D = x.shape[-1]
    if x.stride(-1) == 1 and all(st % D == 0 for size, st in zip(x.shape[:-1], x.stride()[:-1])
                                 if size > 1):
        return x
    return x.contiguous()


def _row_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Strides of an addressable [B, H, n, D] tensor in rows of D (0 for a dim of size 1)."""
    D = x.shape[-1]
    return tuple(st // D if size > 1 else 0 for size, st in zip(x.shape[:-1], x.stride()[:-1]))


def _row_view(x: torch.Tensor) -> torch.Tensor:
    """The addressable tensor x [B, H, n, D] as rows [N, D] of its storage, where the row of
    (b, h, i) is b * sB + h * sH + i * sN (:func:`_row_strides`); rows between x's own ones
    (other tensors sharing the storage) are never indexed."""
    D = x.shape[-1]
    last = sum((size - 1) * st for size, st in zip(x.shape[:-1], _row_strides(x)))
    return x.as_strided((last + 1, D), (D, 1), x.storage_offset())


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

    def chunks(self, rows: int, mask_heads: int, itemsize: int):
        """(s, e, m): real query slots [s, e); m (>= e - s) whole tiles' worth of slots."""
        rows = min(rows, MASK_BYTES // (self.L * mask_heads * itemsize))
        step = max(1, rows // self.T) * self.T
        for s in range(0, self.n, step):
            e = min(self.n, s + step)
            yield s, e, -(-(e - s) // self.T) * self.T


@functools.lru_cache(maxsize=32)
def _band_table(T: int, left: int, right: int, dtype: torch.dtype, device: torch.device):
    """[T, L] additive band of a tile: query a sees key column c when a <= c <= a + left + right."""
    a = torch.arange(T, device=device)[:, None]
    c = torch.arange(T + left + right, device=device)[None, :]
    band = (c >= a) & (c <= a + left + right)
    return torch.zeros(band.shape, dtype=dtype, device=device).masked_fill_(~band, NEG_INF)


@dataclass
class _Chunk:
    """Query slots [s, e) as m = nt * T tile rows, reading key slots [ks, ke)."""

    s: int
    e: int
    m: int
    nt: int
    ks: int
    ke: int
    q_pos: torch.Tensor | None  # [Bp, Hp, m] original positions (clamped); None: slot == position
    k_pos: torch.Tensor | None  # [Bp, Hp, ke - ks]


class _Order:
    """A part's slot order for the query heads [h0, h0 + H) of q's ``q_heads``: rows of
    [B, Hx, n, C] tensors as [B, H, m, C] chunks, and back."""

    def __init__(self, perm: torch.Tensor | None, B: int, q_heads: int, n: int, device,
                 heads: tuple[int, int] | None = None, stores: dict | None = None):
        h0, h1 = heads or (0, q_heads)
        if perm is not None and perm.shape[1] > 1:
            perm = perm[:, h0:h1]
        self.perm = perm  # [Bp, Hp, n] or None
        self.B, self.H, self.n, self.device = B, h1 - h0, n, device
        self.h0, self.q_heads = h0, q_heads
        self._stores: dict[str, torch.Tensor] = {} if stores is None else stores

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor re-used by every chunk of the call (the first chunk is the largest):
        freeing and re-allocating megabytes per chunk would hand pages back to the system and
        fault them in again each time."""
        numel = 1
        for size in shape:
            numel *= size
        store = self._stores.get(name)
        if store is None or store.numel() < numel or store.dtype != dtype:
            store = self._stores[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return store[:numel].view(shape)

    def chunk(self, til: _Tiling, s: int, e: int, m: int) -> _Chunk:
        ks, ke = s - til.left, s + m + til.right
        if self.perm is None:
            return _Chunk(s, e, m, m // til.T, ks, ke, None, None)
        slots = torch.arange(ks, ke, device=self.device).clamp_(0, self.n - 1)
        k_pos = self.perm[..., slots]
        return _Chunk(s, e, m, m // til.T, ks, ke, k_pos[..., s - ks: s - ks + m], k_pos)

    def _flat(self, pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Row indices [B * H * m] into :func:`_row_view` of x [B, heads, n, C] (GQA when
        heads < q_heads)."""
        s_b, s_h, s_n = _row_strides(x)
        head = (self.h0 + torch.arange(self.H, device=self.device)) // (self.q_heads // x.shape[1])
        base = torch.arange(self.B, device=self.device)[:, None] * s_b + head * s_h
        return (base[:, :, None] + pos * s_n).reshape(-1)

    def _positions(self, a: int, b: int, pos: torch.Tensor | None) -> torch.Tensor:
        if pos is None:
            return torch.arange(a, b, device=self.device).clamp_(0, self.n - 1).view(1, 1, -1)
        return pos

    def take(self, x: torch.Tensor, a: int, b: int, pos: torch.Tensor | None,
             name: str) -> torch.Tensor:
        """x [B, Hx, n, C] at slots [a, b) (positions ``pos`` [Bp, Hp, b - a]) -> [B, H, b - a, C],
        gathered into the buffer ``name`` (a view when nothing moves); slots outside the sequence
        repeat an edge row (their keys are masked)."""
        C = x.shape[-1]
        if pos is None and x.shape[1] == self.q_heads and a >= 0 and b <= self.n:
            view = x[:, self.h0:self.h0 + self.H, a:b]
            if self.B == 1 or view.stride(0) == view.shape[1] * view.stride(1):
                return view  # samples and heads merge: the kernel's [B * H, ...] views exist
            return self.buffer(name, view.shape, x.dtype).copy_(view)
        pos = self._positions(a, b, pos)
        rows = self.buffer(name, (self.B, self.H, b - a, C), x.dtype)
        torch.index_select(_row_view(x), 0, self._flat(pos, x), out=rows.view(-1, C))
        return rows

    def put(self, dest: torch.Tensor, a: int, rows: torch.Tensor, pos: torch.Tensor | None,
            add: bool = False) -> None:
        """Write (or add) rows [B, H, m, C] into dest [B, Hd, n, C] at slots [a, a + m), in range."""
        m = rows.shape[2]
        if pos is None and dest.shape[1] == self.q_heads:
            view = dest[:, self.h0:self.h0 + self.H, a:a + m]
            view.add_(rows) if add else view.copy_(rows)
            return
        pos = self._positions(a, a + m, pos)
        if pos.shape[0] * pos.shape[1] == 1 and dest.shape[1] == self.q_heads == self.H and add:
            dest.index_add_(2, pos[0, 0], rows)
            return
        flat, index = _row_view(dest), self._flat(pos, dest)
        rows = rows.reshape(-1, dest.shape[-1])
        if add:
            flat.index_add_(0, index, rows)
        else:
            _wide(flat).index_copy_(0, index, _wide(rows.contiguous()))


def _wide(rows: torch.Tensor) -> torch.Tensor:
    """Contiguous rows [N, C] viewed with the widest element that tiles a row (16 bytes where it
    fits): index_copy_ moves rows element by element, so fewer, wider elements move them faster."""
    width = rows.shape[-1] * rows.element_size()
    offset = rows.storage_offset() * rows.element_size()
    for dtype in (torch.complex128, torch.float64, torch.float32):
        if (width % dtype.itemsize == 0 and offset % dtype.itemsize == 0
                and dtype.itemsize >= rows.element_size()):
            return rows.view(dtype)
    return rows


def _mask(part: WindowPart, til: _Tiling, ch: _Chunk, order: _Order, dtype, device,
          sinks: int = 0):
    """The chunk's additive mask, broadcastable to the kernel's [B * H, nt, T, L], or None; and
    whether the kernel should add its own causal triangle. Keys at the first ``sinks`` positions
    are hidden (the sink part has them)."""
    n, T, L, nt = til.n, til.T, til.L, ch.nt
    B, H = order.B, order.H
    keys_in = ch.ks >= 0 and ch.ke <= n

    def key_positions():
        """Scaled key positions [Bp, Hp, nt, L] (block: [.., nt, T]); slots outside the sequence
        and sinks are put past every query."""
        k_pos = ch.k_pos.to(torch.float32).mul_(_HIDE)
        if not keys_in:  # slots outside the sequence
            k_pos[..., : max(0, -ch.ks)] = 2 * n * _HIDE
            k_pos[..., n - ch.ks:] = 2 * n * _HIDE
        if sinks:
            k_pos.masked_fill_(ch.k_pos < sinks, 2 * n * _HIDE)
        Bp, Hp = k_pos.shape[:2]
        return k_pos.view(Bp, Hp, nt, T) if til.block else k_pos.unfold(2, L, T)

    def per_head(bias):
        Bp, Hp = bias.shape[:2]
        if Bp * Hp == 1:
            return bias.view(1, nt, T, L).to(dtype)
        # One mask per (sample, head): the kernel's batch axis is B * H.
        return bias.to(dtype).expand(B, H, nt, T, L).reshape(B * H, nt, T, L)

    def causal_bias(table=None):
        """0 where the key's position is at most the query's (minus exclude_recent), at most
        -2**100 elsewhere (exp gives exactly 0 there, as for -inf), and -inf where ``table``
        (0 or -inf) is. Scaled positions are exact in fp32 and their difference keeps its sign,
        so this is two cheap passes (a difference, then its minimum with the table or with 0)
        instead of a comparison and a select."""
        k_tiles = key_positions()
        Bp, Hp = k_tiles.shape[:2]
        q_pos = (ch.q_pos.to(torch.float32) - part.exclude_recent).mul_(_HIDE)
        bias = order.buffer("mask", (Bp, Hp, nt, T, L), torch.float32)
        torch.sub(q_pos.view(Bp, Hp, nt, T, 1), k_tiles.unsqueeze(-2), out=bias)
        if table is None:
            bias.clamp_(max=0)
        else:
            torch.minimum(bias, table, out=bias)
        return per_head(bias)

    def hidden_keys_bias(table=None):
        """Without causality: 0 for the window's keys (``table``), -inf for sinks and slots
        outside the sequence."""
        k_tiles = key_positions()
        Bp, Hp = k_tiles.shape[:2]
        bias = order.buffer("mask", (Bp, Hp, nt, T, L), torch.float32).zero_()
        bias.masked_fill_((k_tiles >= 2 * n * _HIDE).unsqueeze(-2), NEG_INF)
        if table is not None:
            torch.minimum(bias, table, out=bias)
        return per_head(bias)

    if til.block:
        if part.exclude_recent or (sinks and part.causal):  # visible keys precede the query
            return causal_bias(), part.causal
        if sinks:
            return hidden_keys_bias(), False
        if part.causal or keys_in:  # padding slots sort last: no real query sees them
            return None, part.causal
        slot = torch.arange(ch.ks, ch.ke, device=device).view(1, nt, 1, L)
        return torch.zeros((), dtype=dtype, device=device).masked_fill(slot >= n, NEG_INF), False
    if ch.k_pos is None or not (part.causal or sinks):  # the window alone, in slot space
        first = sinks if ch.k_pos is None else 0  # slot == position: the sinks are the first slots
        table = _band_table(T, til.left, til.right, dtype, device)
        if ch.ks >= first and ch.ke <= n:
            return table.view(1, 1, T, L), False
        slot = torch.arange(ch.ks, ch.ke, device=device)
        out = ((slot < first) | (slot >= n)).unfold(0, L, T).view(1, nt, 1, L)
        return table.masked_fill(out, NEG_INF), False
    table = _band_table(T, til.left, til.right, torch.float32, device)
    return (causal_bias(table) if part.causal else hidden_keys_bias(table)), False


def _tiles(q_rows, k_rows, v_rows, til: _Tiling, nt: int):
    """Kernel views, batch = samples * heads, heads = tiles: q [X, nt, T, D], k/v [X, nt, L, D]
    (overlapping windows of the key rows, never copied)."""
    X, D = q_rows.shape[0] * q_rows.shape[1], q_rows.shape[-1]
    qt = q_rows.reshape(X, nt, til.T, D)
    if til.block:
        return qt, k_rows.reshape(X, nt, til.T, D), v_rows.reshape(X, nt, til.T, D)
    return qt, *(x.reshape(X, -1, D).unfold(1, til.L, til.T).transpose(-1, -2) for x in (k_rows, v_rows))


def _has_key(mask: torch.Tensor, B: int, H: int, nt: int, T: int) -> torch.Tensor:
    """[B, H, nt * T, 1] bool: the chunk's rows that see at least one key (visible entries are
    0; ``mask`` broadcastable to [B * H, nt, T, L])."""
    seen = (mask == 0).any(dim=-1)  # [1 or B * H, 1 or nt, 1 or T]
    seen = seen.expand(seen.shape[0], nt, T).reshape(-1, nt * T)
    return seen.expand(B * H, nt * T).reshape(B, H, nt * T, 1)


def _mask_planes(part: WindowPart, B: int, H: int) -> int:
    """How many distinct [T, L] planes each tile's mask has, H heads a call (for the chunk size)."""
    if part.perm is None or part.perm.shape[0] * part.perm.shape[1] == 1:
        return 1
    return B * H


def _orders(part: WindowPart, til: _Tiling, B: int, H: int, rows: int, x: torch.Tensor,
            split_heads: bool):
    """The part's orders, one per group of query heads sent to the kernel together. With a
    permutation per head the mask has a plane per head: fewer heads per call (``split_heads``)
    keep chunks of ``rows`` queries within MASK_BYTES (shorter chunks re-read more of their
    neighbours' keys; the forward gains, the backward, whose chunks are shorter, does not)."""
    if part.perm is None or part.perm.shape[1] == 1 or not split_heads:
        return [_Order(part.perm, B, H, til.n, x.device)]
    plane = _mask_planes(part, B, 1) * til.L * min(rows, til.n) * x.element_size()
    group, stores = max(1, min(H, MASK_BYTES // plane)), {}
    return [_Order(part.perm, B, H, til.n, x.device, (h, min(H, h + group)), stores)
            for h in range(0, H, group)]


def _chunks(part: WindowPart, til: _Tiling, B: int, H: int, rows: int, x: torch.Tensor,
            split_heads: bool = False):
    """(order, s, e, m) for every chunk of the part: its heads' order, then :meth:`_Tiling.chunks`."""
    for order in _orders(part, til, B, H, rows, x, split_heads):
        for s, e, m in til.chunks(rows, _mask_planes(part, B, order.H), x.element_size()):
            yield order, s, e, m


def _like(x: torch.Tensor, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
    """A tensor of x's shape and layout (contiguous when x's is not dense) in ``dtype``."""
    return (torch.zeros_like if zero else torch.empty_like)(x, dtype=dtype)


def backward_tile(window: int) -> int:
    """The backward's band tile for a window: 32 up to 32 keys, 64 up to 128, else 128 (at most
    BACKWARD_TILE). A tile computes T + window - 1 keys per query; below a window of T the extra
    keys cost more than the larger tile saves (one thread, forward + backward calls: window 32,
    tile 128 -> 32, 0.79-0.88x the time; windows 64-128, 128 -> 64, about 0.9x for most calls;
    window 256, no change)."""
    return min(BACKWARD_TILE, 32 if window <= 32 else 64 if window <= 128 else 128)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Forward and backward


def _merge_rows(out, lse, o, l_):
    """Log-sum-exp merge of rows (out, lse) with a new part's (o, l_); lse -inf = no key.

    The merged row is ``out + (o - out) * w``, w = the new part's share of the softmax mass
    (one ``lerp``); a row with no key in either part keeps ``out`` (0) and lse -inf.
    """
    top = torch.maximum(lse, l_)
    top = torch.where(top > NEG_INF, top, torch.zeros((), dtype=top.dtype))
    mine, theirs = torch.exp(lse - top), torch.exp(l_ - top)
    total = mine + theirs
    share = theirs / torch.where(total > 0, total, torch.ones((), dtype=total.dtype))
    return torch.lerp(out, o, share), top + torch.log(total)


def _sink_keys(k: torch.Tensor, v: torch.Tensor, sinks: int, heads: int):
    """The sinks' keys and values [B, heads, sinks, D] (GQA heads repeated: a few rows)."""
    groups = heads // k.shape[1]
    return [x[:, :, :sinks].repeat_interleave(groups, dim=1) for x in (k, v)]


def _sink_mask(s: int, e: int, sinks: int, causal: bool, dtype, device) -> torch.Tensor | None:
    """[e - s, sinks] additive mask of queries at positions [s, e): sink j is visible from
    position j on (causal); every query sees sink 0."""
    if not causal or s >= sinks:
        return None
    pos = torch.arange(s, e, device=device)[:, None]
    later = torch.arange(sinks, device=device)[None, :] > pos
    return torch.zeros(later.shape, dtype=dtype, device=device).masked_fill_(later, NEG_INF)


def _forward_sinks(q, k, v, out, lse, sinks, causal, scale):
    """Merge the sink part (every query and the first ``sinks`` keys) into (out, lse), in place,
    a chunk of queries at a time."""
    n = q.shape[2]
    ks, vs = _sink_keys(k, v, sinks, q.shape[1])
    for s in range(0, n, FORWARD_CHUNK):
        e = min(n, s + FORWARD_CHUNK)
        o, l_ = _FORWARD(q[:, :, s:e], ks, vs, 0.0, False, scale=scale,
                         attn_mask=_sink_mask(s, e, sinks, causal, q.dtype, q.device))
        rows, row_lse = out[:, :, s:e], lse[:, :, s:e]
        o, l_ = _merge_rows(rows, row_lse, o.to(rows.dtype), l_.unsqueeze(-1).to(rows.dtype))
        rows.copy_(o)
        row_lse.copy_(l_)


def _backward_sinks(grad, q, k, v, out, lse_b, dq, dk, dv, sinks, causal, scale):
    """The sink part's gradients, added onto dq and the first ``sinks`` rows of dk, dv."""
    B, H, n, D = q.shape
    ks, vs = _sink_keys(k, v, sinks, H)
    gk_sum = torch.zeros(B, H, sinks, D, dtype=dk.dtype, device=q.device)
    gv_sum = torch.zeros_like(gk_sum)
    for s in range(0, n, BACKWARD_CHUNK):
        e = min(n, s + BACKWARD_CHUNK)
        gq, gk, gv = _BACKWARD(grad[:, :, s:e], q[:, :, s:e], ks, vs, out[:, :, s:e],
                               lse_b[:, :, s:e, 0].contiguous(), 0.0, False, scale=scale,
                               attn_mask=_sink_mask(s, e, sinks, causal, q.dtype, q.device))
        dq[:, :, s:e].add_(gq)
        gk_sum.add_(gk)
        gv_sum.add_(gv)
    Hkv = k.shape[1]  # GQA: a key/value head's gradient sums its query heads'
    dk[:, :, :sinks].add_(gk_sum.view(B, Hkv, H // Hkv, sinks, D).sum(2))
    dv[:, :, :sinks].add_(gv_sum.view(B, Hkv, H // Hkv, sinks, D).sum(2))


def _forward(q, k, v, parts, scale, need_lse, sinks=0):
    B, H, n, D = q.shape
    work = _work_dtype(q.dtype)
    out = _like(q, work)  # q's layout: a model's transpose back to [B, n, H * D] is then a view
    merged = len(parts) > 1 or sinks > 0
    lse = torch.empty(B, H, n, 1, dtype=work, device=q.device) if need_lse or merged else None
    for i, part in enumerate(parts):
        til = _Tiling.make(part, n, FORWARD_TILE)
        for order, s, e, m in _chunks(part, til, B, H, FORWARD_CHUNK, q, split_heads=True):
            Hg = order.H
            ch = order.chunk(til, s, e, m)
            mask, causal = _mask(part, til, ch, order, q.dtype, q.device, sinks)
            qt, kt, vt = _tiles(order.take(q, s, s + m, ch.q_pos, "q"),
                                order.take(k, ch.ks, ch.ke, ch.k_pos, "k"),
                                order.take(v, ch.ks, ch.ke, ch.k_pos, "v"), til, ch.nt)
            o, l_ = _FORWARD(qt, kt, vt, 0.0, causal, attn_mask=mask, scale=scale)
            count = e - s
            o = o.view(B, Hg, m, D)[:, :, :count].to(work)
            pos = None if ch.q_pos is None else ch.q_pos[..., :count]
            if lse is None:
                order.put(out, s, o, pos)
                continue
            l_ = l_.reshape(B, Hg, m, 1)[:, :, :count].to(work)
            if part.exclude_recent or sinks:  # a row with no key: out 0, a finite lse
                l_ = l_.masked_fill(~_has_key(mask, B, Hg, ch.nt, til.T)[:, :, :count], NEG_INF)
            if i > 0:
                o, l_ = _merge_rows(order.take(out, s, e, pos, "out"), order.take(lse, s, e, pos, "lse"),
                                    o, l_)
            order.put(out, s, o, pos)
            order.put(lse, s, l_, pos)
    if sinks:
        _forward_sinks(q, k, v, out, lse, sinks, parts[0].causal, scale)
    return out, lse


def _fold(gk: torch.Tensor, til: _Tiling, nt: int) -> torch.Tensor:
    """Key-tile gradients [X, nt, L, D] -> gradients of the chunk's key rows [X, m + L - T, D]."""
    X, T, L, D = gk.shape[0], til.T, til.L, gk.shape[-1]
    if til.block:
        return gk.reshape(X, nt * T, D)
    segments = -(-L // T)
    acc = torch.empty(X, (nt + segments - 1) * T, D, dtype=gk.dtype, device=gk.device)
    acc[:, : nt * T].view(X, nt, T, D).copy_(gk[:, :, :T])
    acc[:, nt * T:].zero_()
    for j in range(1, segments):
        width = min(T, L - j * T)
        acc[:, j * T: (j + nt) * T].view(X, nt, T, D)[:, :, :width] += gk[:, :, j * T: j * T + width]
    return acc[:, : nt * T + L - T]


def _fold_into(dest: torch.Tensor, gk: torch.Tensor, til: _Tiling, nt: int, ks: int) -> None:
    """Add key-tile gradients [B, H, nt, L, D] onto dest [B, H, n, D] rows ks.. (all in range):
    tile t's column c is row ks + t * T + c, so each run of T columns is one strided add."""
    T, L = til.T, til.L
    for j in range(-(-L // T)):
        width = min(T, L - j * T)
        rows = dest[:, :, ks + j * T:].unfold(2, width, T)[:, :, :nt].transpose(-1, -2)
        rows.add_(gk[:, :, :, j * T: j * T + width])


def _backward(grad, q, k, v, out, lse_b, parts, scale, sinks=0):
    B, H, n, D = q.shape
    work = _work_dtype(q.dtype)
    add_q = len(parts) > 1 or sinks > 0
    dq = _like(q, work, zero=add_q)
    dk, dv = _like(k, work, zero=True), _like(v, work, zero=True)
    for part in parts:
        til = _Tiling.make(part, n, backward_tile(part.window))
        for order, s, e, m in _chunks(part, til, B, H, BACKWARD_CHUNK, q):
            Hg = order.H
            ch = order.chunk(til, s, e, m)
            nt, T = ch.nt, til.T
            mask, causal = _mask(part, til, ch, order, q.dtype, q.device, sinks)
            g = order.take(grad, s, s + m, ch.q_pos, "grad")
            if e - s < m:  # the rows past the sequence in the last tile: no gradient
                g = g.clone()
                g[:, :, e - s:] = 0
            qt, kt, vt = _tiles(order.take(q, s, s + m, ch.q_pos, "q"),
                                order.take(k, ch.ks, ch.ke, ch.k_pos, "k"),
                                order.take(v, ch.ks, ch.ke, ch.k_pos, "v"), til, nt)
            ot = order.take(out, s, s + m, ch.q_pos, "out").reshape(B * Hg, nt, T, D)
            lt = order.take(lse_b, s, s + m, ch.q_pos, "lse").reshape(B * Hg, nt, T).contiguous()
            gq, gk, gv = _BACKWARD(g.reshape(B * Hg, nt, T, D), qt, kt, vt, ot, lt, 0.0, causal,
                                   attn_mask=mask, scale=scale)
            count = e - s
            if ch.q_pos is None and count == m and gq.dtype == work:  # one strided write
                view = dq[:, :, s:e].view(B, H, nt, T, D)
                gq = gq.view(B, H, nt, T, D)
                view.add_(gq) if add_q else view.copy_(gq)
            else:
                order.put(dq, s, gq.reshape(B, Hg, m, D)[:, :, :count].to(work),
                          None if ch.q_pos is None else ch.q_pos[..., :count], add=add_q)
            direct = (ch.k_pos is None and not til.block and k.shape[1] == H and ch.ks >= 0
                      and ch.ke <= n and gk.dtype == work)
            lo, hi = max(ch.ks, 0), min(ch.ke, n)
            k_pos = None if ch.k_pos is None else ch.k_pos[..., lo - ch.ks: hi - ch.ks]
            for dest, gx in ((dk, gk), (dv, gv)):
                if direct:  # keys in original order: add the tiles straight onto the rows
                    _fold_into(dest, gx.view(B, H, nt, til.L, D), til, nt, ch.ks)
                    continue
                rows = _fold(gx, til, nt)[:, lo - ch.ks: hi - ch.ks].to(work)
                order.put(dest, lo, rows.view(B, Hg, hi - lo, D), k_pos, add=True)
    if sinks:
        _backward_sinks(grad, q, k, v, out, lse_b, dq, dk, dv, sinks, parts[0].causal, scale)
    return dq, dk, dv


class _WindowParts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, parts, sinks, q, k, v):
        need_grad = any(ctx.needs_input_grad[3:])
        out, lse = _forward(q, k, v, parts, scale, need_grad, sinks)
        result = out.to(q.dtype)
        if need_grad:
            # The backward reads P = exp(S - lse): +inf on rows with no key makes every P there 0.
            lse_b = torch.where(lse > NEG_INF, lse, float("inf"))
            ctx.scale, ctx.parts, ctx.sinks = scale, parts, sinks
            ctx.save_for_backward(q, k, v, result, lse_b)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out, lse_b = ctx.saved_tensors
        grad = addressable(grad.to(q.dtype))
        dq, dk, dv = _backward(grad, q, k, v, out, lse_b, ctx.parts, ctx.scale, ctx.sinks)
        return None, None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# The operators' parts


def window_parts(perm: torch.Tensor | None, window: int, layout: str, causal: bool,
                 local: int) -> list[WindowPart]:
    """The parts of SWA (``perm`` None) or SA in ``layout`` (``local`` 0), or of the causal
    SA + local union: the SA window without each query's last ``local`` positions, and a
    sliding window of ``local`` (block layout: ``perm`` already sorted by group)."""
    if local:
        return [WindowPart(window, layout, True, perm, exclude_recent=local),
                WindowPart(local, "band", True, None)]
    return [WindowPart(window, layout, causal, perm)]


def windowed(q, k, v, window: int, *, perm: torch.Tensor | None, layout: str, causal: bool,
             scale: float, sinks: int = 0) -> torch.Tensor:
    """SWA (``perm`` None) or SA in ``layout``, with ``sinks`` (window < n, sinks <= n,
    validated inputs, finite keys)."""
    if perm is not None and layout == "block":
        perm = _sort_groups(perm, window)
    return _run(q, k, v, perm, window, layout, causal, 0, scale, sinks)


def union(q, k, v, window: int, *, perm: torch.Tensor, layout: str, local: int,
          scale: float, sinks: int = 0) -> torch.Tensor:
    """The causal SA + local union, with ``sinks`` (window, local < n; finite keys)."""
    if layout == "block":
        perm = _sort_groups(perm, window)
    return _run(q, k, v, perm, window, layout, True, local, scale, sinks)


def _run(q, k, v, perm, window, layout, causal, local, scale, sinks=0) -> torch.Tensor:
    if torch.compiler.is_compiling():  # the same path, as one opaque operator of the graph
        from . import flashband_ops  # late import: the operators are built on this module

        return flashband_ops.attention(q, k, v, perm, window, layout, causal, local, scale, sinks)
    return attention(q, k, v, window_parts(perm, window, layout, causal, local), scale, sinks)
