"""The encoder classifier with softmax / fractional attention: padding, training, weights, errors."""

from __future__ import annotations

import pytest
import torch

from stochastic_attention.models.fna_classifier import ClassifierConfig, EncoderClassifier

VARIANTS = [dict(attention="softmax"), dict(attention="fractional", alpha=1.2),
            dict(attention="fractional", alpha=2.0),
            dict(attention="fractional", alpha=1.2, window=5),
            dict(attention="fractional", alpha=1.2, window=5, windows="stochastic"),
            dict(attention="softmax", window=5, windows="stochastic")]


def _model(**kw) -> EncoderClassifier:
    torch.manual_seed(0)
    return EncoderClassifier(ClassifierConfig(vocab_size=11, num_classes=3, d_model=8,
                                              n_heads=2, **kw))


@pytest.mark.parametrize("variant", VARIANTS)
def test_classifier_trains_and_ignores_padding(variant):
    model = _model(**variant).eval()
    tokens = torch.randint(0, 11, (3, 13), generator=torch.Generator().manual_seed(1))
    pad = torch.ones(3, 13, dtype=torch.bool)
    pad[1, 9:] = False
    torch.manual_seed(2)
    logits = model(tokens, pad)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    other = tokens.clone()
    other[1, 9:] = (other[1, 9:] + 1) % 11  # change only padded tokens
    torch.manual_seed(2)  # same permutation draws for the stochastic variants
    torch.testing.assert_close(model(other, pad), logits)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(tokens, pad), torch.tensor([0, 1, 2]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_attention_weights_are_the_layer_attention():
    model = _model(attention="fractional", alpha=1.2, n_layers=2).eval()
    tokens = torch.randint(0, 11, (2, 10))
    P = model.attention_weights(tokens, layer=1)
    assert P.shape == (2, 2, 10, 10)
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 2, 10))
    soft = _model(attention="softmax").eval().attention_weights(tokens)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, 2, 10))


def test_orthogonal_qk_stays_orthogonal_under_training():
    model = _model(attention="fractional", alpha=1.2, orthogonal_qk=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tokens = torch.randint(0, 11, (4, 7))
    for _ in range(3):
        opt.zero_grad()
        model(tokens).sum().backward()
        opt.step()
    for proj in (model.blocks[0].attn.q_proj, model.blocks[0].attn.k_proj):
        w = proj.weight
        torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)


def test_bad_classifier_config_raises():
    with pytest.raises(ValueError, match="attention"):
        ClassifierConfig(vocab_size=5, num_classes=2, attention="linear")
    with pytest.raises(ValueError, match="window"):
        ClassifierConfig(vocab_size=5, num_classes=2, windows="stochastic")
    with pytest.raises(ValueError, match="windows"):
        ClassifierConfig(vocab_size=5, num_classes=2, window=4, windows="random")
    with pytest.raises(ValueError, match="'fna' was renamed: use 'fractional'"):
        ClassifierConfig(vocab_size=5, num_classes=2, attention="fna")
    with pytest.raises(ValueError, match="alpha"):
        _model(attention="fractional", alpha=3.0)(torch.zeros(1, 4, dtype=torch.long))
