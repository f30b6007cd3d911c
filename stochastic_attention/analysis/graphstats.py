"""Graph statistics of attention patterns, with scipy.sparse.csgraph and networkx.

- The "union graph" of a stack of layers: an undirected edge wherever some layer lets one token
  attend to the other (self-loops dropped). Path lengths and clustering are measured on it.
- Mixing: P = row-normalised pattern (with the query's own edge: each token averages the values
  it sees, uniform weights). The spectral gap 1 - |lambda_2| of P, and of the product
  P_L ... P_1 over layers, says how fast repeated averaging forgets where information started.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import networkx as nx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import scipy.sparse.linalg as spla

from .layers import Edges


def union_graph(layers: Sequence[Edges]) -> sp.csr_array:
    """Undirected boolean adjacency of the union of the layers' edges, no self-loops."""
    if not layers:
        raise ValueError("layers must hold at least one layer pattern")
    n = layers[0].seq_len
    q = np.concatenate([e.q for e in layers])
    k = np.concatenate([e.k for e in layers])
    off = q != k
    q, k = q[off], k[off]
    adj = sp.coo_array((np.ones(2 * q.size, dtype=np.int32),
                        (np.concatenate([q, k]), np.concatenate([k, q]))), shape=(n, n)).tocsr()
    adj.sum_duplicates()
    return (adj > 0).astype(np.int8)


def mean_degree(adj: sp.csr_array) -> float:
    return float(adj.nnz) / adj.shape[0]


def path_lengths(adj: sp.csr_array, sources: int | None = None, seed: int = 0) -> dict:
    """Breadth-first hop counts from all nodes (``sources=None``) or a random sample of them.

    Returns mean hops over reachable pairs, the diameter seen, and the fraction of pairs that are
    reachable at all (a disconnected graph has infinite average path length).
    """
    n = adj.shape[0]
    if sources is None or sources >= n:
        idx = np.arange(n)
    else:
        idx = np.random.default_rng(seed).choice(n, size=sources, replace=False)
    dist = csgraph.shortest_path(adj, method="D", unweighted=True, directed=False, indices=idx)
    dist[np.arange(idx.size), idx] = np.nan  # a node's distance to itself is not a path
    finite = np.isfinite(dist)
    return {
        "mean_hops": float(dist[finite].mean()) if finite.any() else math.inf,
        "max_hops": float(dist[finite].max()) if finite.any() else math.inf,
        "reachable": float(finite.sum() / (idx.size * (n - 1))) if n > 1 else 1.0,
        "sources": int(idx.size),
    }


def to_networkx(adj: sp.csr_array) -> nx.Graph:
    return nx.from_scipy_sparse_array(adj)


def clustering(adj: sp.csr_array, nodes: int | None = None, seed: int = 0) -> float:
    """Average clustering coefficient over all nodes or a random sample of them.

    Triangles through node i are (A^2 * A)[i].sum() / 2, computed for the sampled rows only
    with sparse products (networkx's ``average_clustering`` is the reference in the tests; it is
    too slow for 10^5 nodes). Nodes of degree < 2 count as 0, as in networkx.
    """
    n = adj.shape[0]
    if nodes is None or nodes >= n:
        idx = np.arange(n)
    else:
        idx = np.random.default_rng(seed).choice(n, size=nodes, replace=False)
    a = (adj > 0).astype(np.float64)
    rows = a[idx]
    triangles = np.asarray((rows @ a).multiply(rows).sum(axis=1)).ravel() / 2.0
    degree = np.asarray(rows.sum(axis=1)).ravel()
    pairs = degree * (degree - 1) / 2.0
    coeff = np.divide(triangles, pairs, out=np.zeros_like(triangles), where=pairs > 0)
    return float(coeff.mean())


def small_world(adj: sp.csr_array, *, niter: int = 2, nrand: int = 2, seed: int = 0) -> dict:
    """networkx's small-world coefficients: sigma = (C/C_r)/(L/L_r) (> 1 small world) and
    omega = L_r/L - C/C_l (near 0 small world, -1 lattice, +1 random). Slow: small graphs only."""
    graph = to_networkx(adj)
    if not nx.is_connected(graph):
        raise ValueError("small-world coefficients need a connected graph; use more layers or a "
                         "larger window")
    try:
        return {
            "sigma": float(nx.sigma(graph, niter=niter, nrand=nrand, seed=seed)),
            "omega": float(nx.omega(graph, niter=niter, nrand=nrand, seed=seed)),
        }
    except (ZeroDivisionError, nx.NetworkXError) as err:  # tiny or complete graphs
        raise ValueError(f"small-world coefficients are undefined for this graph "
                         f"({type(err).__name__}: {err}); use a longer sequence") from None


def mixing_matrix(edges: Edges) -> sp.csr_array:
    """Row-normalised pattern: each query averages the keys it sees (itself always included)."""
    n = edges.seq_len
    pattern = edges.to_sparse().astype(np.float64) + sp.eye_array(n, format="csr")
    pattern.data[:] = 1.0  # the diagonal may have been counted twice
    row = np.asarray(pattern.sum(axis=1)).ravel()
    return sp.diags_array(1.0 / row) @ pattern


def second_eigenvalue_modulus(mixers: Sequence[sp.csr_array], dense_below: int = 2048) -> float:
    """|lambda_2| of the product mixers[-1] @ ... @ mixers[0] of row-stochastic matrices."""
    n = mixers[0].shape[0]
    if n <= dense_below:
        prod = np.eye(n)
        for m in mixers:
            prod = m @ prod
        moduli = np.sort(np.abs(np.linalg.eigvals(prod)))[::-1]
        return float(moduli[1]) if n > 1 else 0.0

    def matvec(x: np.ndarray) -> np.ndarray:
        for m in mixers:
            x = m @ x
        return x

    op = spla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    vals = spla.eigs(op, k=3, which="LM", return_eigenvectors=False, maxiter=5000, tol=1e-8)
    return float(np.sort(np.abs(vals))[::-1][1])


def spectral_gap(layers: Sequence[Edges]) -> float:
    """1 - |lambda_2| of the product of the layers' mixing matrices (first layer applied first)."""
    return 1.0 - second_eigenvalue_modulus([mixing_matrix(e) for e in layers])


def random_graph(n: int, mean_degree: float, seed: int = 0) -> sp.csr_array:
    """Erdos-Renyi-like G(n, p), p = mean_degree / (n - 1): scipy draws the upper triangle's
    entries at that density, mirrored (networkx's generator takes ~30 s at n = 130,000)."""
    p = mean_degree / (n - 1)
    upper = sp.random_array((n, n), density=p / 2, format="coo", rng=np.random.default_rng(seed))
    keep = upper.row != upper.col
    r, c = upper.row[keep], upper.col[keep]
    adj = sp.coo_array((np.ones(2 * r.size, dtype=np.int8), (np.concatenate([r, c]),
                        np.concatenate([c, r]))), shape=(n, n)).tocsr()
    adj.sum_duplicates()
    return (adj > 0).astype(np.int8)


def random_graph_hops_theory(n: int, mean_degree: float) -> float:
    """The classic estimate of a random graph's mean path length, ln n / ln <k>."""
    return math.log(n) / math.log(mean_degree)
