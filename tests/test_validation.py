"""Bad layer and patch arguments fail where they are given, with an error that names them."""

import pytest
import torch

from stochastic_attention.eval.methods import parse_method
from stochastic_attention.hf import patch, patched_config
from stochastic_attention.nn import MultiHeadAttention
from stochastic_attention.testing import tiny_hf_model


def test_layer_checks_layout_backend_and_sinks_at_construction():
    with pytest.raises(ValueError, match="layout must be one of"):
        MultiHeadAttention(16, 2, method="stochastic", options={"layout": "blk"})
    with pytest.raises(ValueError, match="backend must be one of"):
        MultiHeadAttention(16, 2, method="stochastic", backend="x")
    with pytest.raises(ValueError, match="sinks must be >= 0"):
        MultiHeadAttention(16, 2, method="sliding_window", options={"sinks": -1})


def test_layer_forward_names_the_expected_shape_of_x():
    layer = MultiHeadAttention(16, 2, method="stochastic", options={"window": 4})
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, hidden\]"):
        layer(torch.randn(5, 16))
    assert layer(torch.randn(1, 5, 16)).shape == (1, 5, 16)


def test_patch_checks_head_split_against_the_model():
    model = tiny_hf_model("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3)
    with pytest.raises(ValueError, match="head_split must be between 0 and the model's 9"):
        patch(model, "stochastic", 8, head_split=100)
    patch(model, "stochastic", 8, head_split=9)
    assert patched_config(model).head_split == 9


def test_patch_accepts_local_as_a_share_of_the_window_like_eval_specs():
    model = tiny_hf_model("llama")
    spec = parse_method("stochastic+sinks=2+local=0.75")
    want = spec.settings(16, 2)
    patch(model, "stochastic", 16, sinks=2, local=0.75)
    got = patched_config(model)
    assert (got.window, got.local) == (want["window"], want["local"]) == (4, 12)


@pytest.mark.parametrize("local", [1.5, 0.0, -0.25, 1.0])
def test_patch_and_eval_specs_refuse_the_same_bad_local(local):
    with pytest.raises(ValueError, match="local"):
        patch(tiny_hf_model("llama"), "stochastic", 16, local=local)
    with pytest.raises(ValueError, match="local"):
        parse_method(f"stochastic+local={local}").settings(16, 2)
    with pytest.raises(TypeError, match="local"):
        patch(tiny_hf_model("llama"), "stochastic", 16, local="half")


@pytest.mark.parametrize("name", ["sliding_window_attention", "stochastic_attention", "moba_attention",
                                  "fractional_attention", "bigbird_attention"])
def test_old_key_padding_mask_name_explains_the_rename(name):
    import stochastic_attention as sa
    from stochastic_attention.ops import bigbird, fractional, moba

    fn = getattr(sa, name, None) or getattr(moba, name, None) or getattr(fractional, name, None) \
        or getattr(bigbird, name)
    q = torch.randn(1, 2, 8, 4)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(TypeError, match="renamed 'key_mask'.*opposite polarity"):
        fn(q, q, q, key_padding_mask=mask)
