"""Graph statistics (against networkx on small graphs) and the analysis CLI commands."""

from __future__ import annotations

import argparse
import json

import networkx as nx
import numpy as np
import pytest
import torch

from stochastic_attention.analysis import cli, graphstats, theory
from stochastic_attention.analysis.families import LayerStack, PatternSpec
from stochastic_attention.analysis.layers import layer_edges


def small_graph(name: str, n: int = 120, window: int = 6, layers: int = 1, seed: int = 0):
    stack = LayerStack(PatternSpec(name, window, causal=False), n, seed)
    return graphstats.union_graph([stack(i) for i in range(layers)])


@pytest.mark.parametrize("name", ["sliding_window", "stochastic", "gated", "moba"])
def test_paths_and_clustering_match_networkx(name):
    adj = small_graph(name, layers=2)
    graph = nx.from_scipy_sparse_array(adj)
    assert nx.number_of_selfloops(graph) == 0
    assert graphstats.clustering(adj) == pytest.approx(nx.average_clustering(graph))
    paths = graphstats.path_lengths(adj)
    assert paths["reachable"] == 1.0
    assert paths["mean_hops"] == pytest.approx(nx.average_shortest_path_length(graph))
    assert paths["max_hops"] == nx.diameter(graph)
    assert graphstats.mean_degree(adj) == pytest.approx(2 * graph.number_of_edges() / 120)


def test_disconnected_graph_reports_unreachable_pairs():
    adj = graphstats.union_graph([layer_edges(30, 5, method="stochastic", layout="block",
                                              perm=torch.arange(30), causal=False)])
    paths = graphstats.path_lengths(adj)  # six separate blocks of five tokens
    assert paths["reachable"] == pytest.approx(4 / 29)
    assert paths["mean_hops"] == 1.0


def test_single_sa_layer_is_swa_relabelled():
    """One SA layer is SWA conjugated by a permutation: same spectrum, hops and clustering."""
    n, w = 200, 8
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    sa = layer_edges(n, w, method="stochastic", perm=perm, causal=False)
    swa = layer_edges(n, w, method="sliding_window", causal=False)
    eig_sa = np.sort_complex(np.linalg.eigvals(graphstats.mixing_matrix(sa).toarray()))
    eig_swa = np.sort_complex(np.linalg.eigvals(graphstats.mixing_matrix(swa).toarray()))
    np.testing.assert_allclose(eig_sa, eig_swa, atol=1e-8)
    assert graphstats.spectral_gap([sa]) == pytest.approx(graphstats.spectral_gap([swa]))
    a_sa, a_swa = graphstats.union_graph([sa]), graphstats.union_graph([swa])
    assert graphstats.path_lengths(a_sa)["mean_hops"] == pytest.approx(
        graphstats.path_lengths(a_swa)["mean_hops"])
    assert graphstats.clustering(a_sa) == pytest.approx(graphstats.clustering(a_swa))


def test_mixing_matrix_and_product_gaps():
    n, w = 256, 8
    sa = LayerStack(PatternSpec("stochastic", w, causal=False), n, 0)
    swa = LayerStack(PatternSpec("sliding_window", w, causal=False), n, 0)
    p = graphstats.mixing_matrix(sa(0))
    np.testing.assert_allclose(np.asarray(p.sum(axis=1)).ravel(), 1.0)
    assert (p.diagonal() > 0).all()
    gap_swa = [graphstats.spectral_gap([swa(i) for i in range(d)]) for d in (1, 3)]
    gap_sa = [graphstats.spectral_gap([sa(i) for i in range(d)]) for d in (1, 3)]
    # SWA's product is P^L: |lambda_2| ** L exactly.
    assert 1 - gap_swa[1] == pytest.approx((1 - gap_swa[0]) ** 3, rel=1e-6)
    # Independent permutations mix far faster than the same band three times.
    assert gap_sa[1] > 10 * gap_swa[1]
    # The sparse (ARPACK) path agrees with the dense one.
    mixers = [graphstats.mixing_matrix(sa(i)) for i in range(2)]
    dense = graphstats.second_eigenvalue_modulus(mixers)
    sparse = graphstats.second_eigenvalue_modulus(mixers, dense_below=0)
    assert sparse == pytest.approx(dense, rel=1e-5)


def test_small_world_coefficients_on_a_tiny_graph():
    lattice = small_graph("sliding_window", n=40, window=4)
    union = small_graph("gated", n=40, window=4)
    sw_lattice = graphstats.small_world(lattice, niter=1, nrand=1)
    sw_union = graphstats.small_world(union, niter=1, nrand=1)
    assert sw_lattice["omega"] < sw_union["omega"]  # a band is lattice-like (omega near -1)
    assert all(np.isfinite(v) for v in (*sw_lattice.values(), *sw_union.values()))
    with pytest.raises(ValueError, match="connected"):
        graphstats.small_world(small_graph("stochastic_block", n=40, window=4))


def test_random_graph_degree_and_hops():
    adj = graphstats.random_graph(20_000, 26.0, seed=1)
    assert graphstats.mean_degree(adj) == pytest.approx(26.0, rel=0.03)
    assert (adj != adj.T).nnz == 0 and adj.diagonal().sum() == 0
    hops = graphstats.path_lengths(adj, sources=8)["mean_hops"]
    assert abs(hops - graphstats.random_graph_hops_theory(20_000, 26.0)) < 0.6


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sattn")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_coverage_command_writes_plots_tables_json(tmp_path):
    rc = run_cli(["coverage", "--seq-len", "512", "--window", "8", "--seeds", "0,1",
                  "--max-layers", "40", "--patterns", "sliding_window,stochastic,gated",
                  "--sweep-seq-lens", "128,256", "--sweep-patterns", "sliding_window,gated",
                  "--sweep-seeds", "0", "--sweep-max-layers", "20", "--position-seq-len", "256",
                  "--position-depths", "1,4", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("coverage_curves.png", "layers_vs_length.png", "per_position.png",
                 "coverage.md"):
        assert (tmp_path / name).stat().st_size > 0
    data = json.loads((tmp_path / "coverage.json").read_text())
    swa = next(r for r in data["curves"] if r["pattern"] == "sliding_window" and r["causal"])
    assert swa["layers_to_full"] == [theory.swa_layers_to_full(8, 512)]
    sweep = {(r["pattern"], r["causal"], r["seq_len"]): r for r in data["sweep"]}
    assert sweep[("sliding_window", False, 256)]["layers_to_full"] == [
        theory.swa_layers_to_full(8, 256, causal=False)]
    assert "sattn coverage --seq-len 512" in (tmp_path / "coverage.md").read_text()


def test_graph_command_writes_tables(tmp_path):
    rc = run_cli(["graph", "--seq-len", "128", "--window", "8", "--patterns", "sliding_window,gated",
                  "--depths", "1,2", "--gap-depth", "2", "--small-world-seq-len", "0",
                  "--connectome-nodes", "3000", "--connectome-sources", "4",
                  "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "graph.json").read_text())
    assert (tmp_path / "spectral_gap.png").stat().st_size > 0
    rows = {(r["pattern"], r["layers"]): r for r in data["graphs"]}
    assert rows[("gated", 1)]["mean_hops"] < rows[("sliding_window", 1)]["mean_hops"]
    graphs = [r["graph"] for r in data["connectome"]]
    assert "random G(n, p)" in graphs and "fly connectome (reported)" in graphs


def test_cli_rejects_negative_sizes(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(["coverage", "--seq-len", "-4", "--out", str(tmp_path)])
    assert info.value.code == 2 and "--seq-len" in capsys.readouterr().err


def test_small_world_of_a_tiny_graph_is_a_value_error_not_a_division_by_zero():
    adj = graphstats.union_graph([LayerStack(PatternSpec("sliding_window", 2, causal=False), 4, 0)(0)])
    with pytest.raises(ValueError, match="undefined"):
        graphstats.small_world(adj)
