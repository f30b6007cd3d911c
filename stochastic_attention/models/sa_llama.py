"""SA-Llama: a Llama-style decoder with a per-layer choice of attention, as a HF model.

Registered with ``AutoConfig`` / ``AutoModelForCausalLM`` under model_type "sa_llama", so
``save_pretrained`` / ``from_pretrained`` (safetensors) and ``generate`` work as for any
Hugging Face causal LM.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..nn import BranchGate, MultiHeadAttention
from ..ops import documents
from .sa_llama_config import SALlamaConfig


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SALlamaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + SwiGLU block; ``x`` stays positional so that activation
    checkpointing (transformers' ``GradientCheckpointingLayer``) can recompute it."""

    def __init__(self, config: SALlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MultiHeadAttention(config.hidden_size, config.num_attention_heads,
                                            **config.attention_kwargs(layer_idx))
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, *, position_ids, attention_mask, cache, document_ids=None):
        x = x + self.self_attn(self.input_layernorm(x), position_ids=position_ids,
                               attention_mask=attention_mask, cache=cache,
                               document_ids=document_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class SALlamaPreTrainedModel(PreTrainedModel):
    config_class = SALlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SALlamaDecoderLayer"]

    def _set_gradient_checkpointing(self, enable: bool = True,
                                    gradient_checkpointing_func=checkpoint,
                                    every_n_layers: int = 1) -> None:
        """As transformers does, but the recomputation always restores the RNG state:
        stochastic, stochastic_local, gated and bigbird layers draw their permutation / random
        keys from the global RNG in training, and a recompute that drew others would give wrong gradients."""
        super()._set_gradient_checkpointing(
            enable=enable, every_n_layers=every_n_layers,
            gradient_checkpointing_func=partial(gradient_checkpointing_func,
                                                preserve_rng_state=True))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, BranchGate):  # visited after its Linear: restores the gate bias
            module.reset_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


# Recent transformers (5.24) name the KV cache ``cache`` and generate passes it so; earlier
# releases used ``past_key_values``. Both are accepted; tests/test_dependency_versions.py and
# tests/models/test_generation.py check that the installed version passes one of them.
CACHE_KEYWORDS = ("cache", "past_key_values")
# Keywords transformers may pass that change nothing here (outputs are always a ModelOutput;
# positions come from position_ids / the attention mask / the cache length; a decoder has no
# segment embeddings, as Llama, which ignores token_type_ids from tokenizers that emit them).
IGNORED_KEYWORDS = ("return_dict", "cache_position", "num_items_in_batch", "token_type_ids")
UNSUPPORTED_IF_TRUE = ("output_attentions", "output_hidden_states")
# FlashAttention-style document boundaries, as DataCollatorWithFlattening(return_flash_attn_kwargs
# =True) adds them next to restarting position ids: read and checked against the positions.
FLASH_PACKED_KEYWORDS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# The field of transformers' outputs that holds the cache (renamed with the keyword).
OUTPUT_CACHE_FIELD = ("cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__
                      else "past_key_values")


def cache_argument(cache) -> dict:
    """The keyword that hands ``cache`` to a transformers model's forward in the installed
    version (``cache`` since 5.x; the old ``past_key_values`` is deprecated there)."""
    return {OUTPUT_CACHE_FIELD: cache}


def output_cache(out):
    """The KV cache of a transformers model's output, under the installed version's name."""
    return getattr(out, OUTPUT_CACHE_FIELD)


def _resolve_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once: cache= or past_key_values=, not both")
    return cache if cache is not None else past_key_values


def _check_extra_kwargs(kwargs: dict) -> None:
    """Refuse keywords this model would otherwise drop silently (a cache under another name
    would make every decoding step attend only to itself)."""
    unknown = [name for name in kwargs
               if name not in IGNORED_KEYWORDS + UNSUPPORTED_IF_TRUE + FLASH_PACKED_KEYWORDS]
    if unknown:
        raise TypeError(f"SA-Llama forward got unexpected keyword arguments {sorted(unknown)}; "
                        f"the KV cache goes in {' or '.join(CACHE_KEYWORDS)}. If a newer "
                        "transformers passes new inputs, see the tested range in pyproject.toml")
    wanted = [name for name in UNSUPPORTED_IF_TRUE if kwargs.get(name)]
    if wanted:
        raise ValueError(f"SA-Llama does not return {wanted}; pass them as False")


def _packed_positions(kwargs: dict, position_ids: torch.Tensor | None, attention_mask,
                      batch: int, seq: int) -> torch.Tensor | None:
    """Position ids for a batch packed with ``cu_seq_lens_q``/``_k`` (None when not given)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return position_ids
    if cu_q is None or cu_k is None or not torch.equal(cu_q.long(), cu_k.long()):
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must both be given and equal "
                         "(self-attention over packed documents)")
    if attention_mask is not None or batch != 1:
        raise ValueError("cu_seq_lens_q describes one flattened row: pass a batch of 1 and no "
                         "attention_mask")
    from_cu = documents.positions_from_cu_seqlens(cu_q, seq)
    if position_ids is None:
        return from_cu.to(cu_q.device)
    if not torch.equal(documents.cross_document_targets(position_ids.expand(1, seq).cpu()),
                       documents.cross_document_targets(from_cu.cpu())):
        raise ValueError("cu_seq_lens_q and position_ids disagree on where documents start")
    return position_ids


def positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.LongTensor:
    """Positions of the last ``length`` slots: each row counts its real tokens from 0, as
    transformers' generate does (left padding shifts a row's first token to position 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -length:]


class SALlamaModel(SALlamaPreTrainedModel):
    def __init__(self, config: SALlamaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(SALlamaDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``attention_mask`` [batch, cached + new] (1 = real token) covers the cache too;
        without ``position_ids`` positions follow the mask (or the cache length). Position ids
        that restart without an attention mask are packed documents, as transformers'
        ``DataCollatorWithFlattening`` makes them: each document is attended alone."""
        _check_extra_kwargs(kwargs)
        cache = _resolve_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        position_ids = _packed_positions(kwargs, position_ids, attention_mask, *x.shape[:2])
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        # Only positions the caller gives can restart (packed documents): positions made here
        # never do, so they need no look at their values (which a compiled graph cannot branch on).
        given_positions = position_ids is not None
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, x.shape[1])
            else:
                position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]
        plan = None
        if attention_mask is None and given_positions and x.shape[1] > 1:
            plan = documents.packed_plan_from_positions(position_ids, x.shape[0])
        for layer in self.layers:
            x = layer(x, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                      document_ids=plan)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       **{OUTPUT_CACHE_FIELD: cache})


class SALlamaForCausalLM(SALlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SALlamaConfig) -> None:
        super().__init__(config)
        self.model = SALlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Hugging Face convention: ``labels`` are the inputs; the shift happens here."""
        _check_extra_kwargs(kwargs)
        packed = {name: kwargs[name] for name in FLASH_PACKED_KEYWORDS if name in kwargs}
        if packed:
            rows = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            position_ids = _packed_positions(packed, position_ids, attention_mask, *rows)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=_resolve_cache(cache, past_key_values),
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if attention_mask is None and position_ids is not None:  # packed: no target
                # crosses a document boundary (as DataCollatorWithFlattening's labels)
                labels = labels.masked_fill(documents.cross_document_targets(
                    position_ids.expand_as(labels)), -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{OUTPUT_CACHE_FIELD: getattr(out, OUTPUT_CACHE_FIELD)})


AutoConfig.register(SALlamaConfig.model_type, SALlamaConfig, exist_ok=True)
AutoModel.register(SALlamaConfig, SALlamaModel, exist_ok=True)
AutoModelForCausalLM.register(SALlamaConfig, SALlamaForCausalLM, exist_ok=True)
