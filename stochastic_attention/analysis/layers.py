"""One layer's attention pattern as a graph: which key positions each query position sees.

SA, SWA and full attention come from :func:`stochastic_attention.ops.patterns.pattern_edges`,
the same rule the operators use, so the analysis measures the library's own patterns. The
other patterns (MoBA-like routing, dilated windows, top-weight edges) are defined here on top
of it or from given queries and keys.

An edge (q, k) means "query position q attends to key position k", i.e. information flows
from token k to token q in that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from ..ops.patterns import pattern_edges
from ..ops.validate import check_layout, check_sinks, check_window

METHODS = ("sliding_window", "stochastic", "full")


@dataclass(frozen=True)
class Edges:
    """A layer's pattern: query positions ``q`` attend to key positions ``k`` (int64 arrays)."""

    q: np.ndarray
    k: np.ndarray
    seq_len: int

    def __post_init__(self) -> None:
        if self.q.shape != self.k.shape or self.q.ndim != 1:
            raise ValueError(f"q and k must be 1-D arrays of one length, got {self.q.shape}, "
                             f"{self.k.shape}")

    @property
    def num_edges(self) -> int:
        return int(self.q.shape[0])

    def to_sparse(self) -> sp.csr_array:
        """Boolean [seq_len, seq_len] matrix, rows = query positions, columns = key positions."""
        n = self.seq_len
        ones = np.ones(self.num_edges, dtype=np.int32)
        mat = sp.coo_array((ones, (self.q, self.k)), shape=(n, n)).tocsr()
        mat.sum_duplicates()
        return (mat > 0).astype(bool)

    def union(self, other: Edges) -> Edges:
        """Edges of either pattern (duplicates are harmless: patterns are sets of edges)."""
        if other.seq_len != self.seq_len:
            raise ValueError(f"cannot unite patterns of lengths {self.seq_len} and {other.seq_len}")
        return Edges(np.concatenate([self.q, other.q]), np.concatenate([self.k, other.k]),
                     self.seq_len)


def _check_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return seq_len


def layer_edges(
    seq_len: int,
    window: int,
    *,
    method: str = "stochastic",
    perm: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    layout: str = "band",
    causal: bool = True,
    sinks: int = 0,
) -> Edges:
    """The pattern of one attention layer, with the same arguments as the operators.

    ``method`` is "sliding_window", "stochastic" or "full". For "stochastic" without ``perm``
    (a [seq_len] permutation, ``perm[slot] = position``) one is drawn from ``generator``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, window = _check_seq_len(seq_len), check_window(window)
    layout, sinks = check_layout(layout), check_sinks(sinks)
    if method == "stochastic":
        if perm is None:
            perm = torch.randperm(n, generator=generator)
        perm = torch.as_tensor(perm).reshape(-1)
        if perm.shape[0] != n:
            raise ValueError(f"perm must be a permutation of range({n}), got shape "
                             f"{tuple(perm.shape)}")
    else:
        perm, layout = None, "band"
        if method == "full":
            window = n
    q, k = pattern_edges(n, window, perm=perm, layout=layout, causal=causal, sinks=sinks)
    return Edges(q.numpy(), k.numpy(), n)


def attention_graph(seq_len: int, window: int, **kwargs) -> sp.csr_array:
    """:func:`layer_edges` as a boolean scipy.sparse matrix [query position, key position]."""
    return layer_edges(seq_len, window, **kwargs).to_sparse()


def residue_permutation(seq_len: int, dilation: int) -> torch.Tensor:
    """Slots ordered by position modulo ``dilation``: each residue class becomes contiguous."""
    pos = torch.arange(seq_len)
    return torch.cat([pos[r::dilation] for r in range(dilation)])


def dilated_edges(seq_len: int, window: int, dilation: int, *, causal: bool = True) -> Edges:
    """Dilated sliding window: query i sees i - j*dilation for j < window (centred if non-causal).

    Built as SWA inside each residue class mod ``dilation``: the operators' band window on a
    permutation that makes the classes contiguous, minus the edges that spill across classes.
    """
    n = _check_seq_len(seq_len)
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    perm = residue_permutation(n, dilation)
    q, k = pattern_edges(n, check_window(window), perm=perm, layout="band", causal=causal)
    same_class = (q % dilation) == (k % dilation)
    return Edges(q[same_class].numpy(), k[same_class].numpy(), n)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor [seq_len, head_dim] (one head)")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape, got {tuple(q.shape)} and {tuple(k.shape)}")


def moba_edges(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    top_k: int,
    *,
    causal: bool = True,
    chunk: int = 4096,
) -> Edges:
    """MoBA-like routing from one head's q, k [seq_len, head_dim].

    Keys are cut into blocks of ``block_size``; each query keeps the ``top_k`` blocks with the
    largest q . mean(block keys), its own block always among them (``top_k`` counts it). Causal:
    future blocks are never chosen and the own block is masked causally.
    """
    _check_qk(q, k)
    n = q.shape[0]
    if block_size < 1 or top_k < 1:
        raise ValueError(f"block_size and top_k must be >= 1, got {block_size}, {top_k}")
    nb = -(-n // block_size)
    blocks = torch.arange(n) // block_size
    padded = torch.cat([k, k.new_zeros(nb * block_size - n, k.shape[1])])
    counts = torch.bincount(blocks, minlength=nb).to(k.dtype)[:, None]
    means = padded.view(nb, block_size, -1).sum(1) / counts  # the last block may be short
    top = min(top_k, nb)
    offsets = torch.arange(block_size)
    qs, ks = [], []
    for start in range(0, n, chunk):
        pos = torch.arange(start, min(start + chunk, n))
        own = blocks[pos]
        scores = q[pos] @ means.T  # [c, nb]
        if causal:
            scores[torch.arange(nb)[None, :] > own[:, None]] = -torch.inf
        scores[torch.arange(pos.shape[0]), own] = torch.inf  # the own block is always routed
        val, chosen = scores.topk(top, dim=1)
        keys = chosen[:, :, None] * block_size + offsets  # [c, top, B]
        ok = (val > -torch.inf)[:, :, None] & (keys < n)
        if causal:
            ok &= keys <= pos[:, None, None]
        qs.append(pos[:, None, None].expand_as(keys)[ok])
        ks.append(keys[ok])
    return Edges(torch.cat(qs).numpy(), torch.cat(ks).numpy(), n)


def top_weight_edges(
    q: torch.Tensor,
    k: torch.Tensor,
    top: int,
    *,
    metric: str = "dot",
    causal: bool = True,
) -> Edges:
    """Each query's ``top`` strongest keys: largest q . k ("dot", softmax attention and MoBA's
    scores) or smallest ||q - k|| ("distance", Fractional Neural Attention's kernels decrease
    with distance). O(n^2): for graphs of one layer at modest n."""
    _check_qk(q, k)
    if metric not in ("dot", "distance"):
        raise ValueError(f"metric must be 'dot' or 'distance', got {metric!r}")
    n = q.shape[0]
    scores = q @ k.T if metric == "dot" else -torch.cdist(q, k)
    if causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -torch.inf)
    val, keys = scores.topk(min(top, n), dim=1)
    ok = val > -torch.inf
    rows = torch.arange(n)[:, None].expand_as(keys)
    return Edges(rows[ok].numpy(), keys[ok].numpy(), n)
