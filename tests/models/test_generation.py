"""SA-Llama generate(): the KV cache is used, alone and in left-padded batches, for every method.

The models use large random weights (initializer_range 0.6) so that greedy continuations depend
on the whole prompt: each test first checks that prompts ending in the same token continue
differently, otherwise a decoder that ignores its cache would pass unnoticed.
"""

from __future__ import annotations

import pytest
import torch

from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM
from stochastic_attention.nn import KVCache

METHODS = ("full", "sliding_window", "stochastic", "gated", "moba", "fractional")
# Each method, plus the variants whose decoding takes another path: MoBA with sinks, FNA in
# sliding windows, and FNA in SA windows (covering the sequence, so exact).
CONFIGS = [(method, {}) for method in METHODS] + [
    ("moba", dict(sinks=1)), ("fractional", dict(window=4)),
    ("fractional", dict(window=64, windows="stochastic"))]
# SWA sinks: the prefill operators place sinks at the first slots, not the first real tokens,
# so these are checked without padding only.
UNPADDED = CONFIGS + [("sliding_window", dict(sinks=2)), ("gated", dict(sinks=1))]


VOCAB, NEW = 32, 8


def ids_of(configs) -> list[str]:
    return [method + "".join(f"-{k}={v}" for k, v in extra.items())
            for method, extra in configs]


def sharp_model(method: str, **overrides) -> SALlamaForCausalLM:
    # SA windows cover the sequence: decoding SA with full attention (the paper's protocol) is
    # then exactly what a forward pass over the whole sequence computes. With smaller windows
    # the two differ by design: each rerun draws a new permutation over the longer sequence.
    options = {"sliding_window": dict(window=4), "stochastic": dict(window=64),
               "gated": dict(window=64, local_window=4),
               "moba": dict(block_size=4, top_k=2)}.get(method, {})
    options.update(overrides)
    torch.manual_seed(0)
    config = SALlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attention_methods=method,
                           attention_options=options, initializer_range=0.6,
                           eos_token_id=None, pad_token_id=0)
    return SALlamaForCausalLM(config).eval()


def greedy_without_cache(model, ids, mask, steps: int = NEW) -> torch.Tensor:
    """The reference: rerun the whole sequence every step and take the argmax."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
            next_id = logits.argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_id)], dim=1)
    return ids


def generate(model, ids, mask) -> torch.Tensor:
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          use_cache=True)


def prompts(batch: int = 3, length: int = 9) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 5  # same last token: only the context can tell the rows apart
    return ids


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


@pytest.mark.parametrize("method,extra", UNPADDED, ids=ids_of(UNPADDED))
def test_cached_generate_equals_greedy_rerun(method, extra):
    model = sharp_model(method, **extra)
    ids = prompts()
    mask = torch.ones_like(ids)
    expected = greedy_without_cache(model, ids, mask)
    continuations = {tuple(row) for row in expected[:, ids.shape[1]:].tolist()}
    assert len(continuations) == len(ids), "the test model's output must depend on the context"
    assert torch.equal(generate(model, ids, mask), expected)


@pytest.mark.parametrize("method,extra", CONFIGS, ids=ids_of(CONFIGS))
def test_left_padded_batch_generates_as_without_cache(method, extra):
    model = sharp_model(method, **extra)
    full = prompts(3, 11)
    rows = [full[0], full[1, 4:], full[2, 7:]]  # 11, 7 and 4 real tokens
    ids, mask = left_padded(rows)
    expected = greedy_without_cache(model, ids, mask)
    assert len({tuple(r) for r in expected[:, -NEW:].tolist()}) == len(rows)
    assert torch.equal(generate(model, ids, mask), expected)


@pytest.mark.parametrize("method", ["full", "sliding_window", "moba"])
def test_left_padded_rows_generate_as_each_row_alone(method):
    # MoBA's blocks start at the first real token only when the padding is a multiple of the
    # block size (the operator aligns blocks to slots): pads of 4 and 8 with blocks of 4.
    model = sharp_model(method, **({"window": 3} if method == "sliding_window" else {}))
    full = prompts(3, 12)
    rows = [full[0], full[1, 4:], full[2, 8:]]
    ids, mask = left_padded(rows)
    batch = generate(model, ids, mask)
    for i, row in enumerate(rows):
        alone = generate(model, row[None], torch.ones(1, len(row), dtype=torch.long))
        assert torch.equal(batch[i, ids.shape[1] - len(row):], alone[0]), f"row {i}"


def test_generate_passes_the_cache_under_a_keyword_forward_reads():
    """Fails when a transformers release renames the cache keyword again."""
    model = sharp_model("full")
    seen = []
    original = model.forward

    def spy(*args, **kwargs):
        seen.append({k for k, v in kwargs.items() if v is not None})
        return original(*args, **kwargs)

    model.forward = spy
    ids = prompts(1)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    cache_names = [names & {"cache", "past_key_values"} for names in seen]
    assert all(cache_names[1:]), (
        f"generate's decoding steps passed {seen[1:]}: no cache keyword SA-Llama reads "
        "(stochastic_attention.models.sa_llama.CACHE_KEYWORDS); update forward and the tested "
        "transformers range in pyproject.toml")


def test_cache_keywords_and_unknown_keywords():
    model = sharp_model("sliding_window")
    ids = prompts(2)
    with torch.no_grad():
        whole = model(ids).logits[:, -1]
        for keyword in ("cache", "past_key_values"):
            cache = KVCache()
            model(ids[:, :-1], **{keyword: cache})
            torch.testing.assert_close(model(ids[:, -1:], **{keyword: cache}).logits[:, -1],
                                       whole)
    with pytest.raises(TypeError, match="cache_params"):
        model(ids, cache_params=KVCache())
    with pytest.raises(ValueError, match="once"):
        model(ids, cache=KVCache(), past_key_values=KVCache())
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)


def test_positions_follow_the_attention_mask():
    model = sharp_model("full")
    row = prompts(1, 7)
    ids, mask = left_padded([row[0], torch.cat([row[0], row[0]])])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits[0, -7:]
        torch.testing.assert_close(padded, model(row).logits[0])


@pytest.mark.parametrize("window,sinks", [(3, 0), (3, 2), (20, 1)])
def test_cached_window_and_sinks_count_real_tokens(window, sinks):
    from stochastic_attention.nn.attention import cached_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4 if name == "q" else 2, n, 8, generator=g)
               for name, n in (("q", 2), ("k", 9), ("v", 9)))
    alone = cached_attention(q, k, v, window, sinks, None)
    pad = torch.randn(1, 2, 5, 8, generator=g)  # 5 left-padding slots with junk keys
    k_pad, v_pad = torch.cat([pad, k], 2), torch.cat([pad, v], 2)
    valid = torch.tensor([[False] * 5 + [True] * 9])
    torch.testing.assert_close(cached_attention(q, k_pad, v_pad, window, sinks, valid), alone)


def test_forward_accepts_tokenizer_outputs_with_token_type_ids():
    model = sharp_model("sliding_window")
    ids = prompts(2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, token_type_ids=torch.zeros_like(ids)).logits,
                                   model(ids).logits, rtol=0, atol=0)
