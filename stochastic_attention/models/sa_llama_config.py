"""Configuration of the SA-Llama decoder: Llama's shape plus a per-layer attention method."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..nn.methods import method_names
from ..nn.options import (
    OPTIONS,
    option_names,
    options_for,
    owners_of,
    sparse_decode_methods,
)
from ..vocabulary import check_name, reject_renamed

# Former arguments of SALlamaConfig that are now entries of attention_options (new name).
MOVED_TO_OPTIONS = {
    "window": "window", "sinks": "sinks", "layout": "layout", "perm_per_head": "perm_per_head",
    "eval_perm": "eval_perm", "perm_seed": "perm_seed", "gate": "gate",
    "gate_granularity": "gate_granularity", "gate_bias": "gate_bias", "local": "local",
    "random_keys": "random_keys", "decode": "decode", "sa_window": "window",
    "swa_window": "local_window", "moba_block_size": "block_size", "moba_topk": "top_k",
    "fna_alpha": "alpha", "fna_eps": "eps", "fna_window": "window",
    "fna_stochastic": "windows",
}


class SALlamaConfig(PretrainedConfig):
    """Llama-style decoder (RMSNorm, SwiGLU, RoPE) whose layers may use different attention.

    ``attention_methods`` is one method for every layer (one of
    :data:`~stochastic_attention.vocabulary.METHODS` or a method registered with
    :func:`stochastic_attention.nn.methods.register`) or a list with one method per layer.
    ``attention_options`` is one dict of method options (see
    :mod:`stochastic_attention.nn.options`) for all layers: each layer takes the options its
    method has (``window`` serves every windowed layer) and the defaults for the others; an
    entry named after a method is a dict of options for that method's layers only, e.g.
    ``{"window": 32, "gated": {"window": 64}}``. An
    option that only one method has (``local``, ``random_keys``, ``top_k`` ...) with no layer
    of that method is an error, as is ``decode="stochastic"`` with no layer that samples keys
    (stochastic, stochastic_local, gated, bigbird); options that several methods share may be
    set for a model that does not read them, so configs that differ only in their methods can
    share one options block. ``qk_norm`` and ``attention_backend`` (the operators' backend:
    "auto", "blocked", "reference", "flex") apply to every layer. (The names avoid Hugging
    Face's ``sliding_window`` / ``layer_types``, which would make its caches drop old keys.)
    """

    model_type = "sa_llama"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 257,
        hidden_size: int = 128,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_methods: str | list[str] = "full",
        attention_options: dict | None = None,
        qk_norm: bool = False,
        attention_backend: str = "auto",
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 256,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        reject_old_arguments(kwargs)
        if isinstance(attention_methods, str):
            attention_methods = [attention_methods] * num_hidden_layers
        attention_methods = list(attention_methods)
        if len(attention_methods) != num_hidden_layers:
            raise ValueError(f"attention_methods has {len(attention_methods)} entries but the "
                             f"model has num_hidden_layers={num_hidden_layers}; give one per layer")
        for method in attention_methods:
            check_name(method, method_names(), what="attention_methods entry")
        attention_options = _check_options(attention_methods, attention_options)
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by "
                                 f"num_attention_heads ({num_attention_heads}), or set head_dim")
            head_dim = hidden_size // num_attention_heads
        if intermediate_size is None:  # Llama's 8/3 expansion, rounded up to a multiple of 32
            intermediate_size = -(-8 * hidden_size // 3 // 32) * 32
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim, self.attention_methods = head_dim, attention_methods
        self.attention_options, self.qk_norm = attention_options, qk_norm
        self.attention_backend, self.rope_theta = attention_backend, rope_theta
        self.rms_norm_eps, self.max_position_embeddings = rms_norm_eps, max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def layer_options(self, layer_idx: int):
        """The options object of layer ``layer_idx``'s method."""
        return options_for(self.attention_methods[layer_idx], self.attention_options)

    def attention_kwargs(self, layer_idx: int) -> dict:
        """Keyword arguments of layer ``layer_idx``'s MultiHeadAttention."""
        return dict(method=self.attention_methods[layer_idx],
                    options=self.layer_options(layer_idx), layer_idx=layer_idx,
                    num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim,
                    qk_norm=self.qk_norm, backend=self.attention_backend,
                    rope_theta=self.rope_theta, norm_eps=self.rms_norm_eps)


def reject_old_arguments(kwargs: dict) -> None:
    """Old arguments (from code or a config.json saved before the rename) are errors."""
    reject_renamed([k for k in kwargs if k not in MOVED_TO_OPTIONS], "SALlamaConfig")
    for old, new in MOVED_TO_OPTIONS.items():
        if old in kwargs:
            value = "'stochastic'" if old == "fna_stochastic" else repr(kwargs[old])
            raise ValueError(f"SALlamaConfig: {old!r} is an attention option now: pass "
                             f"attention_options={{{new!r}: {value}}} (options of all layers "
                             "in one dict; see stochastic_attention.nn.options)")


def _check_options(methods: list[str], options) -> dict:
    """The options as a plain dict, after building every layer's options object once."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TypeError(f"attention_options must be a dict of method options, "
                        f"got {type(options).__name__}")
    sections = [name for name in options if name in method_names()]
    reject_renamed([name for name in options if name not in sections], "attention_options")
    known = option_names()
    unknown = sorted(set(options) - set(known) - set(sections))
    if unknown:
        raise ValueError(f"attention_options: unknown options {unknown}; known: "
                         f"{list(known)} and a dict per method")
    for name in sections:
        if name not in methods:
            raise ValueError(f"attention_options has an entry for {name!r} layers, and "
                             "attention_methods has none; remove it or add such layers")
    used = {name for method in set(methods) for name in OPTIONS[method].names()}
    for name in sorted(set(options) - used):
        owners = owners_of(name)
        if len(owners) == 1:
            raise ValueError(f"attention_options: {name!r} is an option of {owners[0]!r} "
                             f"layers only, and attention_methods has none; remove it or add "
                             "such layers")
    sparse = sparse_decode_methods()
    if options.get("decode") == "stochastic" and not set(methods) & set(sparse):
        raise ValueError(f"attention_options: decode='stochastic' needs a layer whose method "
                         f"samples keys ({', '.join(sparse)}); "
                         "attention_methods has none, use 'full'")
    for method in dict.fromkeys(methods):
        options_for(method, options)  # each method's own checks, where the config is written
    return _plain(options)


def _plain(value):
    """JSON-ready: tuples become lists, in nested dicts too."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value
