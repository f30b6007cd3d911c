"""Models: Hugging Face integrations of decoders that use the package's attention."""

from .sa_llama import SALlamaConfig, SALlamaForCausalLM, SALlamaModel

__all__ = ["SALlamaConfig", "SALlamaForCausalLM", "SALlamaModel"]
