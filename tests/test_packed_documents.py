"""Packed documents: every method gives, for each document of a packed batch, exactly what it
gives for that document alone (outputs and gradients), with no n x n tensor on the way."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stochastic_attention as sa
from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM
from stochastic_attention.nn import KVCache, MultiHeadAttention
from stochastic_attention.ops import bigbird, documents, fractional, moba
from stochastic_attention.ops.permute import routing_permutation
from stochastic_attention.ops.reference import masked_attention
from stochastic_attention.testing import assert_matches_reference

# Two packed rows of 24 tokens: odd lengths, length-1 documents, one longer than the window.
ROWS = ((5, 1, 9, 3, 6), (1, 13, 2, 1, 7))
N = 24
WINDOW = 5  # the 5-token documents: covered by the window, padded to 8


def make_inputs(n, batch, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, dim, generator=g, dtype=torch.double).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def document_ids(rows=ROWS):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)) * 7 + 3, torch.tensor(r))
                        for r in rows])


def spans(rows=ROWS):
    """(row, start, stop) of every document."""
    out = []
    for b, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            out.append((b, start, start + length))
            start += length
    return out


def loss_of(out):
    return (out * torch.cos(out)).sum()  # every output element gets its own gradient


def op_cases():
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    cases = []
    for causal in (True, False):
        for sinks in (0, 2):
            cases.append((f"swa-causal{causal}-sinks{sinks}",
                          lambda q, k, v, c=causal, s=sinks, **kw: sa.sliding_window_attention(
                              q, k, v, WINDOW, causal=c, sinks=s, **kw)))
            for layout in ("band", "block"):
                cases.append((f"sa-{layout}-causal{causal}-sinks{sinks}",
                              lambda q, k, v, c=causal, s=sinks, lay=layout, **kw:
                              sa.stochastic_attention(q, k, v, WINDOW, causal=c, sinks=s,
                                                      layout=lay, generator=g(), **kw)))
    for layout in ("band", "block"):
        cases.append((f"union-{layout}",
                      lambda q, k, v, lay=layout, **kw: sa.stochastic_attention(
                          q, k, v, 3, local=2, sinks=1, layout=lay, generator=g(), **kw)))
    cases.append(("swa-reference-backend", lambda q, k, v, **kw: sa.sliding_window_attention(
        q, k, v, WINDOW, sinks=1, backend="reference", **kw)))
    cases.append(("sa-reference-backend", lambda q, k, v, **kw: sa.stochastic_attention(
        q, k, v, WINDOW, sinks=1, backend="reference", generator=g(), **kw)))
    for sinks in (0, 2):
        cases.append((f"moba-sinks{sinks}", lambda q, k, v, s=sinks, **kw: moba.moba_attention(
            q, k, v, 3, 2, sinks=s, **kw)))
        cases.append((f"bigbird-sinks{sinks}", lambda q, k, v, s=sinks, **kw:
                      bigbird.bigbird_attention(q, k, v, 3, 2, sinks=s, generator=g(), **kw)))
    for window in (None, WINDOW):
        for causal in (True, False):
            cases.append((f"fractional-window{window}-causal{causal}",
                          lambda q, k, v, w=window, c=causal, **kw: fractional.fractional_attention(
                              q, k, v, 1.2, window=w, causal=c, **kw)))
    return cases


def alone(fn, q, k, v, rows=ROWS):
    """Each document run on its own, the outputs put side by side again."""
    out = []
    for b, lengths in enumerate(rows):
        bounds = torch.tensor([0, *lengths]).cumsum(0).tolist()
        out.append(torch.cat([fn(*(x[b:b + 1, :, s:e] for x in (q, k, v)))
                              for s, e in zip(bounds[:-1], bounds[1:], strict=True)], dim=2))
    return torch.cat(out, dim=0)


TOL = dict(atol=1e-10, grad_atol=1e-10, rtol=1e-10)  # outputs and gradients


@pytest.mark.parametrize("name,fn", op_cases(), ids=[c[0] for c in op_cases()])
def test_op_packed_rows_equal_each_document_alone(name, fn):
    inputs = make_inputs(N, batch=2)
    ids = document_ids()
    assert_matches_reference(lambda q, k, v: fn(q, k, v, document_ids=ids),
                             lambda q, k, v: alone(fn, q, k, v), inputs, **TOL)


@pytest.mark.parametrize("name,fn", op_cases()[::3], ids=[c[0] for c in op_cases()[::3]])
def test_op_cu_seqlens_equals_each_document_alone(name, fn):
    row = ROWS[1]
    inputs = make_inputs(sum(row), batch=1, seed=1)
    cu = torch.tensor([0, *torch.tensor(row).cumsum(0).tolist()], dtype=torch.int32)
    assert_matches_reference(lambda q, k, v: fn(q, k, v, cu_seqlens=cu),
                             lambda q, k, v: alone(fn, q, k, v, rows=(row,)), inputs, **TOL)
    # the same boundaries as document_ids: the same result
    ids = document_ids((row,))
    torch.testing.assert_close(fn(*inputs, cu_seqlens=cu), fn(*inputs, document_ids=ids))


def test_swa_packed_matches_a_block_diagonal_dense_reference():
    """An independent oracle: the dense mask of causal SWA restricted to each document."""
    q, k, v = make_inputs(N, batch=2, heads=2, kv_heads=2)
    ids = document_ids()
    pos = torch.arange(N)
    same_doc = ids[:, :, None] == ids[:, None, :]
    mask = same_doc & (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - WINDOW)
    want = masked_attention(q, k, v, mask[:, None], q.shape[-1] ** -0.5)
    got = sa.sliding_window_attention(q, k, v, WINDOW, document_ids=ids)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_routing_is_drawn_per_document_from_the_generator_state():
    q, k, v = make_inputs(N, batch=2)
    g_packed, g_alone = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    packed = sa.stochastic_attention(q, k, v, WINDOW, generator=g_packed,
                                     document_ids=document_ids())
    b, start, stop = spans()[2]  # the 9-token document
    doc = sa.stochastic_attention(*(x[b:b + 1, :, start:stop] for x in (q, k, v)), WINDOW,
                                  generator=g_alone)
    torch.testing.assert_close(packed[b:b + 1, :, start:stop], doc)
    # the generator moves on exactly as after one call on a document alone
    assert torch.equal(g_packed.get_state(), g_alone.get_state())


def per_document_perm(rows, heads, seed):
    """A packed permutation that permutes each document within itself, and the parts."""
    perm = torch.zeros(len(rows), heads, N, dtype=torch.long)
    parts = {}
    for b, start, stop in spans(rows):
        p = routing_permutation(1, heads, stop - start,
                                generator=torch.Generator().manual_seed(seed + start))[0]
        perm[b, :, start:stop] = p + start
        parts[(b, start)] = p[None]  # [1, heads, length]
    return perm, parts


@pytest.mark.parametrize("layout", ["band", "block"])
def test_a_given_packed_perm_acts_per_document(layout):
    q, k, v = make_inputs(N, batch=2)
    perm, parts = per_document_perm(ROWS, 4, seed=3)

    def one(x_q, x_k, x_v, **kw):
        return sa.stochastic_attention(x_q, x_k, x_v, WINDOW, layout=layout, sinks=1, **kw)

    got = one(q, k, v, perm=perm, document_ids=document_ids())
    for b, start, stop in spans():
        want = one(*(x[b:b + 1, :, start:stop] for x in (q, k, v)), perm=parts[(b, start)])
        torch.testing.assert_close(got[b:b + 1, :, start:stop], want, atol=1e-10, rtol=1e-10)
    frac = fractional.fractional_attention(q, k, v, 1.2, window=WINDOW, causal=True, perm=perm,
                                           layout=layout, document_ids=document_ids())
    b, start, stop = spans()[6]
    want = fractional.fractional_attention(*(x[b:b + 1, :, start:stop] for x in (q, k, v)), 1.2,
                                           window=WINDOW, causal=True, layout=layout,
                                           perm=parts[(b, start)])
    torch.testing.assert_close(frac[b:b + 1, :, start:stop], want, atol=1e-10, rtol=1e-10)
    crossing = torch.arange(N).flip(0)  # moves tokens between documents
    with pytest.raises(ValueError, match="permute every document within itself"):
        sa.stochastic_attention(q, k, v, WINDOW, perm=crossing, document_ids=document_ids())


def test_given_bigbird_indices_are_packed_per_document():
    q, k, v = make_inputs(N, batch=2)
    indices = torch.full((2, 1, N, 2), -1, dtype=torch.long)
    parts = {}
    for b, start, stop in spans():
        idx = bigbird.bigbird_indices(1, 1, stop - start, 3, 2,
                                      generator=torch.Generator().manual_seed(start))
        indices[b, :, start:stop] = torch.where(idx >= 0, idx + start, -1)[0]
        parts[(b, start)] = idx
    got = bigbird.bigbird_attention(q, k, v, 3, 2, indices=indices, document_ids=document_ids())
    for b, start, stop in spans():
        want = bigbird.bigbird_attention(*(x[b:b + 1, :, start:stop] for x in (q, k, v)), 3, 2,
                                         indices=parts[(b, start)])
        torch.testing.assert_close(got[b:b + 1, :, start:stop], want, atol=1e-10, rtol=1e-10)
    bad = indices.clone()
    bad[1, 0, 20, 0] = 2  # a key in another document of that row
    with pytest.raises(ValueError, match="lie in its query's document"):
        bigbird.bigbird_attention(q, k, v, 3, 2, indices=bad, document_ids=document_ids())


def test_key_mask_inside_documents_is_padding_of_that_document():
    """Padding tokens inside a packed document: the document gives what it gives padded alone."""
    q, k, v = make_inputs(N, batch=2)
    ids = document_ids()
    key_mask = torch.ones(2, N, dtype=torch.bool)
    key_mask[1, 12:14] = False  # the last two tokens of the 13-token document
    got = sa.stochastic_attention(q, k, v, WINDOW, sinks=1, key_mask=key_mask, document_ids=ids,
                                  generator=torch.Generator().manual_seed(2))
    want = sa.stochastic_attention(*(x[1:2, :, 1:12] for x in (q, k, v)), WINDOW, sinks=1,
                                   generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got[1:2, :, 1:12], want, atol=1e-10, rtol=1e-10)


def test_all_length_one_documents_see_only_themselves():
    q, k, v = make_inputs(7, batch=1, heads=2, kv_heads=2)
    out = sa.stochastic_attention(q, k, v, 3, document_ids=torch.arange(7)[None], sinks=2)
    torch.testing.assert_close(out, v, atol=1e-12, rtol=1e-12)
    empty = [x[:, :, :0] for x in (q, k, v)]
    assert sa.sliding_window_attention(*empty, 3, document_ids=torch.zeros(1, 0,
                                       dtype=torch.long)).shape == (1, 2, 0, 8)


def test_bad_document_inputs_raise_clear_errors():
    q, k, v = make_inputs(6, batch=1)
    swa = sa.sliding_window_attention
    with pytest.raises(ValueError, match="contiguous"):
        swa(q, k, v, 2, document_ids=torch.tensor([[0, 0, 1, 1, 0, 0]]))
    with pytest.raises(TypeError, match="integer tensor"):
        swa(q, k, v, 2, document_ids=torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        swa(q, k, v, 2, document_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="end at the number of tokens, 6"):
        swa(q, k, v, 2, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="start at 0"):
        swa(q, k, v, 2, cu_seqlens=torch.tensor([1, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        swa(q, k, v, 2, cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        swa(q, k, v, 2, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="not both"):
        swa(q, k, v, 2, document_ids=torch.zeros(1, 6, dtype=torch.long),
            cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    q2, k2, v2 = make_inputs(6, batch=2)
    with pytest.raises(ValueError, match="batch 1"):
        swa(q2, k2, v2, 2, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", ["swa", "sa", "union", "moba", "bigbird", "fractional"])
def test_no_n_by_n_tensor_on_the_packed_path(name):
    n = 4096
    g = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(torch.randint(1, 40, (), generator=g)))
    lengths[-1] -= sum(lengths) - n
    lengths = [x for x in lengths if x > 0]
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    plan = documents.DocumentPlan.from_document_ids(ids)
    assert sum(b.index.numel() for b in plan.buckets) <= 2 * n
    assert len(plan.buckets) <= 7  # powers of two up to 64
    q, k, v = (torch.randn(1, h, n, 8, requires_grad=True) for h in (2, 1, 1))
    fn = {
        "swa": lambda: sa.sliding_window_attention(q, k, v, 16, sinks=2, document_ids=ids),
        "sa": lambda: sa.stochastic_attention(q, k, v, 16, sinks=2, document_ids=ids),
        "union": lambda: sa.stochastic_attention(q, k, v, 8, local=4, document_ids=ids),
        "moba": lambda: moba.moba_attention(q, k, v, 8, 2, document_ids=ids),
        "bigbird": lambda: bigbird.bigbird_attention(q, k, v, 8, 4, document_ids=ids),
        "fractional": lambda: fractional.fractional_attention(q, k, v, 1.2, window=16,
                                                              causal=True, document_ids=ids),
    }[name]
    with _LargestTensor() as probe:
        out = fn()
        out.sum().backward()
    # an n x n score or mask tensor would hold n * n = 16.7M entries
    assert probe.largest < n * n // 16, probe.largest


# ------------------------------------------------------------------------------------------
# The layer.
# ------------------------------------------------------------------------------------------

LAYER_CASES = [
    ("full", dict()),
    ("sliding_window", dict(window=WINDOW, sinks=2)),
    ("stochastic", dict(window=WINDOW)),
    ("stochastic", dict(window=WINDOW, layout="block", sinks=2)),
    ("stochastic", dict(window=WINDOW, perm_per_head=True, sinks=1)),
    ("gated", dict(window=WINDOW, sinks=1)),
    ("stochastic_local", dict(window=WINDOW, local=2, sinks=1)),
    ("bigbird", dict(window=WINDOW, random_keys=3, sinks=1)),
    ("moba", dict(block_size=3, top_k=2, sinks=1)),
    ("fractional", dict(window=4, windows="stochastic", alpha=1.2)),
]


@pytest.mark.parametrize("method,options", LAYER_CASES)
def test_layer_packed_rows_equal_each_document_alone(method, options):
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 4, num_kv_heads=2, method=method,
                               options=options).double().eval()
    x = torch.randn(2, N, 24, dtype=torch.double, requires_grad=True)
    out = layer(x, document_ids=document_ids())
    grad = torch.autograd.grad(loss_of(out), x)[0]
    for b, start, stop in spans():
        xd = x[b:b + 1, start:stop].detach().requires_grad_()
        want = layer(xd)  # RoPE from 0, routing drawn for the document alone
        torch.testing.assert_close(out[b:b + 1, start:stop], want, atol=1e-10, rtol=1e-10)
        want_grad = torch.autograd.grad(loss_of(want), xd)[0]
        torch.testing.assert_close(grad[b:b + 1, start:stop], want_grad, atol=1e-10, rtol=1e-10)


def test_layer_in_training_mode_keeps_documents_apart():
    """Routing from the global RNG: no equality with a run alone, but no key crosses a boundary:
    changing one document changes no other document's output."""
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 4, method="stochastic", options={"window": 3}).double().train()
    x = torch.randn(2, N, 24, dtype=torch.double)
    torch.manual_seed(1)
    out = layer(x, document_ids=document_ids())
    y = x.clone()
    y[1, 1:14] += 1.0  # the 13-token document of row 1
    torch.manual_seed(1)
    changed = layer(y, document_ids=document_ids())
    assert not torch.allclose(changed[1, 1:14], out[1, 1:14])
    torch.testing.assert_close(changed[1, :1], out[1, :1])
    torch.testing.assert_close(changed[1, 14:], out[1, 14:])
    torch.testing.assert_close(changed[0], out[0])


def test_layer_rope_restarts_per_document_and_rejects_a_cache():
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 4, method="sliding_window", options={"window": 3}).double().eval()
    x = torch.randn(1, N, 24, dtype=torch.double)
    ids = document_ids(ROWS[:1])
    restart = torch.cat([torch.arange(n) for n in ROWS[0]])[None]
    torch.testing.assert_close(layer(x, document_ids=ids),
                               layer(x, document_ids=ids, position_ids=restart))
    plan = documents.DocumentPlan.from_document_ids(ids)
    torch.testing.assert_close(layer(x, document_ids=plan), layer(x, document_ids=ids))
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        layer(x, document_ids=ids, cache=KVCache())


# ------------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------------

MODEL_CASES = [
    ("sliding_window", dict()),
    ("stochastic", dict()),
    ("stochastic", dict(layout="block", sinks=1)),
    ("stochastic_local", dict(local=2)),
    ("gated", dict(sinks=1)),
    ("moba", dict(block_size=3, top_k=2)),
]


def tiny_model(method, **options):
    torch.manual_seed(0)
    if method != "moba":
        options = {"window": WINDOW, **options}
    config = SALlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attention_methods=method,
                           attention_options=options, eos_token_id=0)
    return SALlamaForCausalLM(config).double().eval()


@pytest.mark.parametrize("method,options", MODEL_CASES)
def test_model_packed_batch_equals_documents_one_by_one(method, options):
    from transformers import DataCollatorWithFlattening

    model = tiny_model(method, **options)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 40, (n,), generator=g) for n in (7, 5, 1, 12)]
    batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
    packed = model(**batch)
    packed_grads = torch.autograd.grad(packed.loss, list(model.parameters()))
    logits, nll, count = [], 0.0, 0
    for d in docs:
        out = model(input_ids=d[None], labels=d[None])
        logits.append(out.logits)
        if len(d) > 1:  # a one-token document has no target
            nll = nll + out.loss * (len(d) - 1)
            count += len(d) - 1
    loss = nll / count
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(packed.logits, torch.cat(logits, 1), atol=1e-10, rtol=1e-10)
    # the model's loss is computed in float32
    torch.testing.assert_close(packed.loss, loss, atol=1e-6, rtol=1e-6)
    for got, want in zip(packed_grads, grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # labels = input_ids (no -100 at the starts): the model drops the cross-document targets
    plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                  labels=batch["input_ids"])
    torch.testing.assert_close(plain.loss, loss, atol=1e-6, rtol=1e-6)


def test_model_reads_flash_attention_document_boundaries():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds cu_seq_lens_q/_k: they
    mark the same documents as the positions, and alone they are enough."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model("stochastic")
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(1, 40, (n,), generator=g) for n in (6, 3, 9)]
    feats = [{"input_ids": d.tolist()} for d in docs]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)
    assert "cu_seq_lens_q" in batch
    want = model(**DataCollatorWithFlattening()(feats)).logits
    torch.testing.assert_close(model(**batch).logits, want)
    no_positions = {k: v for k, v in batch.items() if k != "position_ids"}
    torch.testing.assert_close(model(**no_positions).logits, want)
    wrong = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    with pytest.raises(ValueError, match="disagree"):
        model(**wrong)
    with pytest.raises(ValueError, match="both be given"):
        model(**{k: v for k, v in batch.items() if k != "cu_seq_lens_k"})


def test_model_packed_input_has_no_cache_and_ordinary_positions_are_not_packed():
    model = tiny_model("sliding_window")
    ids = torch.randint(1, 40, (1, 9))
    packed_positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        model(input_ids=ids, position_ids=packed_positions, use_cache=True)
    assert documents.document_ids_from_positions(torch.arange(9)[None] + 5) is None
    ordinary = model(input_ids=ids, position_ids=torch.arange(9)[None]).logits
    torch.testing.assert_close(ordinary, model(input_ids=ids).logits)
    assert documents.document_ids_from_positions(packed_positions).tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 1, 1]]


# ------------------------------------------------------------------------------------------
# data.pack
# ------------------------------------------------------------------------------------------

def test_packed_batch_targets_never_cross_documents():
    from stochastic_attention.data.packing import IGNORE_INDEX, packed_batch

    eos = 9
    chunk = torch.tensor([[4, 5, eos, 6, eos, eos, 7, 8, 1]])
    inputs, targets, positions = packed_batch(chunk, eos)
    assert inputs.tolist() == [[4, 5, eos, 6, eos, eos, 7, 8]]
    assert targets.tolist() == [[5, eos, IGNORE_INDEX, eos, IGNORE_INDEX, IGNORE_INDEX, 8, 1]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def _doc_corpus(directory):
    import random

    words = "the quick brown fox jumps over a lazy dog while seven cats sing".split()
    directory.mkdir()
    rng = random.Random(0)
    for i in range(12):  # short documents: several per 32-token row
        (directory / f"doc{i:02d}.txt").write_text(
            " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))))
    return directory


def _reference_loss(model, batch, precision, eos_id=None):
    """Each document of every row run on its own: the mean loss over the same targets."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    for row in batch:
        inputs, targets = row[:-1], row[1:]
        ends = (inputs == eos_id).nonzero().flatten().tolist()
        start = 0
        for stop in [e + 1 for e in ends] + [len(inputs)]:
            if stop > start:
                logits = model(input_ids=inputs[start:stop][None], use_cache=False).logits[0]
                keep = inputs[start:stop] != eos_id  # no target after a document's end
                total = total + F.cross_entropy(logits[keep].float(), targets[start:stop][keep],
                                                reduction="sum")
                count += int(keep.sum())
            start = stop
    return total / count


def test_packed_training_equals_training_on_documents_alone(tmp_path, monkeypatch):
    from stochastic_attention.train import config_from_dict, loop, train

    corpus = _doc_corpus(tmp_path / "docs")

    def cfg(out, pack):
        return config_from_dict({
            "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "attention_methods": "sliding_window",
                      "attention_options": {"window": 8}},
            "data": {"sources": [{"name": "toy", "files": str(corpus)}], "val_fraction": 0.2,
                     "cache_dir": str(tmp_path / "cache"), "pack": pack},
            "train": {"out_dir": str(tmp_path / out), "seq_len": 32, "batch_size": 2,
                      "micro_batch_size": 1, "steps": 2, "warmup_steps": 1, "log_every": 1,
                      "eval_every": 2, "eval_batches": 1, "checkpoint_every": 100,
                      "tensorboard": False, "threads": 1},
        })

    packed = train(cfg("packed", True), progress=False)
    unpacked = train(cfg("unpacked", False), progress=False)
    with monkeypatch.context() as m:
        m.setattr(loop, "_loss", _reference_loss)
        alone = train(cfg("alone", True), progress=False)
    assert packed["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert packed["val_loss"]["toy"] == pytest.approx(alone["val_loss"]["toy"], rel=1e-5)
    assert unpacked["loss"] != pytest.approx(packed["loss"], rel=1e-4)  # packing mattered
    a = SALlamaForCausalLM.from_pretrained(tmp_path / "packed" / "final").state_dict()
    b = SALlamaForCausalLM.from_pretrained(tmp_path / "alone" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
