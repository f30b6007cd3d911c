"""The blocked backend: windowed attention in O(n * window) time and memory, pure PyTorch.

:func:`attention` is the backend's entry (original order in and out, the signature every backend
shares). The kernels below work in SLOT space (tokens already gathered into permuted order; for SWA slot == position).
Queries are cut into tiles; each tile attends to the contiguous run of key slots its windows
can reach (``band``) or to its own group (``block``), plus the sink keys, with one batched
``scaled_dot_product_attention`` call. Masks are built from :mod:`.patterns`, the same rule the
reference uses, so the backends cannot drift apart. Autograd handles the backward pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .covered import attend_by_coverage, softmax_attend, take_rows
from .dense import compute_dtype, full_attention, keys_finite, masked_sdpa, repeat_kv, zero_padding
from .patterns import band_extent, in_window, inverse_permutation, sink_keys
from .permute import gather_mask, permute_seq

# Query tile for the band layout: each tile of T queries reads T + window - 1 keys, so a small T
# wastes less work but makes smaller matmuls. 128 was the best on a 2-core CPU at window 256.
BAND_TILE = 128


def _tiles(x: torch.Tensor, size: int, step: int, pad_left: int, pad_right: int) -> torch.Tensor:
    """[..., n, D] -> [..., n_tiles, size, D]: overlapping windows along the sequence (a view)."""
    x = F.pad(x, (0, 0, pad_left, pad_right))
    return x.unfold(-2, size, step).transpose(-1, -2)


def _tiles1d(x: torch.Tensor, size: int, step: int, pad_left: int, pad_right: int, value) -> torch.Tensor:
    """[..., n] -> [..., n_tiles, size] for index / mask tensors."""
    x = _pad_last(x, pad_left, pad_right, value)
    return x.unfold(-1, size, step)


def _pad_last(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    """``F.pad(x, (left, right), value=value)``. Under torch.compile the fill is written by
    ``masked_fill``: it may be a length (symbolic with dynamic shapes), which F.pad's float
    ``value`` would pin to a number, so that every new sequence length would recompile."""
    if not torch.compiler.is_compiling():
        return F.pad(x, (left, right), value=value)
    index = torch.arange(left + x.shape[-1] + right, device=x.device)
    return F.pad(x, (left, right)).masked_fill((index < left) | (index >= left + x.shape[-1]),
                                               value)


@dataclass(frozen=True)
class TilePlan:
    """How a sequence of ``n`` slots is cut into query tiles and the key runs they reach.

    ``band``: tiles of ``T`` queries, each reading the ``L = T + window - 1`` key slots its
    windows can reach. ``block``: tiles are the groups of ``window`` slots (``L = T``).
    Shared by every blocked kernel (softmax and fractional) so they tile identically.
    """

    n: int
    T: int
    left: int
    right: int
    layout: str

    @classmethod
    def make(cls, n: int, window: int, layout: str, causal: bool) -> TilePlan:
        if layout == "block":
            return cls(n, window, 0, 0, layout)
        left, right = band_extent(window, causal)
        # (a comparison, not min(): a symbolic n under torch.compile then gives T = n exactly)
        return cls(n, n if n <= BAND_TILE else BAND_TILE, left, right, layout)

    @property
    def L(self) -> int:
        return self.T + self.left + self.right

    @property
    def nt(self) -> int:
        return -(-self.n // self.T)

    @property
    def pad(self) -> int:
        return self.nt * self.T - self.n

    def query_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n, D] -> [..., nt, T, D]."""
        return F.pad(x, (0, 0, 0, self.pad)).view(*x.shape[:-2], self.nt, self.T, x.shape[-1])

    def key_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n, D] -> [..., nt, L, D]: the key slots each query tile reaches."""
        if self.layout == "block":
            return self.query_tiles(x)
        if self.nt == 1:  # one tile reads every slot (and unfold would pin a symbolic length)
            return F.pad(x, (0, 0, self.left, self.right + self.pad)).unsqueeze(-3)
        return _tiles(x, self.L, self.T, self.left, self.right + self.pad)

    def query_index(self, x: torch.Tensor, fill) -> torch.Tensor:
        """[..., n] -> [..., nt, T, 1] for per-slot values (positions, masks)."""
        return _pad_last(x, 0, self.pad, fill).view(*x.shape[:-1], self.nt, self.T, 1)

    def key_index(self, x: torch.Tensor, fill) -> torch.Tensor:
        """[..., n] -> [..., nt, 1, L] for per-slot values (positions, masks)."""
        if self.layout == "block":
            return self.query_index(x, fill).transpose(-1, -2)
        if self.nt == 1:
            return _pad_last(x, self.left, self.right + self.pad, fill)[..., None, None, :]
        return _tiles1d(x, self.L, self.T, self.left, self.right + self.pad, fill).unsqueeze(-2)

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, nt, T, D] -> [B, H, n, D]."""
        B, H = out.shape[:2]
        return out.reshape(B, H, self.nt * self.T, out.shape[-1])[:, :, : self.n]


def _attend(q, k, v, bias, scale, guard_empty_rows: bool):
    """One batched SDPA over tiles. q [B,H,nt,T,D]; k,v [B,H,nt,L,D]; bias [Bm,Hm,nt,T,L] (0 / -inf)."""
    B, H, nt, T, D = q.shape
    L = k.shape[-2]
    q4, k4, v4 = (x.reshape(B * H, nt, x.shape[-2], D) for x in (q, k, v))
    if bias.shape[0] == 1 and bias.shape[1] == 1:
        bias4 = bias.reshape(1, nt, T, L)
    else:
        bias4 = bias.expand(B, H, nt, T, L).reshape(B * H, nt, T, L)
    if guard_empty_rows:  # rows with no visible key give 0, without NaN in either pass
        out = masked_sdpa(q4, k4, v4, bias4, scale)
    else:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias4, scale=scale)
    return out.view(B, H, nt, T, D)


def attend_with_lse(q, k, v, bias, scale, select: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`_attend`, computed explicitly so it also returns the log-sum-exp of each row.

    Any leading dims: q [..., T, D], k/v [..., L, D], bias broadcastable to [..., T, L].
    Returns out [..., T, D] and lse [..., T] in fp32, fp64 for fp64 inputs (lse = -inf and out = 0
    for a row with no visible key, with zero gradients there), for :func:`.dense.merge_attention`. Hidden
    keys are selected away (not added to -inf), so a NaN key reaches only the rows that see it;
    ``select=False`` skips that pass when the caller knows every key is finite. One exp pass, in
    place (safe for autograd: only the exp's own result is saved).
    """
    dt = compute_dtype(q)
    scores = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)).mul_(scale).add_(bias)
    if select:
        scores = scores.masked_fill_(bias == float("-inf"), float("-inf"))
    has_key = (bias > float("-inf")).any(dim=-1, keepdim=True)
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(has_key, row_max, torch.zeros_like(row_max))  # empty rows: exp(-inf) = 0
    p = scores.sub_(row_max).exp_()
    total = p.sum(dim=-1, keepdim=True)
    total = torch.where(has_key, total, torch.ones_like(total))
    out = torch.matmul(p, v.to(dt)) / total
    lse = torch.where(has_key, row_max + torch.log(total), float("-inf"))
    return out, lse.squeeze(-1)


@functools.lru_cache(maxsize=32)
def static_tiles(plan: TilePlan, window: int, causal: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot indices of query and key tiles, and the head-independent part of the mask.

    Cached: a training run calls this with the same shape every step. Returns query_slot
    [nt, T, 1], key_slot [nt, 1, L] (-1 for tile padding) and static = in the window and a real
    key [nt, T, L].
    """
    slot = torch.arange(plan.n, device=device)
    query_slot = plan.query_index(slot, plan.n + plan.pad)
    key_slot = plan.key_index(slot, -1)
    static = in_window(query_slot, key_slot, window, plan.layout, causal, plan.n) & (key_slot >= 0)
    return query_slot, key_slot, static


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    pos: torch.Tensor | None,
    key_valid: torch.Tensor | None,
    layout: str,
    causal: bool,
    sinks: int,
    sink_k: torch.Tensor | None,
    sink_v: torch.Tensor | None,
    sink_valid: torch.Tensor | None,
    scale: float,
    exclude_recent: int = 0,
    return_lse: bool = False,
    sink_pos: torch.Tensor | None = None,
    key_is_sink: torch.Tensor | None = None,
    return_tiles: bool = False,
) -> torch.Tensor | tuple:
    """Attention of each slot to the keys of its window (and the sinks), in slot space.

    q, k, v: [B, H, n, D] in slot order (k, v already expanded to H heads).
    pos: [B|1, H|1, n] original position of each slot, or None when slot == position (SWA).
    key_valid: [B, 1|H, n] bool in slot order, or None. For ``block`` the caller sorts every
    group of ``window`` slots by position (see :func:`sort_groups`).
    sink_k, sink_v: [B, H, S, D] the sink keys/values, at original positions ``sink_pos``
    [B|1, 1, S] (default 0..S-1); sink_valid [B, 1, S]. ``key_is_sink`` [B|1, 1|H, n] (slot order)
    marks the window keys that are sinks, which are left to the sink keys (default: positions
    below ``sinks``).
    window < n is assumed (the dispatcher sends window >= n, and the rows the window covers,
    to full attention).
    exclude_recent (causal, with ``pos``): window keys among the query's last ``exclude_recent``
    positions are left out; the SA + local union serves them in a second, local pass.
    return_lse: also return the log-sum-exp of each row, [B, H, n] fp32 (see :func:`.dense.merge_attention`).
    return_tiles: attend nothing; return (plan, q tiles, k tiles, v tiles, bias) for
    :func:`.parts.window_part`, which attends them as one part of a merged softmax.
    """
    B, H, n, D = q.shape
    device = q.device
    guard = key_valid is not None or device.type != "cpu"
    if exclude_recent and (pos is None or not causal):
        raise ValueError("exclude_recent needs a permutation (pos) and causal=True")

    plan = TilePlan.make(n, window, layout, causal)
    L, n_pad = plan.L, plan.n + plan.pad
    qt, kt, vt = plan.query_tiles(q), plan.key_tiles(k), plan.key_tiles(v)
    # (compiled graphs build these tables once, at tracing: the cache is for eager calls)
    tables = static_tiles.__wrapped__ if torch.compiler.is_compiling() else static_tiles
    query_slot, key_slot, static = tables(plan, window, causal, device)

    def as_tiles(x, fill):  # [.., n] -> query tiles [.., nt, T, 1] and key tiles [.., nt, 1, L]
        return plan.query_index(x, fill), plan.key_index(x, fill)

    # Visibility as an additive bias (0 or -inf), built in as few full-size passes as possible:
    # SDPA would turn a bool mask into exactly such a tensor anyway, and on CPU these
    # elementwise passes, not the matmuls, dominate. The rule is patterns.visible, folded:
    # - the band and the tile padding do not depend on the head: a small [nt, T, L] table;
    # - padded keys and window keys that are sinks (they come back once, below, as sink keys)
    #   are folded into the key's position (set past every query) when causal, so the whole
    #   per-head part is one comparison and one `where`.
    neg = float("-inf")
    drop = None  # [.., nt, 1, L] keys that no query may see through the window
    if key_valid is not None:
        drop = ~as_tiles(key_valid, False)[1]
    if sinks > 0 and key_is_sink is not None:
        sink_key = as_tiles(key_is_sink, False)[1]
        drop = sink_key if drop is None else drop | sink_key
    if pos is None:  # SWA: slot == position, the band already is causal
        if sinks > 0 and key_is_sink is None:
            static = static & (key_slot >= sinks)
        visible_keys = static if drop is None else static & ~drop
        bias = torch.zeros((), dtype=q.dtype, device=device).masked_fill(~visible_keys, neg)
        q_pos = query_slot
    else:
        q_pos, k_pos = as_tiles(pos, n_pad)
        if sinks > 0 and key_is_sink is None:
            sink_key = k_pos < sinks
            drop = sink_key if drop is None else drop | sink_key
        static_bias = torch.zeros(static.shape, dtype=q.dtype, device=device).masked_fill_(~static, neg)
        if causal:
            if drop is not None:
                k_pos = k_pos.masked_fill(drop, n_pad + 1)
            bias = torch.where(k_pos <= q_pos - exclude_recent, static_bias, neg)
        else:
            bias = static_bias if drop is None else torch.where(drop, neg, static_bias)
    bias = bias.view((1,) * (5 - bias.dim()) + tuple(bias.shape))

    if sink_k is not None:
        S = sink_k.shape[-2]
        if sink_pos is None:
            sink_pos = torch.arange(S, device=device).view(1, 1, S)
        # [B|1, 1, S] -> [B|1, 1, 1, 1, S] against query positions [.., nt, T, 1]
        s_ok = (sink_pos[:, :, None, None, :] <= q_pos if causal else torch.ones(
            1, 1, S, dtype=torch.bool, device=device))
        if sink_valid is not None:
            s_ok = s_ok & sink_valid.unsqueeze(-2).unsqueeze(-2)
        s_ok = s_ok.view((1,) * (5 - s_ok.dim()) + tuple(s_ok.shape))
        lead = torch.broadcast_shapes(s_ok.shape[:-1], bias.shape[:-1])
        full = torch.empty(*lead, L + S, dtype=q.dtype, device=device)
        full[..., :L] = bias
        full[..., L:] = torch.zeros((), dtype=q.dtype, device=device).masked_fill(~s_ok, neg)
        bias = full
        kt = torch.cat([kt, sink_k.unsqueeze(2).expand(B, H, plan.nt, S, D)], dim=-2)
        vt = torch.cat([vt, sink_v.unsqueeze(2).expand(B, H, plan.nt, S, D)], dim=-2)

    if return_tiles:
        return plan, qt, kt, vt, bias
    finite = keys_finite(k)  # the sink keys are keys too
    if return_lse:
        out, lse = attend_with_lse(qt, kt, vt, bias, scale, select=not finite)
        return plan.unpad(out), plan.unpad(lse.unsqueeze(-1)).squeeze(-1)
    if not finite:
        return plan.unpad(attend_with_lse(qt, kt, vt, bias, scale)[0].to(q.dtype))
    return plan.unpad(_attend(qt, kt, vt, bias, scale, guard))


def sort_groups(perm: torch.Tensor, window: int) -> torch.Tensor:
    """Reorder each group of ``window`` consecutive slots by original position.

    The block layout's key set per group does not depend on the order inside the group, so this
    changes nothing in the result and turns the causal test into a plain lower triangle.
    """
    n = perm.shape[-1]
    n_pad = -(-n // window) * window
    # Padding gets positions >= n: it sorts to the end of the last group, so after sorting the
    # first n entries are exactly the real tokens.
    pad = torch.arange(n, n_pad, device=perm.device).expand(*perm.shape[:-1], -1)
    grouped = torch.cat([perm, pad], -1).view(*perm.shape[:-1], n_pad // window, window)
    return grouped.sort(dim=-1).values.reshape(*perm.shape[:-1], n_pad)[..., :n]


def dense_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
                causal: bool) -> torch.Tensor:
    """Block layout without sinks or padding, groups sorted by position: every tile is dense.

    One SDPA call over [B*H, groups, window, D] with ``is_causal`` (a plain lower triangle). A
    partial last group is zero-padded at its end, which no real query sees under causality.
    """
    B, H, n, D = q.shape
    nt = -(-n // window)
    n_pad = nt * window
    if n_pad != n:
        assert causal, "non-causal partial groups need a key mask"
        q, k, v = (F.pad(x, (0, 0, 0, n_pad - n)) for x in (q, k, v))
    q4, k4, v4 = (x.reshape(B * H, nt, window, D) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=scale)
    return out.reshape(B, H, n_pad, D)[:, :, :n]


# ----------------------------------------------------------------------------------------------
# The backend's entry point: original order in and out, GQA, padding, sinks, SA + local.
# ----------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    *,
    perm: torch.Tensor | None,
    layout: str,
    causal: bool,
    sinks: int,
    key_mask: torch.Tensor | None,
    scale: float,
    local: int,
) -> torch.Tensor:
    """Windowed attention in original order, O(n * window); inputs validated by the caller.

    q [B, Hq, n, D], k/v [B, Hkv, n, D]; ``perm`` [B|1, H|1, n] (slot -> original position) or
    None (SWA); ``local`` > 0 (causal, with ``perm``) is the SA + local union of
    :mod:`.union`. The rule of :mod:`.patterns`, as in :func:`.reference.attention`: rows the
    window covers (real length <= window) are full attention over their real tokens
    (:mod:`.covered`).
    """
    n = q.shape[2]
    if n == 0:
        return q.new_zeros(q.shape)
    k, v = zero_padding(k, key_mask), zero_padding(v, key_mask)
    if window >= n or local >= n:  # the window covers the sequence: plain full attention
        return full_attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale)
    sinks = min(sinks, n)

    def windowed(rows):
        qr, kr, vr, mask, pr = (take_rows(x, rows) for x in (q, k, v, key_mask, perm))
        if local:
            from .union import union_attention  # late import: the union is built on this module

            return union_attention(qr, kr, vr, window, perm=pr, layout=layout, sinks=sinks,
                                   key_mask=mask, scale=scale, local=local)
        return _windowed(qr, kr, vr, window, perm=pr, layout=layout, causal=causal, sinks=sinks,
                         key_mask=mask, scale=scale)

    return attend_by_coverage(q, k, v, window, key_mask, windowed=windowed, causal=causal,
                              attend=softmax_attend(scale))


def _windowed(q, k, v, window, *, perm, layout, causal, sinks, key_mask, scale):
    """SA (``perm``) or SWA (None) with window < n: move to slot order, attend tiles, move back."""
    from . import flashband  # late import: flashband builds on this module's group sorting

    if flashband.serves(q, k, v, key_mask=key_mask, sinks=sinks, layout=layout, perm=perm):
        return flashband.windowed(q, k, v, window, perm=perm, layout=layout, causal=causal,
                                  scale=scale, sinks=sinks)
    groups = q.shape[1] // k.shape[1]
    sink = SinkParts(k, v, sinks, key_mask, groups)

    if perm is None:  # SWA: slot == position, nothing to move
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        key_valid = key_mask[:, None, :] if key_mask is not None else None
        return windowed_attention(
            q, k, v, window, pos=None, key_valid=key_valid, layout=layout, causal=causal,
            scale=scale, **sink.slot_order(None))

    if layout == "block":
        perm = sort_groups(perm, window)
    inv = inverse_permutation(perm)
    if perm.shape[1] == 1:  # one permutation for all heads: move k, v before expanding them
        ks, vs = permute_seq(k, perm, inv), permute_seq(v, perm, inv)
        ks, vs = repeat_kv(ks, groups), repeat_kv(vs, groups)
    else:
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        ks, vs = permute_seq(k, perm, inv), permute_seq(v, perm, inv)
    qs = permute_seq(q, perm, inv)

    n = q.shape[2]
    if (layout == "block" and sinks == 0 and key_mask is None
            and (causal or n % window == 0) and keys_finite(ks)):
        out = dense_tiles(qs, ks, vs, window, scale, causal)
    else:
        key_valid = gather_mask(key_mask, perm) if key_mask is not None else None
        out = windowed_attention(
            qs, ks, vs, window, pos=perm, key_valid=key_valid, layout=layout, causal=causal,
            scale=scale, **sink.slot_order(perm))
    return permute_seq(out, inv, perm)


class SinkParts:
    """The sink keys of each row (its first real tokens) and which keys are sinks."""

    def __init__(self, k, v, sinks, key_mask, groups):
        self.sinks = sinks
        if sinks == 0:
            return
        B, Hkv, n, D = k.shape
        pos, valid, self.is_sink = sink_keys(key_mask, sinks, n, k.device)
        index = pos[:, None, :, None].expand(B, Hkv, pos.shape[-1], D)
        self.k, self.v = torch.gather(k, 2, index), torch.gather(v, 2, index)
        self.k, self.v = repeat_kv(self.k, groups), repeat_kv(self.v, groups)
        self.pos = pos[:, None, :]  # [B|1, 1, S]
        self.valid = None if valid is None else valid[:, None, :]

    def slot_order(self, perm) -> dict:
        """Keyword arguments of :func:`windowed_attention` for keys in slot order."""
        if self.sinks == 0:
            return dict(sinks=0, sink_k=None, sink_v=None, sink_valid=None)
        is_sink = (self.is_sink[:, None, :] if perm is None
                   else gather_mask(self.is_sink, perm))
        return dict(sinks=self.sinks, sink_k=self.k, sink_v=self.v, sink_valid=self.valid,
                    sink_pos=self.pos, key_is_sink=is_sink)

    def flags_only(self) -> dict:
        """:meth:`slot_order` in original order without the sink keys: the window keys that are
        sinks are dropped, and no sink key is added (another part of a merge serves them)."""
        kw = self.slot_order(None)
        kw.update(sink_k=None, sink_v=None, sink_valid=None, sink_pos=None)
        return kw
