"""The attention function transformers calls in every layer of a patched model.

Contract (transformers' ``AttentionInterface``): ``fn(module, query, key, value, attention_mask,
scaling=None, dropout=0.0, **kwargs) -> (out [B, L, Hq, D], None)`` with query [B, Hq, L, D],
key/value [B, Hkv, S, D] (grouped-query heads not repeated, RoPE already applied). The mask we
receive is the one :func:`padding_mask` below built: bool [B, S], True for real tokens, or None.

A thin translation layer: the patch settings pick an operator of :mod:`stochastic_attention.ops`
(the algorithms, with their references and tests, live there). Prefill (L == S) runs the
configured method. With a KV cache (L < S) queries sit at the last L positions:
``decode="full"`` attends to the whole cache, ``decode="stochastic"`` to the sinks, a local
window and a fresh random sample of ``window`` cached keys, gathered so that a generated token
costs O(sinks + local + window) whatever the cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..functional import sliding_window_attention
from ..ops.compose import ensemble_attention, head_split_attention
from ..ops.decode import cached_attention, sparse_decode
from ..ops.moba import moba_attention
from ..ops.permute import gather_seq, real_tokens_first
from .config import PatchConfig


def _generator(seed: int, layer_idx: int, step: int, device: torch.device) -> torch.Generator:
    # Fixed per (seed, layer, cache length): reruns give the same output, layers differ.
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + layer_idx) * 1_000_003 + step)
    return g


def _prefill(cfg: PatchConfig, layer_idx: int, q, k, v, kpm, scale, own_window):
    """Self-attention over the whole sequence; kpm is right-padded (real tokens first) or None."""
    n = q.shape[2]
    if not cfg.applies_to(layer_idx) or cfg.method == "full":
        # The layer keeps the model's own attention: full, or its configured sliding window.
        return sliding_window_attention(q, k, v, own_window or max(n, 1), key_mask=kpm,
                                        scale=scale)
    if cfg.method == "sliding_window":
        return sliding_window_attention(q, k, v, cfg.window, sinks=cfg.sinks,
                                        key_mask=kpm, scale=scale)
    if cfg.method == "moba":
        return moba_attention(q, k, v, cfg.block_size, cfg.top_k, sinks=cfg.sinks,
                              key_mask=kpm, scale=scale)
    # Head split: the first head_split query heads use SA, the others SWA at the same window.
    split = q.shape[1] if cfg.head_split is None else cfg.head_split
    return head_split_attention(
        q, k, v, split,
        first=lambda q, k, v: _stochastic(cfg, layer_idx, q, k, v, kpm, scale),
        rest=lambda q, k, v: sliding_window_attention(q, k, v, cfg.window, sinks=cfg.sinks,
                                                      key_mask=kpm, scale=scale))


def _stochastic(cfg: PatchConfig, layer_idx: int, q, k, v, kpm, scale):
    """SA (with the local union when ``cfg.local``); with ``cfg.ensemble = K`` the mean of K
    outputs under K independent permutations (K times the attention work)."""
    return ensemble_attention(q, k, v, cfg.window, members=cfg.ensemble,
                              generator=_generator(cfg.seed, layer_idx, 0, torch.device("cpu")),
                              layout=cfg.layout, sinks=cfg.sinks, local=cfg.local, key_mask=kpm,
                              scale=scale)


def _with_cache(cfg: PatchConfig, layer_idx: int, q, k, v, valid, scale, own_window):
    """Queries at the last L of S cached positions; valid [B, S] bool or None (no padding).

    ``decode="stochastic"``: sinks + last ``max(local, 1)`` tokens + ``window`` random earlier
    keys, gathered (:func:`~stochastic_attention.ops.decode.sparse_decode`); each row draws
    from a generator seeded by (seed, layer, its real tokens). Otherwise the whole cache, or the
    model's own sliding window where the layer keeps its attention.
    """
    if cfg.decode == "stochastic" and cfg.applies_to(layer_idx):
        return sparse_decode(q, k, v, valid, window=cfg.window, sinks=cfg.sinks,
                             local=max(cfg.local, 1), seed=cfg.seed, layer_idx=layer_idx,
                             scale=scale)
    keeps_own = own_window and not (cfg.applies_to(layer_idx) and cfg.method != "full")
    return cached_attention(q, k, v, own_window if keeps_own else k.shape[2], 0, valid, scale)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      *, method: str, **kwargs):
    """Registered with transformers under each method name (``method`` is bound per name)."""
    cfg = PatchConfig.from_model_config(module.config)
    if cfg.method != method:  # the active implementation name wins (set_attn_implementation)
        cfg = PatchConfig.from_dict({**cfg.to_dict(), "method": method,
                                     "decode": cfg.decode if method == "stochastic" else "full"})
    layer_idx = getattr(module, "layer_idx", 0) or 0
    own_window = kwargs.get("sliding_window")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    L, S = query.shape[2], key.shape[2]
    valid = attention_mask
    if valid is not None and (valid.dim() != 2 or valid.dtype != torch.bool):
        raise TypeError("the stochastic attention functions expect the [batch, kv_len] bool mask "
                        "from their own AttentionMaskInterface entry; register both with "
                        "stochastic_attention.hf.register()")
    if L < S:
        out = _with_cache(cfg, layer_idx, query, key, value, valid, scale, own_window)
    elif valid is None or bool(valid.all()):
        out = _prefill(cfg, layer_idx, query, key, value, None, scale, own_window)
    else:
        # Move real tokens to the front (stable), so sinks, blocks and windows see each sequence
        # as if it were alone; padding then trails every real query and is masked as a key.
        order, inverse, kpm = real_tokens_first(valid)
        q, k, v = (gather_seq(x, order) for x in (query, key, value))
        out = _prefill(cfg, layer_idx, q, k, v, kpm, scale, own_window)
        out = gather_seq(out, inverse)
    return out.transpose(1, 2).contiguous(), None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function=None, attention_mask=None, **kwargs):
    """Registered with ``AttentionMaskInterface``: hand the attention the padding, nothing else.

    Returns bool [B, kv_length] (True = real token) or None when there is no padding; the
    causal / window structure is the attention function's own business.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if mask.shape[-1] < kv_offset + kv_length:
        mask = F.pad(mask, (0, kv_offset + kv_length - mask.shape[-1]))
    mask = mask[:, kv_offset:kv_offset + kv_length]
    return None if bool(mask.all()) else mask
