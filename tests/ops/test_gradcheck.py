"""torch.autograd.gradcheck in float64 for every CPU backend with autograd and every option."""

from __future__ import annotations

import pytest
import torch

import stochastic_attention as sa
from stochastic_attention.ops import fractional, moba

N, D = 7, 3


def inputs(heads=2, kv_heads=1, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, n, D, generator=g, dtype=torch.float64, requires_grad=True)
                 for h in (heads, kv_heads, kv_heads))


def padding(n=N):
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[0, :2] = False  # left
    kpm[1, n - 2:] = False  # right
    return kpm


def check(fn, tensors):
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5, rtol=1e-4)


OPTIONS = [
    dict(layout="band"),
    dict(layout="block"),
    dict(layout="band", causal=False),
    dict(layout="band", sinks=2),
    dict(layout="block", sinks=1, pad=True),
    dict(layout="band", pad=True),
    dict(layout="band", local=2),
    dict(layout="block", local=2, sinks=1, pad=True),
    dict(layout="band", per_head=True, sinks=1),
    dict(layout="band", per_head=True, pad=True),
]


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_gradcheck_stochastic_attention(backend, opts):
    opts = dict(opts)
    kpm = padding() if opts.pop("pad", False) else None
    heads = 2 if opts.pop("per_head", False) else 1
    perm = sa.random_permutation(2, heads, N, generator=torch.Generator().manual_seed(1))
    check(lambda q, k, v: sa.stochastic_attention(q, k, v, 3, perm=perm, key_mask=kpm,
                                                  backend=backend, **opts), inputs())


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("sinks,pad,causal", [(0, False, True), (2, True, True), (1, True, False),
                                               (0, False, False)])
def test_gradcheck_sliding_window(backend, sinks, pad, causal):
    kpm = padding() if pad else None
    check(lambda q, k, v: sa.sliding_window_attention(q, k, v, 3, sinks=sinks, causal=causal,
                                                      key_mask=kpm, backend=backend),
          inputs())


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_gradcheck_full_attention_path(backend):
    check(lambda q, k, v: sa.sliding_window_attention(q, k, v, N, key_mask=padding(),
                                                      backend=backend), inputs())


@pytest.mark.parametrize("fn", [moba.moba_attention, moba.moba_masked])
@pytest.mark.parametrize("sinks,pad", [(0, False), (1, True)])
def test_gradcheck_moba(fn, sinks, pad):
    kpm = padding() if pad else None
    check(lambda q, k, v: fn(q, k, v, 2, 2, sinks=sinks, key_mask=kpm), inputs())


@pytest.mark.parametrize("backend", ["reference", "blocked", "chunked"])
@pytest.mark.parametrize("alpha", [1.2, 2.0])
def test_gradcheck_fractional(backend, alpha):
    kpm = padding()
    if backend == "chunked":
        kw = dict(causal=True, key_mask=kpm)
    else:
        perm = sa.random_permutation(2, 2, N, generator=torch.Generator().manual_seed(2))
        kw = dict(causal=True, key_mask=kpm, window=3, perm=perm)
    check(lambda q, k, v: fractional.fractional_attention(q, k, v, alpha, backend=backend, **kw),
          inputs())


@pytest.mark.parametrize("method,options", [
    ("stochastic", dict(window=3, sinks=1, layout="block")), ("gated", dict(window=3)),
    ("sliding_window", dict(window=3, sinks=1)), ("moba", dict(block_size=2))])
def test_gradcheck_layer(method, options):
    from stochastic_attention.nn import MultiHeadAttention

    torch.manual_seed(0)
    layer = MultiHeadAttention(8, 2, num_kv_heads=1, method=method,
                               options=options).double().eval()
    x = torch.randn(2, N, 8, dtype=torch.float64, requires_grad=True)
    check(lambda x: layer(x, attention_mask=padding()), (x,))
