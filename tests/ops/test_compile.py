"""torch.compile of the blocked backend: forward and backward compile whole (fullgraph, no graph
break); a fresh permutation is another input of the same graph (no recompile); compiled results
equal eager ones (outputs and gradients); padded keys never reach an output; a bad permutation
is still refused.

Breaks and recompiles are counted with the cheap ``aot_eager`` backend; one ``inductor`` test
checks the generated code numerically.
"""

from __future__ import annotations

import functools

import pytest
import torch

import stochastic_attention as sa
from stochastic_attention.testing import compile_counted, graph_breaks, random_qkv, take_grads

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

N, WINDOW = 23, 4  # an odd length of several windows (and of one band tile)
TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "sliding_window": ("sliding_window", dict()),
    "sliding_window_sinks_noncausal": ("sliding_window", dict(sinks=2, causal=False)),
    "full": ("sliding_window", dict(window=N)),  # the window covers the sequence: full attention
    "stochastic_band": ("stochastic", dict()),
    "stochastic_block": ("stochastic", dict(layout="block")),  # dense tiles
    "stochastic_block_sinks": ("stochastic", dict(layout="block", sinks=2)),
    "stochastic_local_sinks": ("stochastic", dict(local=3, sinks=1)),
    "stochastic_local_block": ("stochastic", dict(layout="block", local=3)),
}


def run_op(method, q, k, v, perm, kw, key_mask=None):
    kw = dict(kw)
    window = kw.pop("window", WINDOW)
    if method == "sliding_window":
        return sa.sliding_window_attention(q, k, v, window, backend="blocked", key_mask=key_mask,
                                           **kw)
    return sa.stochastic_attention(q, k, v, window, perm=perm, backend="blocked",
                                   key_mask=key_mask, **kw)


def two_perms():
    return torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(s))
                        for s in range(2)])[:, None]  # [B, 1, n]: shared by the heads


@pytest.mark.parametrize("case", list(CASES))
def test_blocked_op_compiles_whole_and_equals_eager(case):
    method, kw = CASES[case]
    q, k, v = random_qkv(N, batch=2, heads=4, kv_heads=2, dim=8)
    perm = two_perms()
    fn, counter = compile_counted(functools.partial(run_op, method, kw=kw))

    out = fn(q, k, v, perm)
    out.square().sum().backward()
    got = take_grads(q, k, v)
    ref = run_op(method, q, k, v, perm, kw)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    for g, r in zip(got, take_grads(q, k, v), strict=True):
        torch.testing.assert_close(g, r, **TOL)
    # Another permutation is another input of the same graph.
    fn(q, k, v, perm.flip(-1)).sum().backward()
    assert counter.frame_count == 1 and graph_breaks() == 0


@pytest.mark.parametrize("case", ["stochastic_band", "stochastic_local_sinks", "full"])
def test_compiled_padding_never_reaches_an_output(case):
    # Compiled graphs take the keys as finite (no branch on values), which is safe for padding:
    # padded keys and values are replaced by selection before any kernel.
    method, kw = CASES[case]
    q, k, v = random_qkv(N, batch=2, heads=4, kv_heads=2, dim=8, grad=False)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, 15:] = False
    perm = two_perms()
    fn, counter = compile_counted(functools.partial(run_op, method, kw=kw))
    clean = fn(q, k, v, perm, key_mask=mask)
    torch.testing.assert_close(clean, run_op(method, q, k, v, perm, kw, key_mask=mask), **TOL)
    pad = ~mask[:, None, :, None].expand_as(k)
    for value in (float("nan"), float("inf"), float("-inf")):
        out = fn(q, k.masked_fill(pad, value), v.masked_fill(pad, value), perm, key_mask=mask)
        assert torch.equal(out, clean)
    assert counter.frame_count == 1 and graph_breaks() == 0


def test_a_new_length_compiles_once_more_then_is_reused():
    fn, counter = compile_counted(lambda q, k, v, p: sa.stochastic_attention(
        q, k, v, WINDOW, perm=p, backend="blocked", sinks=1))
    for n in (23, 37, 41, 64):  # all longer than one band tile of 2 windows
        q, k, v = random_qkv(n, batch=1, heads=2, kv_heads=1, dim=8)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        out = fn(q, k, v, perm)
        ref = sa.stochastic_attention(q, k, v, WINDOW, perm=perm, backend="blocked", sinks=1)
        torch.testing.assert_close(out, ref, **TOL)
    assert counter.frame_count == 2 and graph_breaks() == 0


def test_drawn_permutations_are_drawn_inside_the_graph():
    q, k, v = random_qkv(N, batch=2, heads=4, kv_heads=2, dim=8)
    fn, counter = compile_counted(lambda q, k, v: sa.stochastic_attention(q, k, v, WINDOW,
                                                                          backend="blocked"))
    torch.manual_seed(3)
    first = fn(q, k, v)
    second = fn(q, k, v)
    torch.manual_seed(3)  # aot_eager draws from the global RNG exactly as eager does
    torch.testing.assert_close(first, sa.stochastic_attention(q, k, v, WINDOW, backend="blocked"),
                               **TOL)
    assert not torch.allclose(first, second)  # a fresh routing per call, no recompile
    assert counter.frame_count == 1 and graph_breaks() == 0


def test_compiled_op_still_rejects_a_bad_permutation():
    q, k, v = random_qkv(N, batch=1, heads=2, kv_heads=2, dim=8, grad=False)
    fn, _ = compile_counted(lambda q, k, v, p: sa.stochastic_attention(q, k, v, WINDOW, perm=p))
    fn(q, k, v, torch.randperm(N))
    with pytest.raises(RuntimeError, match="not a permutation"):
        fn(q, k, v, torch.zeros(N, dtype=torch.long))


def test_eager_calls_still_take_the_flash_path_after_compiling():
    # The compiled graph tiles; eager calls of the same shape keep the CPU flash path.
    from stochastic_attention.ops import flashband

    q, k, v = random_qkv(64, batch=1, heads=2, kv_heads=1, dim=8, grad=False)
    assert flashband.serves(q, k, v, key_mask=None, sinks=0)
    fn, _ = compile_counted(lambda q, k, v: sa.sliding_window_attention(q, k, v, 8))
    torch.testing.assert_close(fn(q, k, v), sa.sliding_window_attention(q, k, v, 8), **TOL)
    assert flashband.serves(q, k, v, key_mask=None, sinks=0)


def test_inductor_blocked_op_equals_eager():
    q, k, v = random_qkv(N, batch=2, heads=4, kv_heads=2, dim=8)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))

    def op(q, k, v, perm):
        return sa.stochastic_attention(q, k, v, WINDOW, perm=perm, sinks=1, backend="blocked")

    fn, counter = compile_counted(op, backend="inductor")
    out = fn(q, k, v, perm)
    out.square().sum().backward()
    got = take_grads(q, k, v)
    ref = op(q, k, v, perm)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    for g, r in zip(got, take_grads(q, k, v), strict=True):
        torch.testing.assert_close(g, r, **TOL)
    assert counter.frame_count == 1


def graph_targets(fn, *args) -> set[str]:
    """The operators of the graphs dynamo captures for fn(*args) (fullgraph)."""
    seen: set[str] = set()

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


@pytest.mark.parametrize("case", ["sliding_window", "stochastic_band", "stochastic_local_block"])
def test_compiled_graphs_keep_the_cpu_flash_path(case):
    # Without padding or sinks the CPU flash path serves eager calls; compiled graphs call the
    # same code as one custom operator instead of tracing or replacing it.
    method, kw = CASES[case]
    q, k, v = random_qkv(N, batch=2, heads=4, kv_heads=2, dim=8, grad=False)
    targets = graph_targets(functools.partial(run_op, method, kw=kw), q, k, v, two_perms())
    assert any("flashband_forward" in t for t in targets), targets


def test_flash_operators_pass_torch_library_checks():
    # Schema, fake (shape) implementation, autograd registration and dispatch, as PyTorch's own
    # checker sees them, for SWA, SA band and block, and the union.
    from stochastic_attention.ops import flashband_ops
    from stochastic_attention.ops.blocked import sort_groups

    q, k, v = random_qkv(N, batch=2, heads=4, kv_heads=2, dim=8)
    perm = two_perms()
    for args, sinks in (((None, WINDOW, "band", True, 0), 0), ((perm, WINDOW, "band", True, 0), 0),
                        ((sort_groups(perm, WINDOW), WINDOW, "block", True, 0), 0),
                        ((perm, WINDOW, "band", True, 3), 0), ((None, WINDOW, "band", False, 0), 0),
                        ((perm, WINDOW, "band", True, 3), 2), ((None, WINDOW, "band", True, 0), 2)):
        torch.library.opcheck(flashband_ops._forward, (q, k, v, *args, 0.35, sinks))
