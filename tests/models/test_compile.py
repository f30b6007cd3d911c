"""torch.compile of SA-Llama: the whole model compiles into one graph (forward and backward,
no break), a fresh permutation does not recompile, a new length compiles once more with the
length symbolic and later lengths reuse it; inductor's code equals eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM
from stochastic_attention.testing import compile_counted, graph_breaks, take_grads

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_llama(methods, **options) -> SALlamaForCausalLM:
    torch.manual_seed(0)
    config = SALlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=len(methods),
                           num_attention_heads=4, num_key_value_heads=2,
                           attention_methods=methods, eos_token_id=49,
                           attention_options=dict(window=4, **options))
    return SALlamaForCausalLM(config).train()


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The training loss as ``sattn train`` computes it (next-token cross-entropy)."""
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


def test_sa_llama_compiles_whole_and_a_new_length_recompiles_once():
    model = tiny_llama(["gated", "full"], sinks=1)
    fn, counter = compile_counted(model)
    ids = torch.randint(0, 50, (2, 73), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    loss = lm_loss(fn, ids[:, :41])
    loss.backward()
    got = take_grads(*model.parameters())
    torch.manual_seed(1)
    ref = lm_loss(model, ids[:, :41])
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    for g, r in zip(got, take_grads(*model.parameters()), strict=True):
        torch.testing.assert_close(g, r, **TOL)
    lm_loss(fn, ids[:, :41]).backward()  # a fresh permutation: no recompile
    assert counter.frame_count == 1
    # A new length compiles once more, with the length symbolic; later lengths reuse it.
    for n in (56, 72, 48):
        lm_loss(fn, ids[:, :n + 1]).backward()
    assert counter.frame_count == 2 and graph_breaks() == 0


def test_inductor_sa_llama_equals_eager():
    model = tiny_llama(["stochastic"])
    ids = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(0))
    fn, counter = compile_counted(model, backend="inductor")
    # inductor's own random numbers would draw other permutations than eager
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(1)
        loss = lm_loss(fn, ids)
        loss.backward()
    got = take_grads(*model.parameters())
    torch.manual_seed(1)
    ref = lm_loss(model, ids)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    for g, r in zip(got, take_grads(*model.parameters()), strict=True):
        torch.testing.assert_close(g, r, **TOL)
    assert counter.frame_count == 1


def test_packed_batch_compiles_in_pieces_and_equals_eager():
    # Restarting position ids are packed documents: the document plan's shapes depend on the
    # values, so the graph breaks there; the result is eager's.
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_llama(["sliding_window"]).eval()
    ids = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(7), torch.arange(13)])[None]
    fn = torch.compile(model, backend=CompileCounterWithBackend("aot_eager"))
    got = fn(input_ids=ids, position_ids=positions, use_cache=False).logits
    ref = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(got, ref, **TOL)
    alone = model(input_ids=ids[:, 7:], use_cache=False).logits  # the second document alone
    torch.testing.assert_close(got[:, 7:], alone, **TOL)
    assert graph_breaks() > 0
