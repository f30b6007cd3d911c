"""torch.compile of the layer: every softmax method trains compiled whole (fullgraph, forward
and backward), equal to eager with the same permutations, and later steps draw fresh
permutations inside the same graph; a padded batch and an unpadded one share a graph."""

from __future__ import annotations

import pytest
import torch

from stochastic_attention.nn import MultiHeadAttention
from stochastic_attention.testing import compile_counted, graph_breaks, take_grads

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

N, WINDOW = 23, 4
TOL = dict(rtol=1e-5, atol=1e-5)

CASES = {
    "full": ("full", {}),
    "sliding_window_sinks": ("sliding_window", dict(window=WINDOW, sinks=1)),
    "stochastic_band": ("stochastic", dict(window=WINDOW)),
    "stochastic_block_sinks": ("stochastic", dict(window=WINDOW, layout="block", sinks=2)),
    "stochastic_local": ("stochastic_local", dict(window=WINDOW, local=3)),
    "gated": ("gated", dict(window=WINDOW)),
}


def layer_of(method: str, options: dict) -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(32, 4, num_kv_heads=2, method=method, options=options).train()


@pytest.mark.parametrize("case", list(CASES))
def test_layer_trains_compiled_without_breaks_or_recompiles(case):
    layer = layer_of(*CASES[case])
    x = torch.randn(2, N, 32, requires_grad=True)
    fn, counter = compile_counted(layer)
    torch.manual_seed(1)
    fn(x).square().sum().backward()
    got = take_grads(x, *layer.parameters())
    torch.manual_seed(1)  # the same permutation in eager
    layer(x).square().sum().backward()
    for g, r in zip(got, take_grads(x, *layer.parameters()), strict=True):
        torch.testing.assert_close(g, r, **TOL)
    for _ in range(2):  # later steps draw fresh permutations inside the same graph
        fn(x).sum().backward()
    assert counter.frame_count == 1 and graph_breaks() == 0


def test_padded_layer_compiles_whole():
    layer = layer_of("gated", dict(window=WINDOW, sinks=1))
    x = torch.randn(2, N, 32)
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :N - 3] = 0  # a row the window covers: full attention over its 3 real tokens
    fn, counter = compile_counted(layer)
    torch.manual_seed(1)
    out = fn(x, attention_mask=mask)
    torch.manual_seed(1)
    torch.testing.assert_close(out, layer(x, attention_mask=mask), **TOL)
    fn(x, attention_mask=torch.ones_like(mask)).sum().backward()  # no padding: same graph
    assert counter.frame_count == 1 and graph_breaks() == 0


def test_seeded_eval_compiles_in_pieces_and_equals_eager():
    # Eval mode with seeded permutations builds a generator per call: the graph breaks there,
    # and the compiled layer still gives eager's (reproducible) output.
    from torch._dynamo.testing import CompileCounterWithBackend

    layer = layer_of("stochastic", dict(window=WINDOW)).eval()
    x = torch.randn(2, N, 32)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(layer, backend=counter)
    torch.testing.assert_close(fn(x), layer(x), **TOL)
    assert graph_breaks() > 0


@pytest.mark.parametrize(("method", "options"), [
    ("moba", dict(block_size=4, top_k=2)),   # top-k block routing: data-dependent, in pieces
    ("fractional", dict(window=4)),
    ("bigbird", dict(window=4)),             # random keys per row, in pieces
])
def test_other_methods_compile_and_equal_eager(method, options):
    # Not promised whole (fullgraph): these compile with the default settings, breaking the
    # graph where they must, and give eager's outputs and gradients.
    from torch._dynamo.testing import CompileCounterWithBackend

    layer = layer_of(method, options)
    x = torch.randn(2, N, 32, requires_grad=True)
    fn = torch.compile(layer, backend=CompileCounterWithBackend("aot_eager"))
    torch.manual_seed(1)
    fn(x).square().sum().backward()
    got = take_grads(x, *layer.parameters())
    torch.manual_seed(1)
    layer(x).square().sum().backward()
    for g, r in zip(got, take_grads(x, *layer.parameters()), strict=True):
        torch.testing.assert_close(g, r, **TOL)
