"""Multi-head self-attention with a choice of method: full, sliding_window, stochastic,
stochastic_local, gated, moba, fractional or bigbird (see :mod:`.options` for each method's
options).

The layer owns the projections, QK-norm, rotary embedding, permutation sampling and the KV
cache; the token mixing itself is one of the package's pure operators. Data flow:

    x -> q, k, v projections -> (QK-norm) -> RoPE at original positions -> cache
      -> operator (stochastic attention permutes internally) -> (gate) -> output projection

Decoding with a cache (any call whose queries follow cached keys) uses full causal attention
over the cache for stochastic attention and the stochastic branch of the gated layer (the paper
decodes SA with full attention); sliding_window and the gated layer's sliding-window branch
keep their window, and moba and fractional run their own operator for the new positions (see
``MultiHeadAttention._attend_cached``); stochastic_local and bigbird decode like stochastic.
With ``decode="stochastic"`` those layers attend instead to the sinks, a local window and a
random sample of cached keys, gathered so that a generated token costs
O(sinks + local + window) whatever the cache length (see :mod:`stochastic_attention.ops.decode`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import BACKENDS, sliding_window_attention, stochastic_attention
from ..ops import bigbird, decode, documents, fractional, moba
from ..ops.decode import cached_attention
from ..ops.permute import routing_permutation
from ..vocabulary import reject_renamed
from .gate import BranchGate
from .options import OPTION_NAMES, MethodOptions, SamplingOptions, method_options
from .rotary import RotaryEmbedding

# The methods that draw a permutation (fractional too, with windows="stochastic").
PERMUTED_METHODS = ("stochastic", "stochastic_local", "gated")


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with a choice of token-mixing method.

    Args:
        hidden_size: model width; num_heads: query heads; num_kv_heads: key/value heads
            (grouped-query attention, default num_heads); head_dim: default hidden / heads.
        method: one of :data:`~stochastic_attention.vocabulary.METHODS`.
        options: the method's options: its options object (e.g.
            :class:`~stochastic_attention.nn.StochasticOptions`) or a dict of its fields
            (e.g. ``{"window": 64, "sinks": 4}``); None for the defaults. See
            :mod:`stochastic_attention.nn.options`.
        qk_norm: RMS-normalise q and k per head before RoPE (``norm_eps``).
        rope_theta: the rotary embedding's base. bias: biases in the projections.
        backend: the operators' backend ("auto", "blocked", "reference", "flex").
        layer_idx: the layer's index (its cache slot; seeds its evaluation draws).

    The random methods draw a fresh permutation (or random keys) from torch's global RNG on
    every training forward pass; in eval mode as their ``eval_perm`` option says (by default
    seeded by ``perm_seed`` and ``layer_idx``, so evaluation is reproducible).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        method: str = "full",
        options: MethodOptions | dict | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        bias: bool = False,
        backend: str = "auto",
        layer_idx: int = 0,
        **moved,
    ) -> None:
        super().__init__()
        if moved:
            _reject_moved(moved)
        # Checked here, not at the first forward pass, so a bad config fails where it is written.
        self.options = method_options(method, options)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads "
                                 f"({num_heads}), or pass head_dim")
            head_dim = hidden_size // num_heads
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.method, self.layer_idx, self.backend = method, layer_idx, backend
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(head_dim, rope_theta)
        o = self.options
        self.gate = (BranchGate(hidden_size, num_heads, head_dim, gate=o.gate,
                                granularity=o.gate_granularity, bias=o.gate_bias)
                     if method == "gated" else None)

    @property
    def uses_permutation(self) -> bool:
        return self.method in PERMUTED_METHODS or (
            self.method == "fractional" and self.options.windows == "stochastic")

    def draw_permutation(self, batch: int, seq_len: int, device=None,
                         key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The permutation a forward pass would use: [batch or 1, heads or 1, seq_len].

        Drawn over each row's real tokens (``key_mask`` True), which fill the first
        slots (see :func:`~stochastic_attention.ops.permute.routing_permutation`). In seeded
        eval mode every row draws from the same per-layer seed, so a sequence gets the same
        routing, and output, alone or padded in any batch.
        """
        if not isinstance(self.options, SamplingOptions):
            raise ValueError(f"method {self.method!r} draws no permutation")
        heads = self.num_heads if self.options.perm_per_head else 1
        return routing_permutation(batch, heads, seq_len, key_mask=key_mask,
                                   generator=self._generator(), device=device)

    def _generator(self) -> torch.Generator | None:
        """None (global RNG) in training; in eval mode a generator seeded per layer if asked."""
        if not self.training and self.options.eval_perm == "seeded":
            # Seeded per layer so that layers still use independent draws.
            return torch.Generator().manual_seed(self.options.perm_seed * 1_000_003
                                                 + self.layer_idx)
        return None

    def draw_random_keys(self, batch: int, seq_len: int, device=None,
                         key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """BigBird's random earlier keys a forward pass would use: [batch, heads or 1, n, r],
        drawn over each row's real tokens (see :func:`~stochastic_attention.ops.bigbird.
        bigbird_indices`)."""
        o = self.options
        heads = self.num_heads if o.perm_per_head else 1
        return bigbird.bigbird_indices(batch, heads, seq_len, o.window, o.random_keys,
                                       sinks=o.sinks, generator=self._generator(),
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
        perm: the permutation to use instead of drawing one ([L], [B, L] or [B, H, L]).
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
        n, method, o = q.shape[2], self.method, self.options
        common = dict(key_mask=key_mask, backend=self.backend)
        if method == "full":
            return sliding_window_attention(q, k, v, max(n, 1), **common)
        if method == "sliding_window":
            return sliding_window_attention(q, k, v, o.window, sinks=o.sinks, **common)
        if self.uses_permutation and perm is None:
            perm = self.draw_permutation(q.shape[0], n, q.device, key_mask)
        if method in ("stochastic", "gated"):
            out = stochastic_attention(q, k, v, o.window, perm=perm, layout=o.layout,
                                       sinks=o.sinks, **common)
            if method == "stochastic":
                return out
            sliding = sliding_window_attention(q, k, v, o.sliding_window, sinks=o.sinks,
                                               **common)
            return self.gate(x, out, sliding)
        if method == "stochastic_local":
            # The union runs on the blocked (or reference) backend only: a model-wide "flex"
            # backend falls back to "blocked" for these layers instead of failing.
            backend = "blocked" if self.backend == "flex" else self.backend
            return stochastic_attention(q, k, v, o.window, perm=perm, layout=o.layout,
                                        sinks=o.sinks, local=o.local,
                                        key_mask=key_mask, backend=backend)
        if method == "bigbird":
            indices = self.draw_random_keys(q.shape[0], n, q.device, key_mask)
            return bigbird.bigbird_attention(q, k, v, o.window, o.random_keys,
                                             sinks=o.sinks, key_mask=key_mask,
                                             indices=indices)
        if method == "moba":
            return moba.moba_attention(q, k, v, o.block_size, o.top_k, sinks=o.sinks,
                                       key_mask=key_mask)
        return fractional.fractional_attention(
            q, k, v, o.alpha, eps=o.eps, causal=True, key_mask=key_mask, window=o.window,
            perm=perm if o.windows == "stochastic" else None, layout=o.layout)

    def _attend_cached(self, x, q, k, v, key_mask):
        """New queries at the last L of S cached positions.

        stochastic (and the stochastic branch of the gated layer) decodes with full causal
        attention over the cache, the protocol of the paper; sliding_window keeps its window.
        moba and fractional run their own operator for the new rows, so cached decoding
        computes what a forward pass over the whole sequence computes at those positions
        (fractional in stochastic windows drops the windows at decode, as stochastic attention
        does). With ``decode="stochastic"`` the stochastic methods attend to gathered sinks,
        recent and sampled keys instead, and the gated layer's sliding-window branch to its
        gathered band and sinks: O(window) per generated token.
        """
        method, o = self.method, self.options
        if method == "sliding_window":
            return cached_attention(q, k, v, o.window, o.sinks, key_mask)
        if method in ("moba", "fractional"):
            return self._operator_rows(q, k, v, key_mask)
        sparse = getattr(o, "decode", "full") == "stochastic"
        if sparse:
            full = self._sparse_decode(q, k, v, key_mask)
        else:
            full = cached_attention(q, k, v, k.shape[2], 0, key_mask)
        if method != "gated":
            return full
        if sparse:
            # the same keys as cached_attention's band + sinks, gathered: the whole layer then
            # decodes in O(window) per token
            sliding = decode.sparse_decode(q, k, v, key_mask, window=0, sinks=o.sinks,
                                           local=o.sliding_window)
        else:
            sliding = cached_attention(q, k, v, o.sliding_window, o.sinks, key_mask)
        return self.gate(x, full, sliding)

    def _sparse_decode(self, q, k, v, key_mask):
        """decode="stochastic": sinks, recent and random cached keys, gathered (O(window))."""
        o = self.options
        if self.method == "bigbird":
            window, local = o.random_keys, o.window
        else:
            window, local = o.window, max(getattr(o, "local", 0), 1)
        seeded = not self.training and o.eval_perm == "seeded"
        return decode.sparse_decode(q, k, v, key_mask, window=window, sinks=o.sinks,
                                    local=local, seed=o.perm_seed if seeded else None,
                                    layer_idx=self.layer_idx)

    def _operator_rows(self, q, k, v, key_mask):
        """moba / fractional outputs of the last L positions of the cached sequence.

        Both operators are causal and row-wise (a row depends on its own query and on the keys
        and values), so the rows before the new queries get zero queries and are discarded.
        This costs one operator call over the whole cache per step: exact, not fast.
        """
        B, H, L, D = q.shape
        S = k.shape[2]
        o = self.options
        q_all = torch.cat([q.new_zeros(B, H, S - L, D), q], dim=2)
        if self.method == "moba":
            out = moba.moba_attention(q_all, k, v, o.block_size, o.top_k, sinks=o.sinks,
                                      key_mask=key_mask)
        else:
            out = fractional.fractional_attention(
                q_all, k, v, o.alpha, eps=o.eps, causal=True, key_mask=key_mask,
                window=None if o.windows == "stochastic" else o.window, layout=o.layout)
        return out[:, :, S - L:]


def _reject_moved(moved: dict) -> None:
    """Keywords the layer no longer takes: renamed ones (``kind``) and method options, which
    now go in ``options``."""
    reject_renamed(moved, "MultiHeadAttention()", error=TypeError)
    name = sorted(moved)[0]
    if name in OPTION_NAMES:
        raise TypeError(f"MultiHeadAttention(): {name!r} is an option of the method: pass it "
                        f"in options, e.g. options={{{name!r}: {moved[name]!r}}}")
    raise TypeError(f"MultiHeadAttention() got unexpected keyword arguments {sorted(moved)}")
