"""Padding never changes a sequence's result: sinks are its first real tokens, SA routes over its
real tokens only, and padded keys and values (even NaN or inf) never reach an output."""

from __future__ import annotations

import pytest
import torch

import stochastic_attention as sa
from stochastic_attention.nn import KVCache, MultiHeadAttention
from stochastic_attention.ops import fractional, moba
from stochastic_attention.ops.patterns import dense_mask
from stochastic_attention.ops.permute import routing_permutation
from stochastic_attention.testing import random_qkv

N = 15  # padded length
LENGTHS = (11, 6)  # real tokens of the two sequences


def batch_of(parts, n, left):
    """Pack sequences [1, H, r, D] into [len, H, n, D]: left-padded where ``left[i]``."""
    out = parts[0].new_zeros(len(parts), parts[0].shape[1], n, parts[0].shape[-1])
    mask = torch.zeros(len(parts), n, dtype=torch.bool)
    spans = []
    for i, (x, is_left) in enumerate(zip(parts, left, strict=True)):
        r = x.shape[2]
        span = slice(n - r, n) if is_left else slice(0, r)
        out[i, :, span] = x[0]
        mask[i, span] = True
        spans.append(span)
    return out, mask, spans


def sequences(heads=4, kv_heads=2, dim=8, seed=0):
    seqs = []
    for i, r in enumerate(LENGTHS):
        q, k, v = random_qkv(r, batch=1, heads=heads, kv_heads=kv_heads, dim=dim, seed=seed + i,
                           grad=False)
        seqs.append((q, k, v))
    return seqs


PAD_LAYOUTS = [(True, False), (False, True), (True, True)]  # (seq 0 left?, seq 1 left?)


def op_cases():
    cases = [("sliding_window", dict(sinks=s, causal=c)) for s in (0, 2) for c in (True, False)]
    for layout in ("band", "block"):
        for sinks in (0, 2):
            cases.append(("stochastic", dict(layout=layout, sinks=sinks, causal=True)))
            cases.append(("stochastic", dict(layout=layout, sinks=sinks, local=3)))
        cases.append(("stochastic", dict(layout=layout, causal=False, sinks=1)))
    return cases


def run_op(method, q, k, v, kpm, backend, kw):
    if method == "sliding_window":
        return sa.sliding_window_attention(q, k, v, 4, key_mask=kpm, backend=backend, **kw)
    g = torch.Generator().manual_seed(7)
    return sa.stochastic_attention(q, k, v, 4, generator=g, key_mask=kpm,
                                   backend=backend, **kw)


@pytest.mark.parametrize("left", PAD_LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("method,kw", op_cases())
def test_op_output_does_not_depend_on_padding(method, kw, backend, left):
    seqs = sequences()
    alone = [run_op(method, *s, None, backend, kw) for s in seqs]
    q, kpm, spans = batch_of([s[0] for s in seqs], N, left)
    k, _, _ = batch_of([s[1] for s in seqs], N, left)
    v, _, _ = batch_of([s[2] for s in seqs], N, left)
    out = run_op(method, q, k, v, kpm, backend, kw)
    for i, span in enumerate(spans):
        torch.testing.assert_close(out[i, :, span], alone[i][0], atol=1e-5, rtol=1e-5)


def _pad_inputs(seqs, left):
    q, kpm, spans = batch_of([s[0] for s in seqs], N, left)
    k, _, _ = batch_of([s[1] for s in seqs], N, left)
    v, _, _ = batch_of([s[2] for s in seqs], N, left)
    return q, k, v, kpm, spans


@pytest.mark.parametrize("left", PAD_LAYOUTS)
@pytest.mark.parametrize("fn", [moba.moba_attention, moba.moba_masked, moba.moba_reference])
@pytest.mark.parametrize("sinks", [0, 2])
def test_moba_output_does_not_depend_on_padding(fn, sinks, left):
    seqs = sequences()
    alone = [fn(*s, 3, 2, sinks=sinks) for s in seqs]
    q, k, v, kpm, spans = _pad_inputs(seqs, left)
    out = fn(q, k, v, 3, 2, sinks=sinks, key_mask=kpm)
    for i, span in enumerate(spans):
        torch.testing.assert_close(out[i, :, span], alone[i][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("left", PAD_LAYOUTS)
@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("stochastic,layout", [(False, "band"), (True, "band"), (True, "block")])
def test_fractional_output_does_not_depend_on_padding(stochastic, layout, backend, left):
    seqs = sequences()

    def perm(B, n, kpm):
        if not stochastic:
            return None
        return routing_permutation(B, 4, n, key_mask=kpm,
                                   generator=torch.Generator().manual_seed(3))

    kw = dict(window=4, causal=True, layout=layout, backend=backend)
    alone = [fractional.fractional_attention(*s, 1.2, perm=perm(1, s[0].shape[2], None), **kw)
             for s in seqs]
    q, k, v, kpm, spans = _pad_inputs(seqs, left)
    out = fractional.fractional_attention(q, k, v, 1.2, perm=perm(2, N, kpm),
                                          key_mask=kpm, **kw)
    for i, span in enumerate(spans):
        torch.testing.assert_close(out[i, :, span], alone[i][0], atol=1e-5, rtol=1e-5)


def test_sinks_are_the_first_real_tokens():
    kpm = torch.tensor([[False, False, True, True, True, True, True]])
    mask = dense_mask(7, 1, sinks=2, key_mask=kpm)[0, 0]
    # Every real query sees itself and the sinks, which are positions 2 and 3 (not padding).
    for i in range(2, 7):
        assert mask[i].nonzero().flatten().tolist() == sorted({2, 3, i} & set(range(i + 1)))
    counts = sa.attended_keys(7, 1, method="sliding_window", sinks=2, key_mask=kpm)
    assert counts[0, 0].tolist() == [0, 0, 1, 2, 3, 3, 3]


def test_routing_is_drawn_over_real_tokens_and_reproducible():
    kpm = torch.tensor([[False, False, True, True, True], [True, True, True, False, False]])
    perm = routing_permutation(2, 3, 5, key_mask=kpm,
                               generator=torch.Generator().manual_seed(0))
    alone = routing_permutation(1, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(perm[0, :, :3], alone[0] + 2) and torch.equal(perm[0, :, 3:],
                                                                     torch.tensor([[0, 1]] * 3))
    assert torch.equal(perm[1, :, :3], alone[0]) and torch.equal(perm[1, :, 3:],
                                                                 torch.tensor([[3, 4]] * 3))
    g = torch.Generator().manual_seed(0)
    first = routing_permutation(1, 1, 64, generator=g)
    assert not torch.equal(routing_permutation(1, 1, 64, generator=g), first)  # advanced
    # The generator's next state does not depend on the batch it served.
    g2 = torch.Generator().manual_seed(0)
    routing_permutation(2, 1, 5, key_mask=kpm, generator=g2)
    g3 = torch.Generator().manual_seed(0)
    routing_permutation(1, 1, 64, generator=g3)
    assert torch.equal(g2.get_state(), g3.get_state())


# ------------------------------------------------------------------------------------------
# The layer.
# ------------------------------------------------------------------------------------------

LAYER_CASES = [
    ("sliding_window", dict(window=4, sinks=2)),
    ("stochastic", dict(window=4)),
    ("stochastic", dict(window=4, layout="block", sinks=2)),
    ("stochastic", dict(window=4, perm_per_head=True, sinks=1)),
    ("gated", dict(window=4, sinks=1)),
    ("stochastic_local", dict(window=4, local=2, sinks=1, layout="block")),
    ("bigbird", dict(window=4, random_keys=3, sinks=1)),
    ("moba", dict(block_size=3, top_k=2, sinks=1)),
    ("fractional", dict(window=4, windows="stochastic", alpha=1.2)),
    ("full", dict()),
]


@pytest.mark.parametrize("left", PAD_LAYOUTS)
@pytest.mark.parametrize("method,options", LAYER_CASES)
def test_layer_output_does_not_depend_on_padding(method, options, left):
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 4, num_kv_heads=2, method=method,
                               options=options).double().eval()
    xs = [torch.randn(1, r, 24, dtype=torch.double) for r in LENGTHS]
    alone = [layer(x) for x in xs]
    x = torch.zeros(2, N, 24, dtype=torch.double)
    mask = torch.zeros(2, N, dtype=torch.bool)
    for i, (xi, is_left) in enumerate(zip(xs, left, strict=True)):
        span = slice(N - xi.shape[1], N) if is_left else slice(0, xi.shape[1])
        x[i, span], mask[i, span] = xi[0], True
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # RoPE at each sequence's own positions
    out = layer(x, attention_mask=mask, position_ids=positions)
    for i, (xi, is_left) in enumerate(zip(xs, left, strict=True)):
        span = slice(N - xi.shape[1], N) if is_left else slice(0, xi.shape[1])
        torch.testing.assert_close(out[i, span], alone[i][0], atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------------------------------
# NaN and inf.
# ------------------------------------------------------------------------------------------

def nan_cases():
    cases = [("sliding_window", dict(sinks=s, causal=c)) for s in (0, 2) for c in (True, False)]
    for layout in ("band", "block"):
        for sinks in (0, 2):
            cases.append(("stochastic", dict(layout=layout, sinks=sinks, causal=True)))
            cases.append(("stochastic", dict(layout=layout, sinks=sinks, causal=False)))
        cases.append(("stochastic", dict(layout=layout, sinks=1, local=3)))
    cases.append(("sliding_window", dict(window=N)))  # the full-attention path
    return cases


def _nan_run(method, q, k, v, kpm, backend, kw, perm):
    kw = dict(kw)
    window = kw.pop("window", 4)
    if method == "sliding_window":
        return sa.sliding_window_attention(q, k, v, window, key_mask=kpm,
                                           backend=backend, **kw)
    return sa.stochastic_attention(q, k, v, window, perm=perm, key_mask=kpm,
                                   backend=backend, **kw)


def _padded_batch():
    q, k, v = random_qkv(N, batch=2, heads=4, kv_heads=2, dim=8, grad=False)
    kpm = torch.ones(2, N, dtype=torch.bool)
    kpm[0, :4] = False
    kpm[1, 10:] = False
    kpm[1, 6] = False  # a hole
    return q, k, v, kpm


def _poison(x, where, value):
    x = x.clone()
    x[where] = value
    return x


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("method,kw", nan_cases())
def test_nan_and_inf_in_padded_keys_and_values_change_nothing(method, kw, backend):
    q, k, v, kpm = _padded_batch()
    perm = routing_permutation(2, 1, N, key_mask=kpm,
                               generator=torch.Generator().manual_seed(1))
    clean = _nan_run(method, q, k, v, kpm, backend, kw, perm)
    pad = ~kpm[:, None, :, None].expand_as(k)
    for value in (float("nan"), float("inf"), float("-inf")):
        out = _nan_run(method, q, k.masked_fill(pad, value), v.masked_fill(pad, value), kpm,
                       backend, kw, perm)
        torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("method,kw", nan_cases())
@pytest.mark.parametrize("padded", [False, True])
def test_nan_in_a_real_key_reaches_exactly_the_queries_that_see_it(method, kw, backend, padded):
    q, k, v, kpm = _padded_batch()
    kpm = kpm if padded else None
    perm = routing_permutation(2, 1, N, key_mask=kpm,
                               generator=torch.Generator().manual_seed(1))
    kw2 = dict(kw)
    window = kw2.pop("window", 4)
    mask = dense_mask(N, window, perm=None if method == "sliding_window" else perm,
                      layout=kw2.get("layout", "band"), causal=kw2.get("causal", True),
                      sinks=kw2.get("sinks", 0), key_mask=kpm, local=kw2.get("local", 0))
    for b, j in ((0, 8), (1, 2), (0, 4)):  # (sample, key position): a real key in every case
        bad = _nan_run(method, q, _poison(k, (b, 1, j, 0), float("nan")), v, kpm, backend, kw,
                       perm)
        got = torch.isnan(bad).any(-1)  # [B, H, n]
        want = torch.zeros_like(got)
        want[b, 2:4] = mask.expand(2, 4, N, N)[b, 2:4, :, j]  # kv head 1 serves query heads 2, 3
        assert torch.equal(got, want)


@pytest.mark.parametrize("fn", [moba.moba_attention, moba.moba_masked])
def test_moba_nan_padding_changes_nothing_and_real_nan_reaches_its_readers(fn):
    q, k, v, kpm = _padded_batch()
    clean = fn(q, k, v, 3, 2, sinks=1, key_mask=kpm)
    pad = ~kpm[:, None, :, None].expand_as(k)
    out = fn(q, k.masked_fill(pad, float("nan")), v.masked_fill(pad, float("inf")), 3, 2,
             sinks=1, key_mask=kpm)
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-6)
    # A NaN real key: the queries that read it (by MoBA's own routing on those inputs) get NaN.
    bad_k = _poison(k, (0, 1, 5, 0), float("nan"))
    bad = fn(q, bad_k, v, 3, 2, sinks=1)
    chosen = moba.chosen_blocks(q, bad_k, 3, 2, None)
    rows = torch.arange(N)
    vis = moba._visible(chosen, rows, N, 3, 1, None)  # [B, Hq, n, n]
    want = torch.zeros(2, 4, N, dtype=torch.bool)
    want[0, 2:4] = vis[0, 2:4, :, 5]
    assert torch.equal(torch.isnan(bad).any(-1), want)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_fractional_nan_padding_changes_nothing(backend):
    q, k, v, kpm = _padded_batch()
    perm = routing_permutation(2, 4, N, key_mask=kpm,
                               generator=torch.Generator().manual_seed(1))
    kw = dict(window=4, perm=perm, causal=True, key_mask=kpm, backend=backend)
    clean = fractional.fractional_attention(q, k, v, 1.2, **kw)
    pad = ~kpm[:, None, :, None].expand_as(k)
    out = fractional.fractional_attention(q, k.masked_fill(pad, float("nan")),
                                          v.masked_fill(pad, float("nan")), 1.2, **kw)
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-6)


def test_layer_decoding_keeps_the_first_real_tokens_as_sinks():
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 4, num_kv_heads=2, method="sliding_window",
                               options=dict(window=3, sinks=2)).double()
    layer.eval()
    x = torch.randn(2, 12, 24, dtype=torch.double)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False
    full = layer(x, attention_mask=mask)
    cache = KVCache()
    steps = [layer(x[:, :6], cache=cache, attention_mask=mask[:, :6])]
    steps += [layer(x[:, i:i + 1], cache=cache, attention_mask=mask[:, :i + 1])
              for i in range(6, 12)]
    torch.testing.assert_close(torch.cat(steps, 1)[1, 4:], full[1, 4:])


def test_bigbird_sinks_are_the_first_real_tokens():
    from stochastic_attention.ops import bigbird

    kpm = torch.tensor([[False, False, False, True, True, True, True, True, True, True]])
    idx = torch.full((1, 1, 10, 1), -1)
    idx[0, 0, 9, 0] = 4  # one random key for the last query: position 4 (window 2 ends at 8)
    mask = bigbird.bigbird_mask(10, 2, idx, sinks=2, key_mask=kpm)[0, 0]
    assert mask[9].nonzero().flatten().tolist() == [3, 4, 8, 9]
    counts = bigbird.bigbird_attended_keys(10, 2, 1, 2, idx, key_mask=kpm)
    assert torch.equal(counts[0, 0], mask.sum(-1))



@pytest.mark.parametrize("left", PAD_LAYOUTS)
@pytest.mark.parametrize("random_keys,sinks", [(0, 2), (3, 0), (2, 1)])
def test_bigbird_output_does_not_depend_on_padding(random_keys, sinks, left):
    from stochastic_attention.ops import bigbird

    seqs = sequences()

    def run(q, k, v, kpm=None):
        return bigbird.bigbird_attention(q, k, v, 3, random_keys, sinks=sinks,
                                         key_mask=kpm,
                                         generator=torch.Generator().manual_seed(5))

    alone = [run(*s) for s in seqs]
    q, k, v, kpm, spans = _pad_inputs(seqs, left)
    out = run(q, k, v, kpm)
    for i, span in enumerate(spans):
        torch.testing.assert_close(out[i, :, span], alone[i][0], atol=1e-5, rtol=1e-5)
