"""Patterns as graphs and exact receptive fields: checks against the operators' dense masks,
closed forms, hand-computed cases and a dense boolean matrix-product reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stochastic_attention.analysis import theory
from stochastic_attention.analysis.families import PATTERNS, LayerStack, PatternSpec
from stochastic_attention.analysis.layers import (
    Edges,
    attention_graph,
    dilated_edges,
    layer_edges,
    moba_edges,
    top_weight_edges,
)
from stochastic_attention.analysis.receptive import (
    ReceptiveFields,
    all_tokens_sizes,
    layers_to_full,
    query_coverage_curve,
    query_receptive_field,
)
from stochastic_attention.ops.patterns import dense_mask


def dense_reference(layers: list[Edges]) -> np.ndarray:
    """R_L = (I + A_L) ... (I + A_1) with dense boolean matrices (obviously correct, O(n^3))."""
    n = layers[0].seq_len
    r = np.eye(n, dtype=bool)
    for e in layers:
        a = e.to_sparse().toarray() | np.eye(n, dtype=bool)
        r = (a.astype(np.int64) @ r.astype(np.int64)) > 0
    return r


@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("window", [1, 3, 8, 40])
@pytest.mark.parametrize("layout", ["band", "block"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sinks", [0, 2])
def test_sparse_pattern_equals_dense_mask(n, window, layout, causal, sinks):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n * 31 + window))
    got = attention_graph(n, window, method="stochastic", perm=perm, layout=layout, causal=causal,
                          sinks=sinks).toarray()
    want = dense_mask(n, window, perm=perm.view(1, 1, n), layout=layout, causal=causal,
                      sinks=sinks)[0, 0].numpy()
    np.testing.assert_array_equal(got, want)
    swa = attention_graph(n, window, method="sliding_window", causal=causal, sinks=sinks)
    np.testing.assert_array_equal(swa.toarray(), dense_mask(n, window, causal=causal,
                                                            sinks=sinks)[0, 0].numpy())
    full = attention_graph(n, window, method="full", causal=causal).toarray()
    np.testing.assert_array_equal(full, np.tril(np.ones((n, n), bool)) if causal
                                  else np.ones((n, n), bool))


@pytest.mark.parametrize("causal", [True, False])
def test_sa_with_identity_permutation_is_swa(causal):
    n, w = 97, 10
    sa = attention_graph(n, w, method="stochastic", perm=torch.arange(n), causal=causal)
    swa = attention_graph(n, w, method="sliding_window", causal=causal)
    assert (sa != swa).nnz == 0
    stack_sa = [layer_edges(n, w, method="stochastic", perm=torch.arange(n), causal=causal)] * 5
    stack_swa = [layer_edges(n, w, method="sliding_window", causal=causal)] * 5
    np.testing.assert_array_equal(query_receptive_field(stack_sa, -1),
                                  query_receptive_field(stack_swa, -1))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [2, 5, 8])
def test_swa_receptive_field_is_the_clipped_interval(causal, window):
    n = 61
    layer = layer_edges(n, window, method="sliding_window", causal=causal)
    fields = ReceptiveFields(n)
    for depth in range(1, 16):
        fields.add_layer(layer)
        r = fields.dense()
        for i in range(n):
            size = theory.swa_field_size(depth, window, n, position=i, causal=causal)
            reach = np.nonzero(r[i])[0]
            assert reach.size == size
            assert reach.max() - reach.min() + 1 == size  # one contiguous interval
            assert reach.min() <= i <= reach.max()
    if causal:  # the last token: exactly L*(w-1)+1, clipped at n
        depth = theory.swa_layers_to_full(window, n) + 2
        curve = query_coverage_curve(lambda _: layer, n, depth, causal=True,
                                     stop_when_full=False)
        np.testing.assert_array_equal(curve, [min(n, d * (window - 1) + 1)
                                              for d in range(depth + 1)])
        assert layers_to_full(curve, n) == -(-(n - 1) // (window - 1))


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("causal", [True, False])
def test_single_query_bitsets_and_dense_product_agree(name, causal):
    n, depth = 50, 4
    stack = LayerStack(PatternSpec(name, 6, causal=causal), n, seed=3)
    layers = [stack(i) for i in range(depth)]
    ref = dense_reference(layers)
    fields = ReceptiveFields(n)
    for e in layers:
        fields.add_layer(e)
    np.testing.assert_array_equal(fields.dense(), ref)
    np.testing.assert_array_equal(fields.sizes(), ref.sum(1))
    for query in (0, 17, n - 1):
        np.testing.assert_array_equal(query_receptive_field(layers, query), ref[query])
    if causal:
        assert not np.triu(ref, 1).any()  # nothing flows backwards in position


def test_hand_computed_case():
    # perm [2, 0, 3, 1]: slot s holds position perm[s]; causal band w=2 sees slots s-1, s.
    sa = layer_edges(4, 2, method="stochastic", perm=torch.tensor([2, 0, 3, 1]), causal=True)
    a = sa.to_sparse().toarray()
    want = np.eye(4, dtype=bool)
    want[3, 0] = True  # slot 2 (position 3) sees slot 1 (position 0); other slot pairs are future
    np.testing.assert_array_equal(a, want)
    swa = layer_edges(4, 2, method="sliding_window", causal=True)
    # SA first, then SWA: token 3 <- {3, 2} <- {3, 0, 2}.
    np.testing.assert_array_equal(np.nonzero(query_receptive_field([sa, swa], 3))[0], [0, 2, 3])
    np.testing.assert_array_equal(np.nonzero(query_receptive_field([sa, swa], 2))[0], [1, 2])
    # SWA first, then SA: token 2 only hears itself and token 1.
    np.testing.assert_array_equal(np.nonzero(query_receptive_field([swa, sa], 2))[0], [1, 2])
    np.testing.assert_array_equal(np.nonzero(query_receptive_field([swa, sa], 3))[0], [0, 2, 3])


@pytest.mark.parametrize("name", ["stochastic", "stochastic_block", "gated", "moba", "dilated"])
@pytest.mark.parametrize("causal", [True, False])
def test_coverage_is_monotone_in_depth(name, causal):
    n = 300
    spec = PatternSpec(name, 8, causal=causal)
    curve = query_coverage_curve(LayerStack(spec, n, 1), n, 30, causal=causal, query=150,
                                 stop_when_full=False)
    assert np.all(np.diff(curve) >= 0)
    assert curve[0] == 1
    sizes = all_tokens_sizes(LayerStack(spec, n, 1), n, range(0, 8))
    for d in range(1, 8):
        assert np.all(sizes[d] >= sizes[d - 1])
    fields, prev = ReceptiveFields(n), None
    stack = LayerStack(spec, n, 2)
    for d in range(5):
        fields.add_layer(stack(d))
        cur = fields.dense()
        if prev is not None:
            assert not (prev & ~cur).any()  # R_L is a subset of R_{L+1}
        prev = cur


@pytest.mark.parametrize("causal", [True, False])
def test_full_attention_covers_in_one_layer(causal):
    n = 40
    stack = LayerStack(PatternSpec("full", 4, causal=causal), n)
    sizes = all_tokens_sizes(stack, n, [1])[1]
    np.testing.assert_array_equal(sizes, np.arange(1, n + 1) if causal else np.full(n, n))
    curve = query_coverage_curve(stack, n, 5, causal=causal)
    assert layers_to_full(curve, n) == 1


def test_dilated_pattern_matches_definition():
    n, w, d = 45, 4, 3
    for causal in (True, False):
        got = dilated_edges(n, w, d, causal=causal).to_sparse().toarray()
        want = np.zeros((n, n), bool)
        offsets = range(0, w) if causal else range(-(w // 2), w - w // 2)
        for i in range(n):
            for j in offsets:
                key = i - j * d if causal else i + j * d
                if 0 <= key < n:
                    want[i, key] = True
        np.testing.assert_array_equal(got, want)


def test_dilated_stack_covers_in_log_w_layers():
    n, w = 4096, 16  # dilations 1, 16, 256: exactly w^3 = n sources after three layers
    stack = LayerStack(PatternSpec("dilated", w, causal=True), n)
    curve = query_coverage_curve(stack, n, 10, causal=True)
    np.testing.assert_array_equal(curve[:4], [1, 16, 256, 4096])


def test_moba_routing():
    n, d, block = 12, 4, 3
    k = torch.zeros(n, d)
    k[3:6, 0] = 1.0  # block 1 has the largest mean along axis 0
    q = torch.zeros(n, d)
    q[:, 0] = 1.0
    a = moba_edges(q, k, block, 2, causal=True).to_sparse().toarray()
    for i in range(n):
        own = i // block
        want = {j for j in range(own * block, i + 1)}
        if own > 1:
            want |= {3, 4, 5}
        elif own == 1:  # own block is block 1; the other slot goes to the only earlier block 0
            want |= {0, 1, 2}
        assert set(np.nonzero(a[i])[0]) == want, i
    # top_k >= number of blocks: every past key (degenerate oracle: full causal attention).
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    full = moba_edges(q, k, 3, 7, causal=True).to_sparse().toarray()
    np.testing.assert_array_equal(full, np.tril(np.ones((20, 20), bool)))
    assert moba_edges(q, k, 3, 7, causal=False).to_sparse().toarray().all()


def test_top_weight_edges():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(15, 4, generator=g), torch.randn(15, 4, generator=g)
    a = top_weight_edges(q, k, 15, causal=True).to_sparse().toarray()
    np.testing.assert_array_equal(a, np.tril(np.ones((15, 15), bool)))
    near = top_weight_edges(q, k, 1, metric="distance", causal=False)
    np.testing.assert_array_equal(near.k, torch.cdist(q, k).argmin(1).numpy())
    best = top_weight_edges(q, k, 1, metric="dot", causal=False)
    np.testing.assert_array_equal(best.k, (q @ k.T).argmax(1).numpy())


def test_idealised_theory_and_measured_noncausal_sa():
    n, w = 4096, 16
    f = theory.idealised_sa_fraction(w, n, 10)
    assert np.all(np.diff(f) >= 0) and f[-1] == pytest.approx(1.0)
    assert f[1] * n == pytest.approx(w, rel=0.01)  # one layer adds w-1 sources
    ideal = theory.idealised_sa_layers_to_full(w, n)
    assert np.ceil(theory.log_w(w, n)) <= ideal <= np.ceil(theory.log_w(w, n)) + 2
    measured = [layers_to_full(query_coverage_curve(
        LayerStack(PatternSpec("stochastic", w, causal=False), n, s), n, 20, causal=False), n)
        for s in range(3)]
    assert all(abs(m - ideal) <= 1 for m in measured), (measured, ideal)


def test_causal_sa_alone_is_slow_and_the_union_is_fast():
    n, w = 2048, 16
    swa_layers = theory.swa_layers_to_full(w, n)  # 137
    alone = query_coverage_curve(LayerStack(PatternSpec("stochastic", w), n, 0), n, 60, causal=True)
    union = query_coverage_curve(LayerStack(PatternSpec("gated", w), n, 0), n, 60, causal=True)
    assert layers_to_full(alone, n) is None  # still incomplete after 60 layers
    assert alone[60] > 0.95 * n  # yet almost everything arrived long before
    assert layers_to_full(union, n) <= 6 < swa_layers


def test_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        PatternSpec("nope", 8)
    with pytest.raises(ValueError, match="window"):
        PatternSpec("sliding_window", 1)
    with pytest.raises(ValueError, match="method"):
        layer_edges(10, 4, method="sparse")
    with pytest.raises(ValueError, match="perm"):
        layer_edges(10, 4, method="stochastic", perm=torch.arange(9))
    with pytest.raises(ValueError, match="window"):
        layer_edges(10, 0, method="sliding_window")
    with pytest.raises(ValueError, match="seq_len"):
        layer_edges(0, 4)
    with pytest.raises(ValueError, match="dilation"):
        dilated_edges(10, 4, 0)
    with pytest.raises(TypeError, match="q must"):
        moba_edges(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 2, 1)
    with pytest.raises(ValueError, match="query"):
        query_receptive_field([layer_edges(5, 2, method="sliding_window")], 7)
