"""Exact receptive fields through depth, residual connections included.

With A_l the boolean pattern of layer l (A_l[q, k]: query q attends to key k) and residual
connections, the sources that can reach each token after L layers are the rows of
    R_L = (I + A_L) (I + A_{L-1}) ... (I + A_1)        (boolean semiring)
i.e. R_{l} = R_{l-1} OR A_l R_{l-1}. Two exact ways to compute it:

- one query (e.g. the last token): walk backwards from the output, keeping the SET of tokens
  whose information reaches the query; each layer costs one pass over its edges, O(n w);
- all tokens: rows of R as packed bitsets, n^2 / 8 bytes (n = 16,384 -> 32 MiB).

Coverage of token i is |R_L[i]| divided by the sources it may see at all: i + 1 when causal
(nothing flows backwards in position), n otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..progress import tqdm
from .layers import Edges


def allowed_sources(seq_len: int, causal: bool) -> np.ndarray:
    """How many source tokens each position could ever receive information from."""
    if causal:
        return np.arange(1, seq_len + 1)
    return np.full(seq_len, seq_len)


def backward_step(reached: np.ndarray, edges: Edges) -> np.ndarray:
    """Sources of a layer's output set: ``reached`` plus every key a reached query attends to."""
    out = reached.copy()
    out[edges.k[reached[edges.q]]] = True
    return out


def query_receptive_field(layers: Sequence[Edges], query: int) -> np.ndarray:
    """Bool [n]: which input tokens reach ``query``'s output; ``layers[0]`` is the first layer."""
    n = layers[0].seq_len if layers else None
    if n is None:
        raise ValueError("layers must hold at least one layer pattern")
    if not -n <= query < n:
        raise ValueError(f"query must be a position in [-{n}, {n}), got {query}")
    reached = np.zeros(n, dtype=bool)
    reached[query] = True
    for edges in reversed(layers):
        reached = backward_step(reached, edges)
    return reached


def query_coverage_curve(
    draw_layer: Callable[[int], Edges],
    seq_len: int,
    max_layers: int,
    *,
    causal: bool,
    query: int = -1,
    stop_when_full: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Receptive-field size of ``query`` after 0, 1, ..., max_layers layers (int array).

    Layer ``l`` drawn by ``draw_layer(l)`` is inserted on the INPUT side, so entry L is the exact
    receptive field of the network (layer L-1, ..., layer 0 -> output); with independent layers
    this has the same distribution as stacking on top. Stops early once the query sees every
    source it may see (all positions up to it if ``causal``); later entries repeat the size.
    """
    query = query % seq_len
    reached = np.zeros(seq_len, dtype=bool)
    reached[query] = True
    full = allowed_sources(seq_len, causal)[query]
    sizes = np.empty(max_layers + 1, dtype=np.int64)
    sizes[0] = 1
    depth = 0
    for depth in tqdm(range(1, max_layers + 1), disable=not progress, leave=False, desc="layers"):
        reached = backward_step(reached, draw_layer(depth - 1))
        sizes[depth] = reached.sum()
        if stop_when_full and sizes[depth] >= full:
            break
    sizes[depth + 1:] = sizes[depth]
    return sizes


class ReceptiveFields:
    """Receptive fields of ALL tokens as packed bitsets: bit j of row i = source j reaches i."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.words = -(-seq_len // 64)
        bits = np.zeros((seq_len, self.words * 64), dtype=bool)
        bits[np.arange(seq_len), np.arange(seq_len)] = True  # depth 0: each token sees itself
        self.rows = np.packbits(bits, axis=1, bitorder="little").view(np.uint64)

    def add_layer(self, edges: Edges) -> None:
        """Stack one more layer on the output side: R <- R OR A R."""
        if edges.seq_len != self.seq_len:
            raise ValueError(f"layer has seq_len {edges.seq_len}, fields have {self.seq_len}")
        csr = edges.to_sparse()
        degree = np.diff(csr.indptr)
        width = int(degree.max(initial=0))
        # Neighbour table padded with the query itself (OR-ing a row into itself is a no-op).
        table = np.repeat(np.arange(self.seq_len)[:, None], max(width, 1), axis=1)
        row_of = np.repeat(np.arange(self.seq_len), degree)
        table[row_of, np.arange(csr.indices.shape[0]) - csr.indptr[row_of]] = csr.indices
        new = self.rows.copy()
        for col in range(width):
            new |= self.rows[table[:, col]]
        self.rows = new

    def sizes(self) -> np.ndarray:
        """Receptive-field size of every token."""
        return np.bitwise_count(self.rows).sum(axis=1, dtype=np.int64)

    def dense(self) -> np.ndarray:
        """Bool [n, n] matrix R (small n only)."""
        bits = np.unpackbits(self.rows.view(np.uint8), axis=1, bitorder="little")
        return bits[:, : self.seq_len].astype(bool)


def all_tokens_sizes(
    draw_layer: Callable[[int], Edges],
    seq_len: int,
    depths: Sequence[int],
    *,
    progress: bool = False,
) -> dict[int, np.ndarray]:
    """Receptive-field size of every token after each depth in ``depths`` (layers stacked on
    the output side, ``draw_layer(0)`` first)."""
    fields = ReceptiveFields(seq_len)
    wanted = sorted(set(depths))
    out: dict[int, np.ndarray] = {}
    if 0 in wanted:
        out[0] = fields.sizes()
    last = wanted[-1] if wanted else 0
    for depth in tqdm(range(1, last + 1), disable=not progress, leave=False, desc="layers"):
        fields.add_layer(draw_layer(depth - 1))
        if depth in wanted:
            out[depth] = fields.sizes()
    return out


def layers_to_full(sizes: np.ndarray, full: int) -> int | None:
    """First depth at which a size curve reaches ``full`` (None if it never does)."""
    hit = np.nonzero(np.asarray(sizes) >= full)[0]
    return int(hit[0]) if hit.size else None
