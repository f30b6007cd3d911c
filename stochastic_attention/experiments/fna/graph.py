"""Graph statistics of one attention matrix P (row-stochastic, n x n): how fast it mixes.

The statistics themselves come from :mod:`stochastic_attention.analysis.graphstats`, the
project's graph tools; this module turns a weighted attention matrix into their inputs.

- spectral gap: 1 - |lambda_2|, with lambda_2 the eigenvalue of P of second-largest modulus
  (lambda_1 = 1). A large gap means a random walk on the tokens forgets its start quickly.
- mean shortest path: undirected graph with an edge i - j where P_ij or P_ji >= threshold / n
  (at least ``threshold`` times the uniform weight), hops averaged over the connected pairs;
  also the fraction of pairs that are connected.
- diffusion map: eigenvectors of D^-1/2 W D^-1/2 for the symmetrised affinity W = (P + P^T) / 2
  and D its degrees, scaled back by D^-1/2 and the eigenvalues: low-dimensional coordinates in
  which Euclidean distance approximates diffusion distance on the attention graph.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_array

from ...analysis.graphstats import path_lengths, second_eigenvalue_modulus


def _check(P: np.ndarray) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"P must be a square matrix, got shape {P.shape}")
    if not np.allclose(P.sum(1), 1.0, atol=1e-6):
        raise ValueError("P must be row-stochastic (rows summing to 1): drop padded rows first")
    return P


def spectral_gap(P: np.ndarray) -> float:
    """1 - |lambda_2| of a row-stochastic matrix."""
    P = _check(P)
    return 1.0 - second_eigenvalue_modulus([P]) if len(P) > 1 else 1.0


def attention_graph(P: np.ndarray, threshold: float = 1.0) -> csr_array:
    """Undirected adjacency: i - j when P_ij or P_ji >= threshold / n; no self-loops."""
    P = _check(P)
    strong = P >= threshold / len(P)
    strong = strong | strong.T
    np.fill_diagonal(strong, False)
    return csr_array(strong.astype(np.int8))


def mean_shortest_path(P: np.ndarray, threshold: float = 1.0) -> tuple[float, float]:
    """(mean hops over connected pairs, fraction of pairs connected) of :func:`attention_graph`."""
    stats = path_lengths(attention_graph(P, threshold))
    return stats["mean_hops"], stats["reachable"]


def diffusion_map(P: np.ndarray, dims: int = 2) -> np.ndarray:
    """[n, dims] diffusion coordinates (the trivial constant eigenvector is dropped)."""
    P = _check(P)
    W = (P + P.T) / 2
    deg = W.sum(1)
    inv_sqrt = 1.0 / np.sqrt(deg)
    M = inv_sqrt[:, None] * W * inv_sqrt[None, :]
    vals, vecs = np.linalg.eigh(M)  # ascending
    order = np.argsort(vals)[::-1][1:dims + 1]
    return (inv_sqrt[:, None] * vecs[:, order]) * vals[order]
