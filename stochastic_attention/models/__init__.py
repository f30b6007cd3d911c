"""Models: released pretrained causal LMs, the SA-Llama decoder for pre-training, the FNA classifier.

Importing this package registers SA-Llama with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained`` loads saved SA-Llama checkpoints.
"""

from .pretrained import load_pretrained
from .sa_llama import SALlamaConfig, SALlamaForCausalLM, SALlamaModel

__all__ = ["SALlamaConfig", "SALlamaForCausalLM", "SALlamaModel", "load_pretrained"]
