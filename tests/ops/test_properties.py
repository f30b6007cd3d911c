"""Property-based tests: random shapes, windows, sinks, padding and permutations against the
dense reference, and random bad inputs that must raise ValueError or TypeError only."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stochastic_attention as sa
from stochastic_attention.nn import MultiHeadAttention
from stochastic_attention.nn.options import options_for

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def problems(draw, max_n=40):
    """q, k, v, a key padding mask (or None) and the sizes they were drawn with."""
    n = draw(st.integers(1, max_n))
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 2))
    dim = draw(st.sampled_from([2, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=g)
    k = torch.randn(batch, kv_heads, n, dim, generator=g)
    v = torch.randn(batch, kv_heads, n, dim, generator=g)
    kind = draw(st.sampled_from(["none", "left", "right", "random"]))
    kpm = None
    if kind != "none":
        kpm = torch.ones(batch, n, dtype=torch.bool)
        for b in range(batch):
            real = draw(st.integers(1, n))
            if kind == "left":
                kpm[b, : n - real] = False
            elif kind == "right":
                kpm[b, real:] = False
            else:
                kpm[b] = torch.rand(n, generator=g) < 0.6
                kpm[b, draw(st.integers(0, n - 1))] = True  # at least one real token
    return q, k, v, kpm, seed


def perms(draw, batch, heads, n, seed):
    kind = draw(st.sampled_from(["drawn", "seq", "batch", "batch_heads"]))
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "drawn":
        return None, g
    shape = {"seq": (1, 1), "batch": (batch, 1), "batch_heads": (batch, heads)}[kind]
    perm = sa.random_permutation(*shape, n, generator=g)
    return (perm[0, 0] if kind == "seq" else perm[:, 0] if kind == "batch" else perm), None


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@SETTINGS
@given(problem=problems(), window=st.integers(1, 45), sinks=st.integers(0, 4),
       causal=st.booleans())
def test_sliding_window_blocked_matches_reference(problem, window, sinks, causal):
    q, k, v, kpm, _ = problem
    kw = dict(causal=causal, sinks=sinks, key_mask=kpm)
    close(sa.sliding_window_attention(q, k, v, window, backend="blocked", **kw),
          sa.sliding_window_attention(q, k, v, window, backend="reference", **kw))


@SETTINGS
@given(data=st.data(), problem=problems(), window=st.integers(1, 45), sinks=st.integers(0, 4),
       layout=st.sampled_from(["band", "block"]), causal=st.booleans(),
       local=st.integers(0, 6))
def test_stochastic_blocked_matches_reference(data, problem, window, sinks, layout, causal,
                                              local):
    q, k, v, kpm, seed = problem
    local = local if causal else 0
    perm, g = perms(data.draw, q.shape[0], q.shape[1], q.shape[2], seed)
    kw = dict(perm=perm, causal=causal, sinks=sinks, layout=layout, local=local,
              key_mask=kpm)
    fast = sa.stochastic_attention(q, k, v, window, backend="blocked",
                                   generator=g, **kw)
    if g is not None:
        g.manual_seed(seed + 1)  # the same draw for the reference
    slow = sa.stochastic_attention(q, k, v, window, backend="reference", generator=g, **kw)
    close(fast, slow)


@SETTINGS
@given(problem=problems(max_n=24), window=st.integers(1, 30),
       method=st.sampled_from(["sliding_window", "stochastic", "gated", "full"]),
       sinks=st.integers(0, 3), layout=st.sampled_from(["band", "block"]), per_head=st.booleans())
def test_layer_blocked_matches_reference(problem, window, method, sinks, layout, per_head):
    q, _, _, kpm, seed = problem
    B, n = q.shape[0], q.shape[2]
    layers = []
    for backend in ("blocked", "reference"):
        torch.manual_seed(seed)
        # each method takes the options it has, as SALlamaConfig's layers do
        options = options_for(method, dict(window=window, sinks=sinks, layout=layout,
                                           perm_per_head=per_head))
        layers.append(MultiHeadAttention(16, 4, num_kv_heads=2, method=method, options=options,
                                         backend=backend).eval())
    x = torch.randn(B, n, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        close(layers[0](x, attention_mask=kpm), layers[1](x, attention_mask=kpm))


# ------------------------------------------------------------------------------------------
# Bad inputs: ValueError or TypeError, never anything else.
# ------------------------------------------------------------------------------------------

BAD = (ValueError, TypeError)


@SETTINGS
@given(ndim=st.sampled_from([0, 1, 2, 3, 5]), which=st.sampled_from(["q", "k", "v"]))
def test_wrong_ndim_raises(ndim, which):
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    bad = torch.randn([3] * ndim)
    args = {"q": q, "k": k, "v": v, which: bad}
    with pytest.raises(BAD):
        sa.stochastic_attention(args["q"], args["k"], args["v"], 2)
    with pytest.raises(BAD):
        sa.sliding_window_attention(args["q"], args["k"], args["v"], 2)


@SETTINGS
@given(n=st.integers(2, 20), data=st.data())
def test_non_permutation_perm_raises(n, data):
    q = torch.randn(1, 2, n, 4)
    values = data.draw(st.lists(st.integers(-2, n + 2), min_size=n, max_size=n))
    perm = torch.tensor(values)
    if sorted(values) == list(range(n)):
        perm[0] = perm[1]  # a repeat: never a permutation
    with pytest.raises(BAD):
        sa.stochastic_attention(q, q, q, 2, perm=perm)
    short = torch.arange(data.draw(st.integers(0, n - 1)))
    with pytest.raises(BAD):
        sa.stochastic_attention(q, q, q, 2, perm=short)


@SETTINGS
@given(window=st.one_of(st.integers(-10, 0), st.booleans(), st.floats(allow_nan=True),
                        st.text(max_size=3), st.none()))
def test_bad_window_raises(window):
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(BAD):
        sa.sliding_window_attention(q, q, q, window)
    with pytest.raises(BAD):
        sa.stochastic_attention(q, q, q, window)


@SETTINGS
@given(name=st.text(max_size=8).filter(lambda s: s not in ("band", "block")),
       backend=st.text(max_size=8).filter(lambda s: s not in sa.functional.BACKENDS))
def test_unknown_layout_or_backend_raises(name, backend):
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(BAD):
        sa.stochastic_attention(q, q, q, 2, layout=name)
    with pytest.raises(BAD):
        sa.stochastic_attention(q, q, q, 2, backend=backend)
    with pytest.raises(BAD):
        MultiHeadAttention(8, 2, method="stochastic", options={"layout": name})
    with pytest.raises(BAD):
        MultiHeadAttention(8, 2, method="stochastic", backend=backend)
