"""The blocked backend: windowed attention in O(n * window) time and memory, pure PyTorch.

Works in SLOT space (tokens already gathered into permuted order; for SWA slot == position).
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

from .patterns import band_extent, in_window

# Query tile for the band layout: each tile of T queries reads T + window - 1 keys, so a small T
# wastes less work but makes smaller matmuls. 128 was the best on a 2-core CPU at window 256.
BAND_TILE = 128


def _tiles(x: torch.Tensor, size: int, step: int, pad_left: int, pad_right: int) -> torch.Tensor:
    """[..., n, D] -> [..., n_tiles, size, D]: overlapping windows along the sequence (a view)."""
    x = F.pad(x, (0, 0, pad_left, pad_right))
    return x.unfold(-2, size, step).transpose(-1, -2)


def _tiles1d(x: torch.Tensor, size: int, step: int, pad_left: int, pad_right: int, value) -> torch.Tensor:
    """[..., n] -> [..., n_tiles, size] for index / mask tensors."""
    x = F.pad(x, (pad_left, pad_right), value=value)
    return x.unfold(-1, size, step)


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
        return cls(n, min(BAND_TILE, n), left, right, layout)

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
        return _tiles(x, self.L, self.T, self.left, self.right + self.pad)

    def query_index(self, x: torch.Tensor, fill) -> torch.Tensor:
        """[..., n] -> [..., nt, T, 1] for per-slot values (positions, masks)."""
        return F.pad(x, (0, self.pad), value=fill).view(*x.shape[:-1], self.nt, self.T, 1)

    def key_index(self, x: torch.Tensor, fill) -> torch.Tensor:
        """[..., n] -> [..., nt, 1, L] for per-slot values (positions, masks)."""
        if self.layout == "block":
            return self.query_index(x, fill).transpose(-1, -2)
        return _tiles1d(x, self.L, self.T, self.left, self.right + self.pad, fill).unsqueeze(-2)

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, nt, T, D] -> [B, H, n, D]."""
        B, H = out.shape[:2]
        return out.reshape(B, H, self.nt * self.T, out.shape[-1])[:, :, : self.n]


def all_finite(x: torch.Tensor) -> bool:
    """Are all entries finite? SDPA adds its mask to the scores, and NaN + -inf is NaN, so a
    non-finite key would reach the queries that do not see it: callers then take an explicit
    path that selects (:func:`attend_with_lse`).

    Read through the sum, one pass without a temporary (a quarter of the time of
    ``isfinite(x).all()``): a non-finite entry always makes the sum non-finite. Finite entries
    whose sum overflows also answer False, which only sends them down the exact selecting path.
    """
    return bool(torch.isfinite(x.sum(dtype=compute_dtype(x))))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs are computed in float64 (gradcheck), everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _attend(q, k, v, bias, scale, guard_empty_rows: bool):
    """One batched SDPA over tiles. q [B,H,nt,T,D]; k,v [B,H,nt,L,D]; bias [Bm,Hm,nt,T,L] (0 / -inf)."""
    B, H, nt, T, D = q.shape
    L = k.shape[-2]
    q4, k4, v4 = (x.reshape(B * H, nt, x.shape[-2], D) for x in (q, k, v))
    if bias.shape[0] == 1 and bias.shape[1] == 1:
        bias4 = bias.reshape(1, nt, T, L)
    else:
        bias4 = bias.expand(B, H, nt, T, L).reshape(B * H, nt, T, L)
    has_key = None
    if guard_empty_rows:
        # Rows with no visible key must give 0 without NaN in either pass: let them see every key,
        # then zero them (their gradient is then zero too).
        has_key = (bias4 > float("-inf")).any(dim=-1, keepdim=True)
        bias4 = bias4.masked_fill(~has_key, 0.0)
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=bias4, scale=scale)
    if has_key is not None:
        out = out * has_key
    return out.view(B, H, nt, T, D)


def attend_with_lse(q, k, v, bias, scale, select: bool = True):
    """Like :func:`_attend`, computed explicitly so it also returns the log-sum-exp of each row.

    Any leading dims: q [..., T, D], k/v [..., L, D], bias broadcastable to [..., T, L].
    Returns out [..., T, D] and lse [..., T] in fp32, fp64 for fp64 inputs (lse = -inf and out = 0
    for a row with no visible key, with zero gradients there), for :func:`merge_parts`. Hidden
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


def merge_parts(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                lse_b: torch.Tensor) -> torch.Tensor:
    """One softmax over two DISJOINT key sets from the two partial results (log-sum-exp merge).

    out_* [..., n, D] are each part's normalised output, lse_* [..., n] its log-sum-exp (-inf when
    the part has no key). A row with no key in either part gives 0. Differentiable.
    """
    m = torch.maximum(lse_a, lse_b).detach()  # any shift gives the same result; this one is safe
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = w_a + w_b
    total = torch.where(total > 0, total, torch.ones_like(total))
    return (out_a * (w_a / total).unsqueeze(-1) + out_b * (w_b / total).unsqueeze(-1))


@functools.lru_cache(maxsize=32)
def static_tiles(plan: TilePlan, window: int, causal: bool, device: torch.device):
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
):
    """Attention of each slot to the keys of its window (and the sinks), in slot space.

    q, k, v: [B, H, n, D] in slot order (k, v already expanded to H heads).
    pos: [B|1, H|1, n] original position of each slot, or None when slot == position (SWA).
    key_valid: [B, 1|H, n] bool in slot order, or None. For ``block`` the caller sorts every
    group of ``window`` slots by position (see :func:`sort_groups`).
    sink_k, sink_v: [B, H, S, D] the sink keys/values, at original positions ``sink_pos``
    [B|1, 1, S] (default 0..S-1); sink_valid [B, 1, S]. ``key_is_sink`` [B|1, 1|H, n] (slot order)
    marks the window keys that are sinks, which are left to the sink keys (default: positions
    below ``sinks``).
    window < n is assumed (the dispatcher sends window >= n to full attention).
    exclude_recent (causal, with ``pos``): window keys among the query's last ``exclude_recent``
    positions are left out; the SA + local union serves them in a second, local pass.
    return_lse: also return the log-sum-exp of each row, [B, H, n] fp32 (see :func:`merge_parts`).
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
    query_slot, key_slot, static = static_tiles(plan, window, causal, device)

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
    finite = all_finite(k)  # the sink keys are keys too
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
