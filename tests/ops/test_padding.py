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
from stochastic_attention.ops.reference import masked_attention
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


# ------------------------------------------------------------------------------------------
# Rows the window covers. A row whose real length is <= window is full attention over its real
# tokens: alone (where window >= seq_len) and padded to any longer length alike.
# ------------------------------------------------------------------------------------------

W = 5  # the window (MoBA: the block size)
PAD_N = 9  # the padded length: longer than the window
SHORT = (1, 4, 5, 6, 0)  # real lengths: covered by the window (1, 4, 5), just above, padding only
SIDES = [("left", "right", "left", "right", "left"), ("right", "left", "right", "left", "right")]


def short_sequences(heads=4, kv_heads=2, dim=8, dtype=torch.double, seed=21, grad=True):
    """Leaf tensors (q, k, v) [1, H, r, D] for every length of SHORT."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, h, r, dim, generator=g, dtype=dtype).requires_grad_(grad)
             for h in (heads, kv_heads, kv_heads)] for r in SHORT]


def padded_batch(seqs, sides, n=PAD_N):
    """The sequences padded (``sides``) to n, differentiably, with junk in the padding:
    (q, k, v, key_mask, spans)."""
    spans = [slice(n - s[0].shape[2], n) if side == "left" else slice(0, s[0].shape[2])
             for s, side in zip(seqs, sides, strict=True)]
    mask = torch.zeros(len(seqs), n, dtype=torch.bool)
    for b, span in enumerate(spans):
        mask[b, span] = True
    junk = torch.Generator().manual_seed(5)
    tensors = []
    for i in range(3):
        rows = [torch.nn.functional.pad(s[i], (0, 0, span.start, n - span.stop))
                for s, span in zip(seqs, spans, strict=True)]
        filler = torch.randn(len(seqs), *rows[0].shape[1:], generator=junk, dtype=rows[0].dtype)
        tensors.append(torch.where(mask[:, None, :, None], torch.cat(rows), 3 * filler))
    return (*tensors, mask, spans)


def assert_alone_equals_padded(fn, sides, *, grads=True, dtype=torch.double, tol=1e-10):
    """``fn(q, k, v, key_mask)`` on each sequence alone (no mask) and in a padded batch: the
    same outputs on the real tokens and the same gradients; a row of padding only gives zeros."""
    seqs = short_sequences(dtype=dtype, grad=grads)
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(s[0].shape, generator=g, dtype=dtype) for s in seqs]
    leaves = [x for s in seqs if s[0].shape[2] for x in s]
    q, k, v, mask, spans = padded_batch(seqs, sides)
    out = fn(q, k, v, mask)
    alone = [fn(*s, None) if s[0].shape[2] else None for s in seqs]
    assert torch.isfinite(out).all()
    for b, (want, span) in enumerate(zip(alone, spans, strict=True)):
        if want is None:  # a row of padding only: no query sees a key
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        torch.testing.assert_close(out[b:b + 1, :, span], want, atol=tol, rtol=tol,
                                   msg=lambda m, r=want.shape[2]: f"length {r}: {m}")
    if not grads:
        return
    loss_padded = sum((out[b:b + 1, :, span] * w).sum()
                      for b, (span, w) in enumerate(zip(spans, weights, strict=True)))
    loss_alone = sum((a * w).sum() for a, w in zip(alone, weights, strict=True) if a is not None)
    got = torch.autograd.grad(loss_padded, leaves)
    want = torch.autograd.grad(loss_alone, leaves)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, i=i: f"grad {i}: {m}")


def short_op_cases():
    cases = [("sliding_window", dict(causal=c, sinks=s)) for c in (True, False) for s in (0, 2)]
    for layout in ("band", "block"):
        for causal in (True, False):
            for sinks in (0, 2):
                cases.append(("stochastic", dict(layout=layout, causal=causal, sinks=sinks)))
            cases.append(("stochastic", dict(layout=layout, causal=causal, sinks=1,
                                             per_head=True)))
        cases.append(("stochastic", dict(layout=layout, local=2, sinks=1)))
        cases.append(("stochastic", dict(layout=layout, local=2, per_head=True)))
    cases.append(("stochastic", dict(window=3, local=W, sinks=1)))  # the local window covers
    return cases


def short_op(method, kw, backend):
    kw = dict(kw)
    window = kw.pop("window", W)
    per_head = kw.pop("per_head", False)

    def fn(q, k, v, key_mask):
        if method == "sliding_window":
            return sa.sliding_window_attention(q, k, v, window, key_mask=key_mask,
                                               backend=backend, **kw)
        g = torch.Generator().manual_seed(3)
        perm = None
        if per_head:  # one routing per head, drawn over each row's real tokens
            perm = routing_permutation(q.shape[0], q.shape[1], q.shape[2], key_mask=key_mask,
                                       generator=g)
        return sa.stochastic_attention(q, k, v, window, perm=perm, generator=g,
                                       key_mask=key_mask, backend=backend, **kw)
    return fn


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("method,kw", short_op_cases())
def test_a_row_the_window_covers_is_full_attention_alone_or_padded(method, kw, backend, sides):
    assert_alone_equals_padded(short_op(method, kw, backend), sides)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("method,kw", [
    ("sliding_window", dict(causal=False, sinks=0)),
    ("stochastic", dict(layout="band", causal=True, sinks=2)),
    ("stochastic", dict(layout="band", causal=False, sinks=0, per_head=True)),
    ("stochastic", dict(layout="block", causal=True, sinks=1)),
])
def test_a_row_the_window_covers_on_the_flex_backend(method, kw, sides):
    from stochastic_attention.ops import flex

    if not flex.available():
        pytest.skip("this PyTorch has no FlexAttention")
    # PyTorch has no FlexAttention backward on CPU: inference, float32
    assert_alone_equals_padded(short_op(method, kw, "flex"), sides, grads=False,
                               dtype=torch.float32, tol=1e-5)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("fn", [moba.moba_attention, moba.moba_masked, moba.moba_reference])
@pytest.mark.parametrize("sinks", [0, 2])
def test_moba_row_one_block_covers_alone_or_padded(fn, sinks, sides):
    assert_alone_equals_padded(
        lambda q, k, v, key_mask: fn(q, k, v, W, 2, sinks=sinks, key_mask=key_mask), sides)


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("random_keys,sinks", [(2, 0), (3, 1)])
def test_bigbird_row_the_window_covers_alone_or_padded(random_keys, sinks, reference, sides):
    from stochastic_attention.ops import bigbird

    op = bigbird.bigbird_reference if reference else bigbird.bigbird_attention

    def fn(q, k, v, key_mask):
        return op(q, k, v, W, random_keys, sinks=sinks, key_mask=key_mask,
                  generator=torch.Generator().manual_seed(4))
    assert_alone_equals_padded(fn, sides)


FRACTIONAL_SHORT = [(layout, causal, routing) for causal in (True, False)
                    for layout, routing in (("band", None), ("band", "shared"),
                                            ("band", "per_head"), ("block", "shared"),
                                            ("block", "per_head"))]


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("layout,causal,routing", FRACTIONAL_SHORT)
def test_fractional_row_the_window_covers_alone_or_padded(layout, causal, routing, backend,
                                                          sides):
    def fn(q, k, v, key_mask):
        perm = None
        if routing is not None:
            heads = q.shape[1] if routing == "per_head" else 1
            perm = routing_permutation(q.shape[0], heads, q.shape[2], key_mask=key_mask,
                                       generator=torch.Generator().manual_seed(6))
        return fractional.fractional_attention(q, k, v, 1.2, window=W, perm=perm, layout=layout,
                                               causal=causal, key_mask=key_mask,
                                               backend=backend)
    assert_alone_equals_padded(fn, sides)


def holey_batch():
    """[5, n = 12] key mask: rows the window (W) covers with holes, left-padded, of padding only,
    exactly W real tokens with holes, and a longer row with holes."""
    rows = [[1, 4, 9], [8, 9, 10, 11], [], [0, 2, 5, 7, 11], [0, 1, 3, 4, 6, 7, 9, 11]]
    mask = torch.zeros(len(rows), 12, dtype=torch.bool)
    for b, real in enumerate(rows):
        mask[b, real] = True
    return mask


def covered_oracle(q, k, v, key_mask, causal, scale):
    """Every query against every real key of its row (causal: not after it), one softmax."""
    n = q.shape[2]
    mask = key_mask[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
    groups = q.shape[1] // k.shape[1]
    return masked_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                            mask, scale)


HOLEY_CASES = [
    dict(perm=None, causal=True, sinks=0), dict(perm=None, causal=False, sinks=2),
    dict(perm="shared", layout="band", causal=True, sinks=1),
    dict(perm="per_head", layout="band", causal=False, sinks=0),
    dict(perm="shared", layout="block", causal=False, sinks=2),
    dict(perm="per_head", layout="block", causal=True, sinks=0),
    dict(perm="shared", layout="band", causal=True, sinks=1, local=2),
    dict(perm="per_head", layout="block", causal=True, sinks=0, local=3),
]


@pytest.mark.parametrize("case", HOLEY_CASES)
def test_the_rule_holds_in_every_backend_for_covered_rows_with_holes(case):
    """The reference encodes the rule (covered rows equal an independent dense oracle), the
    blocked backend equals the reference with gradients, flex in inference, and the budget
    counts exactly the reference's keys."""
    key_mask = holey_batch()
    B, n = key_mask.shape
    q, k, v = random_qkv(n, batch=B, heads=4, kv_heads=2, dim=8, dtype=torch.double, seed=3)
    kw = {"layout": "band", "local": 0, **case}
    kind = kw.pop("perm")
    heads = 4 if kind == "per_head" else 1
    perm = (None if kind is None else
            routing_permutation(B, heads, n, key_mask=key_mask,
                                generator=torch.Generator().manual_seed(2)))
    args = dict(perm=perm, key_mask=key_mask, scale=0.4, **kw)
    from stochastic_attention.ops import blocked, flex, reference

    def grads(fn):
        out = fn(q, k, v, W, **args)
        return out, torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v))

    ref, ref_grads = grads(reference.attention)
    covered = key_mask.sum(-1) <= W
    oracle = covered_oracle(q, k, v, key_mask, kw["causal"], 0.4)
    torch.testing.assert_close(ref[covered], oracle[covered], atol=1e-12, rtol=1e-12)
    out, out_grads = grads(blocked.attention)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(out_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if flex.available() and not kw["local"]:
        with torch.no_grad():
            got = flex.attention(*(x.detach().float() for x in (q, k, v)), W, **args)
        torch.testing.assert_close(got, ref.detach().float(), atol=1e-5, rtol=1e-5)
    mask = dense_mask(n, W, perm=perm, layout=kw["layout"], causal=kw["causal"],
                      sinks=kw["sinks"], key_mask=key_mask, local=kw["local"])
    method = "sliding_window" if perm is None else "stochastic"
    counts = sa.attended_keys(n, W, method=method, perm=perm, layout=kw["layout"],
                              causal=kw["causal"], sinks=kw["sinks"], key_mask=key_mask,
                              local=kw["local"])
    assert torch.equal(counts, mask.expand(B, counts.shape[1], n, n).sum(-1))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("routing", [None, "per_head"])
def test_fractional_and_bigbird_follow_the_rule_for_covered_rows_with_holes(causal, routing):
    from stochastic_attention.ops import bigbird

    key_mask = holey_batch()
    B, n = key_mask.shape
    q, k, v = random_qkv(n, batch=B, heads=4, kv_heads=2, dim=8, dtype=torch.double, seed=4)
    perm = (None if routing is None else
            routing_permutation(B, 4, n, key_mask=key_mask,
                                generator=torch.Generator().manual_seed(1)))
    covered = key_mask.sum(-1) <= W
    weights = fractional.fractional_weights(q, k, 1.2, causal=causal, key_mask=key_mask,
                                            window=W, perm=perm)
    full = fractional.fractional_weights(q, k, 1.2, causal=causal, key_mask=key_mask)
    torch.testing.assert_close(weights[covered], full[covered], atol=1e-12, rtol=1e-12)

    def fna(backend):
        out = fractional.fractional_attention(q, k, v, 1.2, causal=causal, key_mask=key_mask,
                                              window=W, perm=perm, backend=backend)
        return out, torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v))

    (out, g_out), (ref, g_ref) = fna("blocked"), fna("reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    if not causal:
        return
    idx = bigbird.bigbird_indices(B, 1, n, W, 2, sinks=1, key_mask=key_mask,
                                  generator=torch.Generator().manual_seed(0))
    mask = bigbird.bigbird_mask(n, W, idx, sinks=1, key_mask=key_mask)
    full_causal = key_mask[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(mask[covered], full_causal.expand_as(mask)[covered])
    assert torch.equal(bigbird.bigbird_attended_keys(n, W, 2, 1, idx, key_mask=key_mask),
                       mask.sum(-1))
    got = bigbird.bigbird_attention(q, k, v, W, 2, sinks=1, key_mask=key_mask, indices=idx)
    want = bigbird.bigbird_reference(q, k, v, W, 2, sinks=1, key_mask=key_mask, indices=idx)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


SHORT_LAYER_CASES = [
    ("sliding_window", dict(window=W, sinks=2)),
    ("stochastic", dict(window=W)),
    ("stochastic", dict(window=W, layout="block", sinks=2)),
    ("stochastic", dict(window=W, perm_per_head=True, sinks=1)),
    ("gated", dict(window=W, sinks=1)),
    ("stochastic_local", dict(window=W, local=2, sinks=1)),
    ("bigbird", dict(window=W, random_keys=3, sinks=1)),
    ("moba", dict(block_size=W, top_k=2, sinks=1)),
    ("fractional", dict(window=W, windows="stochastic", alpha=1.2)),
    ("fractional", dict(window=W, alpha=1.2)),
]


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("method,options", SHORT_LAYER_CASES)
def test_layer_row_the_window_covers_alone_or_padded(method, options, sides):
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 4, num_kv_heads=2, method=method,
                               options=options).double().eval()
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(1, r, 24, generator=g, dtype=torch.double).requires_grad_()
          for r in SHORT]
    x = torch.randn(len(SHORT), PAD_N, 24, generator=g, dtype=torch.double)  # junk padding
    mask = torch.zeros(len(SHORT), PAD_N, dtype=torch.bool)
    spans = []
    for b, (xb, side) in enumerate(zip(xs, sides, strict=True)):
        r = xb.shape[1]
        spans.append(slice(PAD_N - r, PAD_N) if side == "left" else slice(0, r))
        mask[b, spans[-1]] = True
    x = torch.where(mask[..., None], torch.cat([
        torch.nn.functional.pad(xb, (0, 0, s.start, PAD_N - s.stop)) for xb, s in zip(xs, spans)]),
        x)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # RoPE at each sequence's positions
    out = layer(x, attention_mask=mask, position_ids=positions)
    assert torch.isfinite(out).all()
    weights = [torch.randn(xb.shape, generator=g, dtype=torch.double) for xb in xs]
    loss_padded, loss_alone, leaves = 0.0, 0.0, []
    for b, (xb, span, w) in enumerate(zip(xs, spans, weights, strict=True)):
        if xb.shape[1] == 0:
            continue
        want = layer(xb)
        torch.testing.assert_close(out[b:b + 1, span], want, atol=1e-10, rtol=1e-10)
        loss_padded = loss_padded + (out[b:b + 1, span] * w).sum()
        loss_alone = loss_alone + (want * w).sum()
        leaves.append(xb)
    for got, want in zip(torch.autograd.grad(loss_padded, leaves),
                         torch.autograd.grad(loss_alone, leaves), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


SHORT_MODEL_CASES = [
    ("sliding_window", dict(window=W)),
    ("stochastic", dict(window=W)),
    ("stochastic", dict(window=W, layout="block", sinks=1)),
    ("stochastic_local", dict(window=W, local=2)),
    ("gated", dict(window=W, sinks=1)),
    ("bigbird", dict(window=W, random_keys=2)),
    ("moba", dict(block_size=W, top_k=2)),
    ("fractional", dict(window=W, windows="stochastic")),
]


@pytest.mark.parametrize("sides", SIDES)
@pytest.mark.parametrize("method,options", SHORT_MODEL_CASES)
def test_sa_llama_row_the_window_covers_alone_or_padded(method, options, sides):
    from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM

    torch.manual_seed(0)
    config = SALlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           attention_methods=method, attention_options=options, eos_token_id=0)
    model = SALlamaForCausalLM(config).double().eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 40, (1, r), generator=g) for r in SHORT]
    ids = torch.randint(1, 40, (len(SHORT), PAD_N), generator=g)  # junk under the padding
    mask = torch.zeros(len(SHORT), PAD_N, dtype=torch.long)
    spans = []
    for b, (s, side) in enumerate(zip(seqs, sides, strict=True)):
        r = s.shape[1]
        spans.append(slice(PAD_N - r, PAD_N) if side == "left" else slice(0, r))
        ids[b, spans[-1]], mask[b, spans[-1]] = s[0], 1
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
    weights = torch.randn(logits.shape, generator=g, dtype=torch.double)
    loss_padded, loss_alone = 0.0, 0.0
    for b, (s, span) in enumerate(zip(seqs, spans, strict=True)):
        if s.shape[1] == 0:
            continue
        want = model(input_ids=s).logits
        torch.testing.assert_close(logits[b:b + 1, span], want, atol=1e-10, rtol=1e-10)
        loss_padded = loss_padded + (logits[b, span] * weights[b, span]).sum()
        loss_alone = loss_alone + (want[0] * weights[b, span]).sum()
    for got, want in zip(torch.autograd.grad(loss_padded, params),
                         torch.autograd.grad(loss_alone, params), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
