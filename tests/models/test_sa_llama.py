"""SA-Llama as a Hugging Face model: Auto classes, safetensors round trip, generate()."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM


def tiny(methods, qk_norm: bool = False, **options) -> SALlamaForCausalLM:
    torch.manual_seed(0)
    config = SALlamaConfig(hidden_size=32, num_hidden_layers=len(methods), num_attention_heads=4,
                           num_key_value_heads=2, attention_methods=methods, qk_norm=qk_norm,
                           attention_options=dict(dict(window=6), **options))
    return SALlamaForCausalLM(config).eval()


def test_save_and_reload_through_auto_classes(tmp_path):
    methods = ["gated", "stochastic", "sliding_window", "moba", "fractional"]
    model = tiny(methods, qk_norm=True, gate_granularity="channel", gate_bias=[1.0, -1.0],
                 block_size=8, alpha=1.2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.attention_methods == methods
    assert config.attention_options == dict(window=6, gate_granularity="channel",
                                            gate_bias=[1.0, -1.0], block_size=8, alpha=1.2)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, SALlamaForCausalLM)
    ids = torch.randint(0, 257, (2, 40))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_generate_with_cache_equals_greedy_without_cache():
    model = tiny(["full", "sliding_window", "sliding_window"])
    prompt = torch.randint(0, 257, (2, 9))
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                         do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(12):
        next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(out, ids)


def test_loss_is_next_token_cross_entropy():
    model = tiny(["stochastic", "gated"])
    ids = torch.randint(0, 257, (3, 17))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 257),
                                                 ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    gate = model.model.layers[1].self_attn.gate.proj.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="attention_methods"):
        SALlamaConfig(num_hidden_layers=3, attention_methods=["full", "stochastic"])
    with pytest.raises(ValueError, match="attention_methods"):
        SALlamaConfig(attention_methods="linear")
    with pytest.raises(ValueError, match="attention_options: unknown options"):
        SALlamaConfig(attention_options={"windw": 4})
    with pytest.raises(TypeError, match="attention_options must be a dict"):
        SALlamaConfig(attention_options=[("window", 4)])


def test_left_padded_batch_matches_the_unpadded_sequence():
    # SA covering the sequence: exact
    model = tiny(["full", "sliding_window", "gated"], gated={"window": 64, "local_window": 6})
    row = torch.randint(0, 257, (1, 11))
    ids = torch.cat([torch.randint(0, 257, (1, 15)), torch.cat([torch.zeros(1, 4).long(), row], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes
    padded = model(ids, attention_mask=mask, position_ids=positions).logits[1, 4:]
    torch.testing.assert_close(padded, model(row).logits[0])
