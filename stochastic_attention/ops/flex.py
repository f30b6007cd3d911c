"""The flex backend: PyTorch FlexAttention with a block mask built directly from the window.

Works in slot space like the blocked backend. The key sequence is ``[sink keys ; slot keys]``,
so a query block needs only the key blocks its windows reach plus the first (sink) block: the
``BlockMask`` is built from those index ranges, never from an n x n tensor. The element mask
(``mask_mod``) is the shared rule of :mod:`.patterns`. GPU: forward and backward, compiled.
CPU: forward only, under ``torch.compile`` (PyTorch has no CPU backward for FlexAttention).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from .covered import attend_by_coverage, softmax_attend, take_rows
from .dense import full_attention, repeat_kv, zero_padding
from .patterns import band_extent, inverse_permutation, sink_keys, visible
from .permute import permute_seq

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

BLOCK = 128
LOCAL_UNSUPPORTED = ("backend='flex' does not serve local > 0; use backend='blocked' (or 'auto', "
                     "which picks it)")


def available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported_reason(device_type: str, needs_grad: bool,
                       flex_available: bool | None = None) -> str | None:
    """Why a call on ``device_type`` cannot run on the flex backend, or None if it can."""
    if not (available() if flex_available is None else flex_available):
        return "torch.nn.attention.flex_attention is not available in this PyTorch"
    if device_type == "cpu" and needs_grad:
        return ("PyTorch has no FlexAttention backward on CPU; use backend='blocked' for training,"
                " or call under torch.no_grad()")
    if device_type not in ("cpu", "cuda", "xpu"):
        return f"FlexAttention does not run on device {device_type!r}"
    return None


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def key_block_ranges(n: int, window: int, layout: str, causal: bool, sinks: int, device) -> torch.Tensor:
    """For each query block: [first, last] key block its windows reach, in the sink-prefixed keys."""
    q_start = torch.arange(0, n, BLOCK, device=device)
    q_end = torch.clamp(q_start + BLOCK - 1, max=n - 1)
    if layout == "block":
        lo = torch.div(q_start, window, rounding_mode="floor") * window
        hi = torch.div(q_end, window, rounding_mode="floor") * window + window - 1
    else:
        left, right = band_extent(window, causal)
        lo, hi = q_start - left, q_end + right
    lo, hi = lo.clamp(min=0) + sinks, hi.clamp(max=n - 1) + sinks
    return torch.stack([torch.div(lo, BLOCK, rounding_mode="floor"),
                        torch.div(hi, BLOCK, rounding_mode="floor")], dim=-1)


def build_block_mask(n, window, layout, causal, sinks, mask_mod, batch, heads, device) -> BlockMask:
    """BlockMask from per-query-block key ranges: a (n/BLOCK)^2 bool table at most, never n x n."""
    from torch.nn.attention.flex_attention import BlockMask

    ranges = key_block_ranges(n, window, layout, causal, sinks, device)  # [QB, 2]
    kv_block = torch.arange(-(-(n + sinks) // BLOCK), device=device)
    need = (kv_block >= ranges[:, :1]) & (kv_block <= ranges[:, 1:])
    if sinks > 0:
        need[:, : (sinks - 1) // BLOCK + 1] = True
    count = need.sum(-1)
    # Indices of the needed blocks first; kv_indices must span every key block (the CPU kernel checks).
    idx = need.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    return BlockMask.from_kv_blocks(
        count.to(torch.int32).expand(batch, heads, -1).contiguous(),
        idx.to(torch.int32).expand(batch, heads, -1, -1).contiguous(),
        BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(n, n + sinks),
    )


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
    """Windowed attention in original order, as :func:`.blocked.attention` (validated inputs).

    ``local`` must be 0: the SA + local union is served by the blocked and reference backends.
    Rows the window covers (real length <= window) are full attention over their real tokens
    (:mod:`.covered`).
    """
    if local:
        raise ValueError(LOCAL_UNSUPPORTED)
    n = q.shape[2]
    if n == 0:
        return q.new_zeros(q.shape)
    if not torch.is_grad_enabled():
        # inputs that require grad make FlexAttention build its backward (none on CPU) even
        # under no_grad; nothing needs their graph here
        q, k, v = q.detach(), k.detach(), v.detach()
    k, v = zero_padding(k, key_mask), zero_padding(v, key_mask)
    if window >= n:  # the window covers the sequence: plain full attention
        return full_attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale)

    def windowed(rows):
        qr, kr, vr, mask, pr = (take_rows(x, rows) for x in (q, k, v, key_mask, perm))
        return _windowed(qr, kr, vr, window, perm=pr, layout=layout, causal=causal, sinks=sinks,
                         key_mask=mask, scale=scale)

    return attend_by_coverage(q, k, v, window, key_mask, windowed=windowed, causal=causal,
                              attend=softmax_attend(scale))


def _windowed(q, k, v, window, *, perm, layout, causal, sinks, key_mask, scale):
    """The FlexAttention call for window < n (padding already zeroed)."""
    B, H, n, D = q.shape
    groups = H // k.shape[1]
    sinks = min(sinks, n)
    if perm is None:
        pos = torch.arange(n, device=q.device).view(1, 1, n)
        qs, ks, vs = q, k, v
    else:
        pos, inv = perm, inverse_permutation(perm)
        qs = permute_seq(q, perm, inv)
        if perm.shape[1] == 1 or groups == 1:
            ks, vs = permute_seq(k, perm, inv), permute_seq(v, perm, inv)
        else:
            ks = permute_seq(repeat_kv(k, groups), perm, inv)
            vs = permute_seq(repeat_kv(v, groups), perm, inv)
    valid = key_mask
    if sinks > 0:
        # The sinks are each row's first real tokens: gather them in front of the slot keys.
        s_pos, s_valid, is_sink = sink_keys(valid, sinks, n, q.device)
        s_pos = s_pos.expand(B, -1)
        index = s_pos[:, None, :, None].expand(B, k.shape[1], sinks, D)
        sk, sv = torch.gather(k, 2, index), torch.gather(v, 2, index)
        if ks.shape[1] != sk.shape[1]:
            sk, sv = repeat_kv(sk, groups), repeat_kv(sv, groups)
        ks, vs = torch.cat([sk, ks], dim=2), torch.cat([sv, vs], dim=2)
        s_valid = torch.ones_like(s_pos, dtype=torch.bool) if s_valid is None else s_valid
        is_sink = is_sink.expand(B, n).contiguous()
    pos = pos.expand(B, H, n).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        is_sink_idx = kv_idx < sinks
        slot_k = (kv_idx - sinks).clamp(min=0)
        pos_q = pos[b, h, q_idx]
        pos_k = pos[b, h, slot_k]
        real = valid[b, pos_k] if valid is not None else True
        if sinks > 0:
            # Window keys that are sinks are dropped here: they come once, through the prefix.
            real = real & ~is_sink[b, pos_k]
        win = visible(q_idx, slot_k, pos_q, pos_k, window=window, layout=layout, causal=causal,
                      sinks=0, seq_len=n, key_valid=(~is_sink_idx) & real)
        if sinks == 0:
            return win
        s_idx = kv_idx.clamp(max=sinks - 1)
        sink = is_sink_idx & s_valid[b, s_idx]
        if causal:
            sink = sink & (s_pos[b, s_idx] <= pos_q)
        return win | sink

    block_mask = build_block_mask(n, window, layout, causal, sinks, mask_mod, B, H, q.device)
    out = _compiled_flex()(qs, ks, vs, block_mask=block_mask, scale=scale,
                           enable_gqa=ks.shape[1] != H)
    if perm is not None:
        out = permute_seq(out, inv, perm)
    return out
