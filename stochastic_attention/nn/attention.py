"""Multi-head self-attention: full, SWA, SA, SA + local, gated SA + SWA, MoBA, FNA or BigBird.

The layer owns the projections, QK-norm, rotary embedding, permutation sampling and the KV
cache; the token mixing itself is one of the package's pure operators. Data flow:

    x -> q, k, v projections -> (QK-norm) -> RoPE at original positions -> cache
      -> operator (SA permutes internally) -> (gate) -> output projection

Decoding with a cache (any call whose queries follow cached keys) uses full causal attention
over the cache for SA and the SA branch of the gated layer (the paper decodes SA with full
attention); SWA and the gated layer's SWA branch keep their window, and MoBA and FNA run their
own operator for the new positions (see ``MultiHeadAttention._attend_cached``); SA + local and
BigBird decode like SA. With ``decode="stochastic"`` those layers attend instead to the sinks,
a local window and a random sample of cached keys, gathered so that a generated token costs
O(sinks + local + window) whatever the cache length (see :mod:`stochastic_attention.ops.decode`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import BACKENDS, sliding_window_attention, stochastic_attention
from ..ops import bigbird, decode, documents, fractional, moba
from ..ops.decode import cached_attention
from ..ops.permute import routing_permutation
from ..ops.validate import check_layout, check_sinks
from .gate import BranchGate
from .rotary import RotaryEmbedding

KINDS = ("full", "swa", "sa", "gated", "moba", "fna", "sa_local", "bigbird")
EVAL_PERMS = ("seeded", "random")
DECODES = ("full", "stochastic")
# kinds whose cached decoding uses full attention by default, and may sample keys instead
SPARSE_DECODE_KINDS = ("sa", "gated", "sa_local", "bigbird")


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with a choice of token-mixing operator.

    Args:
        hidden_size: model width; num_heads: query heads; num_kv_heads: key/value heads
            (grouped-query attention, default num_heads); head_dim: default hidden / heads.
        kind: "full", "swa", "sa", "gated" (SA + SWA fused by gates), "moba", "fna",
            "sa_local" (SA whose windows also hold the last ``local`` positions, one softmax) or
            "bigbird" (a causal window of ``swa_window``, the sinks and ``random_keys`` random
            earlier keys per query; see :mod:`stochastic_attention.ops.bigbird`).
        window: keys per query for SWA and SA (itself included); ``sa_window`` and
            ``swa_window`` override it per branch of the gated layer.
        sinks, layout, backend: passed to the operators (see :mod:`stochastic_attention`).
        qk_norm: RMS-normalise q and k per head before RoPE.
        perm_per_head: independent permutations per head instead of one per sample.
        eval_perm: "seeded" (eval mode draws from a generator seeded by perm_seed and
            layer_idx, so evaluation is reproducible) or "random". Training mode always draws
            a fresh permutation from torch's global RNG on every forward pass.
        gate, gate_granularity, gate_bias: the gated layer's fusion (see :class:`BranchGate`).
        moba_block_size, moba_topk: MoBA's block size and selected blocks per query.
        fna_alpha, fna_eps, fna_window: fractional attention's parameters; ``fna_stochastic``
            runs it inside SA windows (a permutation drawn as for SA; needs fna_window).
        local: recent positions added to every query's SA window (kind "sa_local" only, >= 1).
        random_keys: random earlier keys per query (kind "bigbird" only). They are drawn per
            sample and shared by the heads (per head with ``perm_per_head``), afresh on every
            training forward pass and, in eval mode, as ``eval_perm`` says (like permutations).
        decode: how cached decoding attends in the SA kinds ("sa", "gated", "sa_local",
            "bigbird"): "full" (the whole cache, the paper's protocol) or "stochastic" (the sinks,
            the last ``max(local, 1)`` tokens and ``sa_window`` random earlier tokens; for
            BigBird its window of ``swa_window`` and ``random_keys`` random earlier tokens). The
            random keys are drawn per row and query head, in eval mode as ``eval_perm`` says
            (seeded by perm_seed, layer and the row's real tokens), else from the global RNG.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kind: str = "full",
        window: int = 64,
        sa_window: int | None = None,
        swa_window: int | None = None,
        sinks: int = 0,
        layout: str = "band",
        backend: str = "auto",
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        bias: bool = False,
        perm_per_head: bool = False,
        eval_perm: str = "seeded",
        perm_seed: int = 0,
        layer_idx: int = 0,
        gate: str = "sigmoid",
        gate_granularity: str = "head",
        gate_bias: float | tuple[float, float] = 0.0,
        moba_block_size: int = 64,
        moba_topk: int = 2,
        fna_alpha: float = 0.5,
        fna_eps: float = 1.0,
        fna_window: int | None = None,
        fna_stochastic: bool = False,
        local: int = 0,
        random_keys: int = 0,
        decode: str = "full",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if eval_perm not in EVAL_PERMS:
            raise ValueError(f"eval_perm must be one of {EVAL_PERMS}, got {eval_perm!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads "
                                 f"({num_heads}), or pass head_dim")
            head_dim = hidden_size // num_heads
        for name, value in (("window", window), ("sa_window", sa_window),
                            ("swa_window", swa_window)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        # Checked here, not at the first forward pass, so a bad config fails where it is written.
        check_layout(layout)
        check_sinks(sinks)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.kind, self.layer_idx = kind, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sa_window = sa_window or window
        self.swa_window = swa_window or window
        self.sinks, self.layout, self.backend = sinks, layout, backend
        self.perm_per_head, self.eval_perm, self.perm_seed = perm_per_head, eval_perm, perm_seed
        self.moba = (moba_block_size, moba_topk)
        if fna_stochastic and fna_window is None:
            raise ValueError("fna_stochastic=True needs fna_window (the SA window size)")
        self.fna = (fna_alpha, fna_eps, fna_window)
        self.fna_stochastic = fna_stochastic
        self.local, self.random_keys = _check_kind_options(kind, local, random_keys)
        self.decode = _check_decode(kind, decode)

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(head_dim, rope_theta)
        self.gate = (BranchGate(hidden_size, num_heads, head_dim, kind=gate,
                                granularity=gate_granularity, bias=gate_bias)
                     if kind == "gated" else None)

    @property
    def uses_permutation(self) -> bool:
        return self.kind in ("sa", "gated", "sa_local") or (self.kind == "fna" and self.fna_stochastic)

    def draw_permutation(self, batch: int, seq_len: int, device=None,
                         key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The permutation a forward pass would use: [batch or 1, heads or 1, seq_len].

        Drawn over each row's real tokens (``key_mask`` True), which fill the first
        slots (see :func:`~stochastic_attention.ops.permute.routing_permutation`). In seeded
        eval mode every row draws from the same per-layer seed, so a sequence gets the same
        routing, and output, alone or padded in any batch.
        """
        heads = self.num_heads if self.perm_per_head else 1
        return routing_permutation(batch, heads, seq_len, key_mask=key_mask,
                                   generator=self._generator(), device=device)

    def _generator(self) -> torch.Generator | None:
        """None (global RNG) in training; in eval mode a generator seeded per layer if asked."""
        if not self.training and self.eval_perm == "seeded":
            # Seeded per layer so that layers still use independent draws.
            return torch.Generator().manual_seed(self.perm_seed * 1_000_003 + self.layer_idx)
        return None

    def draw_random_keys(self, batch: int, seq_len: int, device=None,
                         key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """BigBird's random earlier keys a forward pass would use: [batch, heads or 1, n, r],
        drawn over each row's real tokens (see :func:`~stochastic_attention.ops.bigbird.
        bigbird_indices`)."""
        heads = self.num_heads if self.perm_per_head else 1
        return bigbird.bigbird_indices(batch, heads, seq_len, self.swa_window, self.random_keys,
                                       sinks=self.sinks, generator=self._generator(),
                                       device=device, key_mask=key_mask)

    def forward(
        self,
        x: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        perm: torch.Tensor | None = None,
        document_ids: torch.Tensor | documents.DocumentPlan | None = None,
    ) -> torch.Tensor:
        """x [B, L, hidden] -> [B, L, hidden].

        position_ids: [B|1, L] original positions (default: continue after the cache).
        attention_mask: [B, cached + L], 1/True for real tokens (padding is never attended).
        cache: a :class:`KVCache` or Hugging Face ``Cache``; updated in place.
        perm: the SA permutation to use instead of drawing one ([L], [B, L] or [B, H, L]).
        document_ids: packed documents, int [B, L] (equal ids = one contiguous document) or a
            :class:`~stochastic_attention.ops.documents.DocumentPlan` built from them: each
            document gives what it gives alone (RoPE restarts per document unless
            ``position_ids`` are given; permutations and random keys are drawn per document;
            a ``perm`` must permute each document within itself). No KV cache.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [batch, seq, hidden] (3 dims), got {shape}; "
                             "add a batch dimension with x.unsqueeze(0)")
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        plan = None
        if document_ids is not None:
            plan = documents.layer_plan(document_ids, B, L, x.device, cache)
            if position_ids is None:
                position_ids = plan.positions(None if attention_mask is None
                                              else attention_mask.bool())
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=x.device)[None]
        q, k = self.rotary(q, k, position_ids)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, k.shape[2]):
                raise ValueError(f"attention_mask must be [batch, cached + new] = "
                                 f"{[B, k.shape[2]]}, got {list(attention_mask.shape)}")
            key_mask = attention_mask.bool()
            if bool(key_mask.all()):
                key_mask = None  # the operators' fast paths need no mask
        if plan is not None:  # each document in a padded row of its own, then packed back
            out = documents.run_documents(
                plan, lambda *t, key_mask, perm: self._attend(*t, key_mask, perm),
                [(x, 1), (q, 2), (k, 2), (v, 2)], key_mask=key_mask, perm=perm,
                heads=self.num_heads)
        elif k.shape[2] > L:
            out = self._attend_cached(x, q, k, v, key_mask)
        else:
            out = self._attend(x, q, k, v, key_mask, perm)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))

    def _attend(self, x, q, k, v, key_mask, perm):
        """Attention over a whole sequence (training, scoring, prefill)."""
        n = q.shape[2]
        common = dict(key_mask=key_mask, backend=self.backend)
        if self.kind == "full":
            return sliding_window_attention(q, k, v, max(n, 1), **common)
        if self.kind == "swa":
            return sliding_window_attention(q, k, v, self.swa_window, sinks=self.sinks, **common)
        if self.uses_permutation and perm is None:
            perm = self.draw_permutation(q.shape[0], n, q.device, key_mask)
        if self.kind in ("sa", "gated"):
            sa = stochastic_attention(q, k, v, self.sa_window, perm=perm, layout=self.layout,
                                      sinks=self.sinks, **common)
            if self.kind == "sa":
                return sa
            swa = sliding_window_attention(q, k, v, self.swa_window, sinks=self.sinks, **common)
            return self.gate(x, sa, swa)
        if self.kind == "sa_local":
            # The union runs on the blocked (or reference) backend only: a model-wide "flex"
            # backend falls back to "blocked" for these layers instead of failing.
            backend = "blocked" if self.backend == "flex" else self.backend
            return stochastic_attention(q, k, v, self.sa_window, perm=perm, layout=self.layout,
                                        sinks=self.sinks, local=self.local,
                                        key_mask=key_mask, backend=backend)
        if self.kind == "bigbird":
            indices = self.draw_random_keys(q.shape[0], n, q.device, key_mask)
            return bigbird.bigbird_attention(q, k, v, self.swa_window, self.random_keys,
                                             sinks=self.sinks, key_mask=key_mask,
                                             indices=indices)
        if self.kind == "moba":
            block_size, topk = self.moba
            return moba.moba_attention(q, k, v, block_size, topk, sinks=self.sinks,
                                       key_mask=key_mask)
        alpha, eps, window = self.fna
        return fractional.fractional_attention(
            q, k, v, alpha, eps=eps, causal=True, key_mask=key_mask,
            window=window, perm=perm if self.fna_stochastic else None, layout=self.layout)

    def _attend_cached(self, x, q, k, v, key_mask):
        """New queries at the last L of S cached positions.

        SA (and the SA branch of the gated layer) decodes with full causal attention over the
        cache, the protocol of the paper; SWA keeps its window. MoBA and FNA run their own
        operator for the new rows, so cached decoding computes what a forward pass over the
        whole sequence computes at those positions (FNA inside SA windows drops the windows at
        decode, as SA does). With ``decode="stochastic"`` SA (and the SA-like kinds) attend to
        gathered sinks, recent and sampled keys instead, and the gated layer's SWA branch to its
        gathered band and sinks: O(window) per generated token.
        """
        if self.kind == "swa":
            return cached_attention(q, k, v, self.swa_window, self.sinks, key_mask)
        if self.kind in ("moba", "fna"):
            return self._operator_rows(q, k, v, key_mask)
        if self.decode == "stochastic":
            full = self._sparse_decode(q, k, v, key_mask)
        else:
            full = cached_attention(q, k, v, k.shape[2], 0, key_mask)
        if self.kind != "gated":
            return full
        if self.decode == "stochastic":
            # the same keys as cached_attention's band + sinks, gathered: the whole layer then
            # decodes in O(window) per token
            swa = decode.sparse_decode(q, k, v, key_mask, window=0, sinks=self.sinks,
                                       local=self.swa_window)
        else:
            swa = cached_attention(q, k, v, self.swa_window, self.sinks, key_mask)
        return self.gate(x, full, swa)

    def _sparse_decode(self, q, k, v, key_mask):
        """decode="stochastic": sinks, recent and random cached keys, gathered (O(window))."""
        if self.kind == "bigbird":
            window, local = self.random_keys, self.swa_window
        else:
            window, local = self.sa_window, max(self.local, 1)
        seeded = not self.training and self.eval_perm == "seeded"
        return decode.sparse_decode(q, k, v, key_mask, window=window, sinks=self.sinks,
                                    local=local, seed=self.perm_seed if seeded else None,
                                    layer_idx=self.layer_idx)

    def _operator_rows(self, q, k, v, key_mask):
        """MoBA / FNA outputs of the last L positions of the cached sequence.

        Both operators are causal and row-wise (a row depends on its own query and on the keys
        and values), so the rows before the new queries get zero queries and are discarded.
        This costs one operator call over the whole cache per step: exact, not fast.
        """
        B, H, L, D = q.shape
        S = k.shape[2]
        q_all = torch.cat([q.new_zeros(B, H, S - L, D), q], dim=2)
        if self.kind == "moba":
            block_size, topk = self.moba
            out = moba.moba_attention(q_all, k, v, block_size, topk, sinks=self.sinks,
                                      key_mask=key_mask)
        else:
            alpha, eps, window = self.fna
            out = fractional.fractional_attention(
                q_all, k, v, alpha, eps=eps, causal=True, key_mask=key_mask,
                window=None if self.fna_stochastic else window, layout=self.layout)
        return out[:, :, S - L:]


def _check_decode(kind: str, decode: str) -> str:
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode == "stochastic" and kind not in SPARSE_DECODE_KINDS:
        raise ValueError(f"decode='stochastic' samples keys for the kinds {SPARSE_DECODE_KINDS}, "
                         f"not {kind!r}; use decode='full'")
    return decode


def _check_kind_options(kind: str, local: int, random_keys: int) -> tuple[int, int]:
    """``local`` belongs to "sa_local" and ``random_keys`` to "bigbird": refuse them elsewhere."""
    for name, value in (("local", local), ("random_keys", random_keys)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if kind == "sa_local" and local < 1:
        raise ValueError("kind='sa_local' needs local >= 1 (recent positions every query sees); "
                         "use kind='sa' for SA without a local window")
    if local and kind != "sa_local":
        raise ValueError(f"local={local} is only used by kind='sa_local', not {kind!r}; "
                         "set local=0 or use kind='sa_local'")
    if random_keys and kind != "bigbird":
        raise ValueError(f"random_keys={random_keys} is only used by kind='bigbird', not "
                         f"{kind!r}; set random_keys=0 or use kind='bigbird'")
    return local, random_keys
