"""A patched model gives a sequence the same logits alone or padded in a batch, for every method."""

import pytest
import torch

from stochastic_attention.hf import patch
from stochastic_attention.testing import tiny_hf_model

LENGTHS = (14, 9)
N = 17


def _ids(n, seed):
    return torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _batch(seqs, left):
    ids = torch.zeros(len(seqs), N, dtype=torch.long)
    mask = torch.zeros(len(seqs), N, dtype=torch.long)
    spans = []
    for i, (s, is_left) in enumerate(zip(seqs, left, strict=True)):
        span = slice(N - s.shape[1], N) if is_left else slice(0, s.shape[1])
        ids[i, span], mask[i, span] = s[0], 1
        spans.append(span)
    return ids, mask, spans


SETTINGS = [
    ("stochastic", dict(window=4)),
    ("stochastic", dict(window=4, layout="block", sinks=2)),
    ("stochastic", dict(window=3, sinks=1, local=3)),
    ("stochastic", dict(window=4, head_split=2, ensemble=2)),
    ("sliding_window", dict(window=4, sinks=2)),
    ("moba", dict(window=6, top_k=2, sinks=1)),
]


@pytest.mark.parametrize("left", [(True, True), (False, True)])
@pytest.mark.parametrize("method,extra", SETTINGS)
def test_patched_llama_logits_do_not_depend_on_padding(method, extra, left):
    model = patch(tiny_hf_model("llama"), method, **extra)
    seqs = [_ids(n, seed) for seed, n in enumerate(LENGTHS)]
    ids, mask, spans = _batch(seqs, left)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        for s, span, row in zip(seqs, spans, out, strict=True):
            torch.testing.assert_close(row[span], model(s).logits[0], atol=1e-4, rtol=1e-4)


def test_sampled_decoding_does_not_depend_on_padding():
    model = patch(tiny_hf_model("llama"), "stochastic", 3, sinks=1, decode="stochastic")
    seqs = [_ids(n, seed) for seed, n in enumerate(LENGTHS)]
    nxt = torch.tensor([[5], [11]])
    ids, mask, _ = _batch(seqs, (True, True))
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step = model(nxt, attention_mask=mask2, past_key_values=cache).logits[:, -1]
        for i, s in enumerate(seqs):
            alone_cache = model(s, use_cache=True).past_key_values
            alone = model(nxt[i:i + 1], past_key_values=alone_cache).logits[0, -1]
            torch.testing.assert_close(step[i], alone, atol=1e-4, rtol=1e-4)
