"""Tiny random models of each supported family (2 layers, hidden 64), built from configs."""

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls = FAMILIES[family]
    extra = {"head_dim": 16} if family in ("qwen3", "mistral") else {}
    config = config_cls(**{**COMMON, **extra, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config).eval()
