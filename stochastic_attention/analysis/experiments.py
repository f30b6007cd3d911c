"""The measurements behind ``sattn coverage`` and ``sattn graph``: plain dicts, JSON-ready."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..progress import tqdm
from . import graphstats, theory
from .families import LayerStack, PatternSpec
from .receptive import all_tokens_sizes, allowed_sources, layers_to_full, query_coverage_curve


def _depth_cap(spec: PatternSpec, seq_len: int, max_layers: int) -> int:
    """Deterministic stacks are cheap (their patterns are cached), so let SWA run to the end."""
    if spec.random:
        return max_layers
    return max(max_layers, theory.swa_layers_to_full(spec.window, seq_len, causal=False) + 1)


def coverage_curves(
    specs: Sequence[PatternSpec],
    seq_len: int,
    seeds: int | Sequence[int],
    max_layers: int,
    *,
    query: int = -1,
) -> list[dict]:
    """Receptive-field size of one query vs depth, Monte Carlo over seeds for random schemes.

    ``seeds``: the permutation seeds, or a count (seeds 0 .. count - 1).
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one permutation seed")
    rows = []
    for spec in tqdm(specs, desc=f"coverage n={seq_len}"):
        cap = _depth_cap(spec, seq_len, max_layers)
        used = seeds if spec.random else seeds[:1]
        runs = len(used)
        curves = np.stack([
            query_coverage_curve(LayerStack(spec, seq_len, seed), seq_len, cap, causal=spec.causal,
                                 query=query, progress=True)
            for seed in used
        ])
        full = int(allowed_sources(seq_len, spec.causal)[query % seq_len])
        rows.append({
            "pattern": spec.name, "causal": spec.causal, "window": spec.window,
            "seq_len": seq_len, "query": query % seq_len, "max_layers": cap, "seeds": runs,
            "sizes": curves.tolist(), "full": full,
            "layers_to_full": [layers_to_full(c, full) for c in curves],
        })
    return rows


def full_coverage_vs_length(
    specs: Sequence[PatternSpec],
    seq_lens: Sequence[int],
    seeds: int | Sequence[int],
    max_layers: int,
) -> list[dict]:
    """Layers until the last token sees the whole sequence, for each scheme and length."""
    rows = []
    for n in seq_lens:
        for row in coverage_curves(specs, n, seeds, max_layers):
            rows.append({key: row[key] for key in ("pattern", "causal", "window", "seq_len",
                                                    "max_layers", "seeds", "layers_to_full")})
    return rows


def per_position_coverage(
    specs: Sequence[PatternSpec],
    seq_len: int,
    depths: Sequence[int],
    seed: int = 0,
) -> list[dict]:
    """Coverage fraction of every position after each depth (all tokens, bitsets), plus the
    number of keys each position sees in a single layer."""
    rows = []
    for spec in tqdm(specs, desc=f"per-position n={seq_len}"):
        stack = LayerStack(spec, seq_len, seed)
        sizes = all_tokens_sizes(stack, seq_len, depths, progress=True)
        allowed = allowed_sources(seq_len, spec.causal)
        one_layer = np.bincount(stack(0).q, minlength=seq_len)
        rows.append({
            "pattern": spec.name, "causal": spec.causal, "window": spec.window,
            "seq_len": seq_len, "seed": seed,
            "coverage": {str(d): (s / allowed).tolist() for d, s in sizes.items()},
            "keys_one_layer": one_layer.tolist(),
        })
    return rows


def summarize_layers(values: Sequence[int | None], cap: int) -> dict:
    """Mean/spread of layers-to-full over seeds; incomplete runs count as > cap."""
    done = [v for v in values if v is not None]
    out = {"complete": len(done), "runs": len(values), "cap": cap}
    if done:
        out.update(mean=float(np.mean(done)), std=float(np.std(done)), min=int(min(done)),
                   max=int(max(done)))
    return out


def theory_row(window: int, seq_len: int) -> dict:
    mean, median = theory.causal_sa_neighbour_layers(window, seq_len)
    return {
        "seq_len": seq_len, "window": window,
        "swa_causal": theory.swa_layers_to_full(window, seq_len, causal=True),
        "swa_noncausal_last_token": theory.swa_layers_to_full(window, seq_len, causal=False),
        "idealised_sa": theory.idealised_sa_layers_to_full(window, seq_len),
        "log_w_n": theory.log_w(window, seq_len),
        "causal_sa_neighbour_mean": mean, "causal_sa_neighbour_median": median,
    }


# ----------------------------------------------------------------------------- graphs


def graph_table(
    specs: Sequence[PatternSpec],
    seq_len: int,
    depths: Sequence[int],
    seed: int = 0,
    path_sources: int | None = None,
) -> list[dict]:
    """Degree, hops, clustering and spectral gap of single layers and of unions over layers."""
    rows = []
    for spec in tqdm(specs, desc=f"graphs n={seq_len}"):
        stack = LayerStack(spec, seq_len, seed)
        layers = [stack(i) for i in range(max(depths))]
        single = graphstats.spectral_gap(layers[:1])
        for depth in depths:
            adj = graphstats.union_graph(layers[:depth])
            rows.append({
                "pattern": spec.name, "causal": spec.causal, "window": spec.window,
                "seq_len": seq_len, "layers": depth,
                "mean_degree": graphstats.mean_degree(adj),
                **graphstats.path_lengths(adj, path_sources, seed),
                "clustering": graphstats.clustering(adj),
                "spectral_gap_product": (single if depth == 1
                                         else graphstats.spectral_gap(layers[:depth])),
                "spectral_gap_single": single,
            })
    return rows


def small_world_table(specs: Sequence[PatternSpec], seq_len: int, seed: int = 0) -> list[dict]:
    """networkx sigma / omega of one layer's undirected graph (slow: keep seq_len ~100)."""
    rows = []
    for spec in tqdm(specs, desc=f"small world n={seq_len}"):
        adj = graphstats.union_graph([LayerStack(spec, seq_len, seed)(0)])
        row = {"pattern": spec.name, "window": spec.window, "seq_len": seq_len,
               "mean_degree": graphstats.mean_degree(adj)}
        try:
            row.update(graphstats.small_world(adj, seed=seed))
        except ValueError as err:  # a disconnected graph has no small-world coefficients
            row["error"] = str(err)
        rows.append(row)
    return rows


def connectome_table(
    n: int,
    mean_degree: float,
    window: int,
    sources: int,
    clustering_nodes: int,
    seed: int = 0,
) -> list[dict]:
    """The fly connectome's scale (n ~ 130,000, mean degree ~ 26, 4.4 hops reported) against a
    random graph and single non-causal attention layers of about that degree."""
    graphs = {"random G(n, p)": graphstats.random_graph(n, mean_degree, seed)}
    for name, w in (("sliding_window", 2 * window), ("stochastic", 2 * window), ("gated", window)):
        spec = PatternSpec(name, w, causal=False)
        graphs[f"{name} w={w}"] = graphstats.union_graph([LayerStack(spec, n, seed)(0)])
    rows = []
    for name, adj in tqdm(graphs.items(), desc=f"connectome-scale graphs n={n}"):
        rows.append({"graph": name, "seq_len": n, "mean_degree": graphstats.mean_degree(adj),
                     **graphstats.path_lengths(adj, sources, seed),
                     "clustering": graphstats.clustering(adj, clustering_nodes, seed)})
    rows.append({"graph": "fly connectome (reported)", "seq_len": 130_000, "mean_degree": 26.0,
                 "mean_hops": 4.4})
    rows.append({"graph": "ln n / ln <k> (random-graph estimate)", "seq_len": n,
                 "mean_degree": mean_degree,
                 "mean_hops": graphstats.random_graph_hops_theory(n, mean_degree)})
    return rows


def spectral_gap_vs_depth(
    specs: Sequence[PatternSpec], seq_len: int, max_depth: int, seed: int = 0
) -> list[dict]:
    """1 - |lambda_2| of the product of the first L mixing matrices, L = 1..max_depth."""
    rows = []
    for spec in tqdm(specs, desc=f"spectral gap n={seq_len}"):
        stack = LayerStack(spec, seq_len, seed)
        mixers = [graphstats.mixing_matrix(stack(i)) for i in range(max_depth)]
        gaps = [1.0 - graphstats.second_eigenvalue_modulus(mixers[:d])
                for d in range(1, max_depth + 1)]
        rows.append({"pattern": spec.name, "causal": spec.causal, "window": spec.window,
                     "seq_len": seq_len, "gaps": gaps})
    return rows

