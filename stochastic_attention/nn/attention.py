"""Multi-head self-attention with a choice of method: full, sliding_window, stochastic,
stochastic_local, gated, moba, fractional, bigbird, or any method registered in
:mod:`stochastic_attention.nn.methods` (one module per method: its options, how it attends,
its budget).

The layer owns what every method shares: the projections, QK-norm, rotary embedding,
permutation sampling, masks, packed documents and the KV cache; the token mixing itself is the
method's (a call of one of the package's pure operators). Data flow:

    x -> q, k, v projections -> (QK-norm) -> RoPE at original positions -> cache
      -> method.attend / method.attend_cached (stochastic attention permutes internally)
      -> output projection

Decoding with a cache (any call whose queries follow cached keys) is the method's
``attend_cached``: full causal attention over the cache for stochastic attention and the
stochastic branch of the gated layer (the paper decodes SA with full attention);
sliding_window and the gated layer's sliding-window branch keep their window, and moba and
fractional run their own operator for the new positions; stochastic_local and bigbird decode
like stochastic. With ``decode="stochastic"`` those layers attend instead to the sinks, a local
window and a random sample of cached keys, gathered so that a generated token costs
O(sinks + local + window) whatever the cache length (see :mod:`stochastic_attention.ops.decode`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import BACKENDS
from ..ops import documents
from ..ops.decode import cached_attention
from ..ops.permute import routing_permutation
from ..vocabulary import reject_renamed
from .methods import method_named, option_names
from .options import MethodOptions, SamplingOptions, method_options
from .rotary import RotaryEmbedding

__all__ = ["MultiHeadAttention", "cached_attention"]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with a choice of token-mixing method.

    Args:
        hidden_size: model width; num_heads: query heads; num_kv_heads: key/value heads
            (grouped-query attention, default num_heads); head_dim: default hidden / heads.
        method: one of :data:`~stochastic_attention.vocabulary.METHODS`, or a method
            registered with :func:`stochastic_attention.nn.methods.register`.
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
        self.method_impl = method_named(method)
        self.hidden_size = hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(head_dim, rope_theta)
        self.method_impl.build(self)  # the method's own modules (the gated method's gate)

    @property
    def uses_permutation(self) -> bool:
        return self.method_impl.uses_permutation(self.options)

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
                                   generator=self.sampling_generator(), device=device)

    def sampling_generator(self) -> torch.Generator | None:
        """None (global RNG) in training; in eval mode a generator seeded per layer if asked."""
        if not self.training and self.options.eval_perm == "seeded":
            # Seeded per layer so that layers still use independent draws.
            return torch.Generator().manual_seed(self.options.perm_seed * 1_000_003
                                                 + self.layer_idx)
        return None

    def draw_random_keys(self, batch: int, seq_len: int, device=None,
                         key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The random keys a forward pass of a method that draws them (bigbird) would use:
        [batch, heads or 1, n, r], drawn over each row's real tokens (see
        :func:`~stochastic_attention.ops.bigbird.bigbird_indices`)."""
        return self.method_impl.draw_random_keys(self, batch, seq_len, device, key_mask)

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
            # the operators' fast paths need no mask (compiled graphs keep it: no value branch)
            if not torch.compiler.is_compiling() and bool(key_mask.all()):
                key_mask = None
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
        if self.uses_permutation and perm is None:
            perm = self.draw_permutation(q.shape[0], q.shape[2], q.device, key_mask)
        return self.method_impl.attend(self, x, q, k, v, key_mask, perm)

    def _attend_cached(self, x, q, k, v, key_mask):
        """New queries at the last L of S cached positions (see the module docstring)."""
        return self.method_impl.attend_cached(self, x, q, k, v, key_mask)


def _reject_moved(moved: dict) -> None:
    """Keywords the layer no longer takes: renamed ones (``kind``) and method options, which
    now go in ``options``."""
    reject_renamed(moved, "MultiHeadAttention()", error=TypeError)
    name = sorted(moved)[0]
    if name in option_names():
        raise TypeError(f"MultiHeadAttention(): {name!r} is an option of the method: pass it "
                        f"in options, e.g. options={{{name!r}: {moved[name]!r}}}")
    raise TypeError(f"MultiHeadAttention() got unexpected keyword arguments {sorted(moved)}")
