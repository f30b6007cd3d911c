"""The operator contract: one backend signature, every backend equal to the reference on awkward
shapes, the public operators' shared validation and keywords, and the composed operators (ensemble,
head split, cached decoding, budgets) against slow dense references."""

from __future__ import annotations

import inspect
import itertools
from functools import partial

import pytest
import torch

import stochastic_attention as sa
from stochastic_attention.ops import bigbird, blocked, dense, flex, fractional, moba, reference
from stochastic_attention.ops.budget import attended_keys, ensemble_attended_keys
from stochastic_attention.ops.compose import ensemble_attention, head_split_attention
from stochastic_attention.ops.decode import cached_attention
from stochastic_attention.ops.patterns import dense_mask, visible_keys
from stochastic_attention.ops.permute import random_permutation, routing_permutation
from stochastic_attention.ops.validate import check_bool, check_int
from stochastic_attention.testing import assert_matches_reference, outputs_and_grads, random_qkv

BACKEND_MODULES = (reference, blocked, flex)
CONTRACT = ("q", "k", "v", "window", "perm", "layout", "causal", "sinks", "key_mask", "scale",
            "local")
TOL = dict(atol=1e-5, grad_atol=1e-5, rtol=1e-5)  # outputs and gradients


def make(B, Hq, Hkv, n, D=8, seed=0, device="cpu"):
    return random_qkv(n, batch=B, heads=Hq, kv_heads=Hkv, dim=D, seed=seed, device=device)


def pad_mask(kind, B, n, seed=0):
    if kind is None:
        return None
    mask = torch.ones(B, n, dtype=torch.bool)
    if kind == "left":
        mask[-1, : n // 2] = False
    elif kind == "right":
        mask[0, n - n // 3:] = False
    else:  # random holes, and one row with no real token at all
        mask = torch.rand(B, n, generator=torch.Generator().manual_seed(seed)) < 0.6
        mask[0] = False
    return mask


# ----------------------------------------------------------------------------------------------
# One signature, every backend equal to the reference.
# ----------------------------------------------------------------------------------------------


def test_every_backend_exposes_one_attention_signature():
    signatures = [inspect.signature(module.attention) for module in BACKEND_MODULES]
    assert all(s == signatures[0] for s in signatures), signatures
    params = signatures[0].parameters
    assert tuple(params) == CONTRACT
    assert [p.kind for p in params.values()][4:] == [inspect.Parameter.KEYWORD_ONLY] * 7
    assert all(p.default is inspect.Parameter.empty for p in params.values())
    assert signatures[0].return_annotation in (torch.Tensor, "torch.Tensor")
    assert set(sa.functional.BACKEND_MODULES) == set(sa.BACKENDS) - {"auto"}


# n = 1, odd lengths, a window covering the sequence, GQA with 1 and 2 kv heads, every padding
# (including a row with no real token), sinks, both layouts, the local union, per-head routings.
AWKWARD = [
    # n, window, Hq, Hkv, pad, sinks, layout, causal, local, perm kind
    (1, 4, 2, 1, None, 0, "band", True, 0, "shared"),
    (1, 1, 3, 3, "random", 2, "block", False, 0, None),
    (7, 3, 4, 2, "left", 2, "band", True, 0, None),
    (7, 3, 4, 2, None, 0, "block", True, 0, "shared"),
    (13, 4, 3, 1, "random", 3, "block", False, 0, "per_head"),
    (13, 5, 4, 2, "right", 0, "band", False, 0, "per_head"),
    (33, 4, 4, 2, "left", 3, "band", True, 5, "shared"),
    (33, 6, 4, 1, "random", 2, "block", True, 3, "per_head"),
    (33, 40, 2, 2, "right", 1, "band", True, 0, "shared"),
    (40, 4, 4, 2, None, 2, "band", True, 13, "shared"),
    (40, 7, 4, 2, None, 0, "block", True, 2, "per_head"),
    (21, 4, 2, 1, None, 0, "band", True, 21, "shared"),
]


def contract_args(case, device="cpu"):
    n, window, hq, hkv, pad, sinks, layout, causal, local, perm_kind = case
    B = 3 if pad == "random" else 2
    perm = key_mask = None
    if perm_kind is not None:
        heads = hq if perm_kind == "per_head" else 1
        perm = random_permutation(B, heads, n, generator=torch.Generator().manual_seed(n)).to(device)
    if pad is not None:
        key_mask = pad_mask(pad, B, n, seed=n).to(device)
    kw = dict(perm=perm, layout=layout, causal=causal, sinks=sinks, key_mask=key_mask, scale=0.3,
              local=local)
    return make(B, hq, hkv, n, seed=n + window, device=device), window, kw


@pytest.mark.parametrize("case", AWKWARD)
def test_blocked_backend_equals_the_reference_with_gradients(case, device):
    (q, k, v), window, kw = contract_args(case, device)
    # assert_close fails on NaN, so a NaN output or gradient cannot pass either
    out = assert_matches_reference(blocked.attention, reference.attention, (q, k, v), window=window, **kw, **TOL)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("case", [AWKWARD[0], AWKWARD[2], AWKWARD[4]])
def test_flex_backend_equals_the_reference_in_inference(case):
    if not flex.available():
        pytest.skip("this PyTorch has no FlexAttention")
    (q, k, v), window, kw = contract_args(case)
    q, k, v = (x.detach() for x in (q, k, v))  # PyTorch has no FlexAttention backward on CPU
    with torch.no_grad():
        ref = reference.attention(q, k, v, window, **kw)
        got = flex.attention(q, k, v, window, **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_flex_backend_refuses_local_itself_and_through_the_resolver():
    (q, k, v), window, kw = contract_args(AWKWARD[6])
    with pytest.raises(ValueError, match="does not serve local"):
        flex.attention(q, k, v, window, **kw)
    with pytest.raises(ValueError, match="does not serve local"):
        sa.stochastic_attention(q, k, v, window, local=2, backend="flex")


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_the_public_operators_call_the_backend_with_validated_arguments(backend):
    (q, k, v), window, kw = contract_args(AWKWARD[7])
    module = sa.functional.BACKEND_MODULES[backend]
    direct = module.attention(q, k, v, window, **kw)
    public = sa.stochastic_attention(q, k, v, window, perm=kw["perm"], layout=kw["layout"],
                                     sinks=kw["sinks"], local=kw["local"], scale=0.3,
                                     key_mask=kw["key_mask"], backend=backend)
    assert torch.equal(direct, public)
    swa = sa.sliding_window_attention(q, k, v, window, sinks=2, key_mask=kw["key_mask"],
                                      scale=0.3, backend=backend)
    kw.update(perm=None, layout="band", local=0, sinks=2)
    assert torch.equal(swa, module.attention(q, k, v, window, **kw))


# ----------------------------------------------------------------------------------------------
# MoBA, fractional and BigBird: public operators with the shared validation and keywords.
# ----------------------------------------------------------------------------------------------

OPERATORS = {
    "moba_attention": lambda q, k, v, **kw: sa.moba_attention(q, k, v, 4, 2, **kw),
    "fractional_attention": lambda q, k, v, **kw: sa.fractional_attention(q, k, v, 1.2, **kw),
    "bigbird_attention": lambda q, k, v, **kw: sa.bigbird_attention(q, k, v, 3, 2, **kw),
}


def test_every_operator_is_exported_at_the_top_level():
    for name in ("sliding_window_attention", "stochastic_attention", "moba_attention",
                 "fractional_attention", "bigbird_attention", "attended_keys"):
        assert name in sa.__all__ and callable(getattr(sa, name))


@pytest.mark.parametrize("name", [*OPERATORS, "stochastic_attention", "sliding_window_attention"])
def test_operators_share_the_keyword_names(name):
    params = inspect.signature(getattr(sa, name)).parameters
    shared = {"causal", "scale", "key_mask"} | ({"sinks"} if name != "fractional_attention" else set())
    assert shared <= {p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("name", OPERATORS)
def test_bad_grouped_query_shapes_are_a_value_error_naming_the_heads(name):
    q = torch.randn(1, 2, 8, 4)
    k = torch.randn(1, 3, 8, 4)
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of the number of "
                                         r"key/value heads \(3\)"):
        OPERATORS[name](q, k, k)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        OPERATORS[name](q, torch.randn(1, 1, 8, 4), torch.randn(1, 2, 8, 4))
    with pytest.raises(ValueError, match="key_mask must have shape"):
        OPERATORS[name](q, q, q, key_mask=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="causal must be True or False"):
        OPERATORS[name](q, q, q, causal="yes")


@pytest.mark.parametrize("name", ["moba_attention", "bigbird_attention"])
def test_causal_only_operators_refuse_causal_false(name):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=f"{name} is causal only"):
        OPERATORS[name](q, q, q, causal=False)
    torch.manual_seed(0)  # BigBird draws its random keys from the global generator
    explicit = OPERATORS[name](q, q, q, causal=True)
    torch.manual_seed(0)
    torch.testing.assert_close(explicit, OPERATORS[name](q, q, q))


def test_moba_integer_arguments_are_checked_by_name():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        sa.moba_attention(q, q, q, 0, 2)
    with pytest.raises(TypeError, match="top_k must be an int"):
        sa.moba_attention(q, q, q, 4, 2.0)
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        moba.moba_reference(q, q, q, 4, 2, sinks=-1)


def test_check_int_and_check_bool():
    assert check_int("n", 3, 1) == 3 and check_int("n", -5) == -5
    with pytest.raises(TypeError, match="n must be an int \\(why\\), got True"):
        check_int("n", True, hint=" (why)")
    with pytest.raises(ValueError, match="n must be >= 2, got 1"):
        check_int("n", 1, 2)
    assert check_bool("flag", False) is False
    with pytest.raises(TypeError, match="flag must be True or False, got 1"):
        check_bool("flag", 1)


# ----------------------------------------------------------------------------------------------
# The shared primitives: one merge, one masked SDPA.
# ----------------------------------------------------------------------------------------------


def test_merge_of_three_parts_and_an_empty_one_is_one_softmax_with_gradients():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, 12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    cuts = [slice(0, 4), slice(4, 9), slice(9, 12)]

    def merged(scores, v):
        outs = [torch.softmax(scores[..., c], -1).unsqueeze(-2).matmul(v[..., c, :]).squeeze(-2)
                for c in cuts]
        lses = [torch.logsumexp(scores[..., c], -1) for c in cuts]
        empty = torch.full_like(lses[0], float("-inf"))
        return dense.merge_attention([*outs, torch.zeros_like(outs[0])], [*lses, empty])

    out, lse = merged(scores, v)
    torch.testing.assert_close(out, torch.softmax(scores, -1).unsqueeze(-2).matmul(v).squeeze(-2))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    assert torch.autograd.gradcheck(lambda s, v: merged(s, v)[0], (scores, v))


def test_masked_sdpa_gives_zero_rows_and_zero_gradients_for_queries_without_keys():
    q, k, v = make(2, 2, 2, 6)
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    mask[:, :, 2] = False  # query 2 sees nothing
    for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))):
        fast = lambda q, k, v, m=m: dense.masked_sdpa(q, k, v, m, 0.5)
        assert_matches_reference(fast, lambda q, k, v: dense.masked_attention(q, k, v, mask, 0.5),
                                 (q, k, v), **TOL)
        out, (dq, _, _) = outputs_and_grads(fast, (q, k, v))
        assert torch.equal(out[:, :, 2], torch.zeros(2, 2, 8))
        assert torch.equal(dq[:, :, 2], torch.zeros(2, 2, 8))


# ----------------------------------------------------------------------------------------------
# Composed operators against slow references.
# ----------------------------------------------------------------------------------------------


def dense_sa(q, k, v, window, perm, *, layout="band", sinks=0, local=0, key_mask=None, scale):
    """Slow reference: the dense mask of :func:`dense_mask` and an explicit softmax."""
    groups = q.shape[1] // k.shape[1]
    mask = dense_mask(q.shape[2], window, perm=perm, layout=layout, sinks=sinks, local=local,
                      key_mask=key_mask)
    k, v = (dense.zero_padding(x, key_mask).repeat_interleave(groups, 1) for x in (k, v))
    return dense.masked_attention(q, k, v, mask, scale)


@pytest.mark.parametrize("members,pad,local", [(1, None, 0), (3, None, 2), (2, "left", 0), (3, "random", 3)])
def test_ensemble_is_the_mean_of_its_members_under_the_drawn_routings(members, pad, local):
    n = 17
    q, k, v = make(3, 4, 2, n, seed=members)
    key_mask = pad_mask(pad, 3, n, seed=5)
    kw = dict(layout="block" if members == 2 else "band", sinks=1, local=local, key_mask=key_mask)
    def fast(q, k, v):
        return ensemble_attention(q, k, v, 4, members=members, generator=torch.Generator().manual_seed(9),
                                  scale=0.4, **kw)

    def slow(q, k, v):
        g = torch.Generator().manual_seed(9)
        perms = [routing_permutation(3, 4, n, key_mask=key_mask, generator=g) for _ in range(members)]
        assert all(not torch.equal(perms[0], p) for p in perms[1:])  # independent draws
        return sum(dense_sa(q, k, v, 4, p, scale=0.4, **kw) for p in perms) / members

    assert_matches_reference(fast, slow, (q, k, v), **TOL)


@pytest.mark.parametrize("split", [0, 1, 3, 4, 9])
def test_head_split_runs_each_operator_on_its_heads(split):
    n, hq = 19, 4
    q, k, v = make(2, hq, 2, n, seed=split)
    perm = random_permutation(2, hq, n, generator=torch.Generator().manual_seed(split))
    s = min(split, hq)

    def fast(q, k, v):
        return head_split_attention(
            q, k, v, split,
            first=lambda q, k, v: sa.stochastic_attention(q, k, v, 3, perm=perm[:, :q.shape[1]],
                                                          sinks=1, scale=0.5),
            rest=lambda q, k, v: sa.sliding_window_attention(q, k, v, 3, sinks=1, scale=0.5))

    def slow(q, k, v):  # per-head dense masks: SA for heads < split, SWA for the rest
        swa = torch.arange(n).expand(2, hq, n)
        mask = torch.where(torch.arange(hq)[None, :, None, None] < s,
                           dense_mask(n, 3, perm=perm, sinks=1), dense_mask(n, 3, perm=swa, sinks=1))
        return dense.masked_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, 0.5)

    assert_matches_reference(fast, slow, (q, k, v), **TOL)


@pytest.mark.parametrize("window,sinks,L,pad", [(3, 0, 1, False), (4, 2, 3, True), (40, 1, 2, True),
                                                (1, 3, 1, True)])
def test_cached_attention_is_the_sliding_window_of_the_whole_sequence_at_the_new_rows(window, sinks, L, pad):
    S = 15
    q, k, v = make(2, 4, 2, S, seed=window)
    key_mask = pad_mask("left" if pad else None, 2, S)  # left padding: ranks follow positions
    whole = sa.sliding_window_attention(q, k, v, window, sinks=sinks, key_mask=key_mask,
                                        scale=0.5, backend="reference")
    got = cached_attention(q[:, :, S - L:], k, v, window, sinks, key_mask, scale=0.5)
    rows = whole[:, :, S - L:]
    if key_mask is not None:  # padded queries: the operators give 0, the cache never asks
        rows = rows * key_mask[:, None, S - L:, None]
        got = got * key_mask[:, None, S - L:, None]
    torch.testing.assert_close(got, rows, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Budgets: one enumeration of visible pairs.
# ----------------------------------------------------------------------------------------------

PAIR_CASES = list(itertools.product((1, 6, 23), (1, 4, 30), ("band", "block"), (True, False),
                                    (0, 3), (0, 2), (None, "random")))


@pytest.mark.parametrize("n,window,layout,causal,sinks,local,pad", PAIR_CASES)
def test_visible_keys_lists_each_pair_of_the_dense_mask_exactly_once(n, window, layout, causal,
                                                                     sinks, local, pad):
    if local and not causal:
        return
    key_mask = pad_mask(pad, 2, n, seed=n + window)
    perm = random_permutation(2, 3, n, generator=torch.Generator().manual_seed(window))
    keys, seen = visible_keys(n, window, perm=perm, layout=layout, causal=causal, sinks=sinks,
                              key_mask=key_mask, local=local)
    want = dense_mask(n, window, perm=perm, layout=layout, causal=causal, sinks=sinks,
                      key_mask=key_mask, local=local)
    got = torch.zeros(2, 3, n, n + 1, dtype=torch.long)
    got.scatter_add_(-1, torch.where(seen, keys, n), seen.long())
    assert torch.equal(got[..., :n], want.long())  # every visible pair once, nothing else
    assert torch.equal(attended_keys(n, window, perm=perm, layout=layout, causal=causal,
                                     sinks=sinks, key_mask=key_mask, local=local),
                       want.sum(-1))


def test_ensemble_budget_counts_the_union_of_the_members_windows():
    n = 29
    perms = [random_permutation(1, 2, n, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    key_mask = pad_mask("left", 1, n)
    union = torch.zeros(1, 2, n, n, dtype=torch.bool)
    for p in perms:
        union |= dense_mask(n, 5, perm=p, sinks=2, local=3, key_mask=key_mask)
    got = ensemble_attended_keys(n, 5, perms, sinks=2, local=3, key_mask=key_mask)
    assert torch.equal(got, union.sum(-1))
    assert bool((got >= attended_keys(n, 5, perm=perms[0], sinks=2, local=3,
                                      key_mask=key_mask)).all())


def test_fractional_and_bigbird_keep_their_reference_paths():
    q, k, v = make(2, 4, 2, 11, seed=3)
    key_mask = pad_mask("random", 2, 11, seed=2)
    kw = dict(causal=True, key_mask=key_mask, window=4)
    assert_matches_reference(fractional.fractional_attention, partial(fractional.fractional_attention,
                                                                      backend="reference"),
                             (q, k, v), alpha=1.2, **kw, **TOL)
    idx = bigbird.bigbird_indices(2, 1, 11, 3, 2, sinks=1, generator=torch.Generator().manual_seed(0),
                                  key_mask=key_mask)
    assert_matches_reference(bigbird.bigbird_attention, bigbird.bigbird_reference, (q, k, v), window=3,
                             random_keys=2, sinks=1, key_mask=key_mask, indices=idx, **TOL)
