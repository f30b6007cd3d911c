"""Configuration of the SA-Llama decoder: Llama's shape plus a per-layer attention kind."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..nn.attention import DECODES, KINDS, SPARSE_DECODE_KINDS

# Attention options forwarded verbatim to every layer's MultiHeadAttention.
ATTENTION_OPTIONS = (
    "window", "sa_window", "swa_window", "sinks", "layout", "qk_norm", "perm_per_head",
    "eval_perm", "perm_seed", "gate", "gate_granularity", "gate_bias", "moba_block_size",
    "moba_topk", "fna_alpha", "fna_eps", "fna_window", "fna_stochastic", "local", "random_keys",
    "decode",
)
# Options that only one kind reads: the other layers of a mixed model get the neutral 0.
KIND_OPTIONS = {"local": "sa_local", "random_keys": "bigbird"}


class SALlamaConfig(PretrainedConfig):
    """Llama-style decoder (RMSNorm, SwiGLU, RoPE) whose layers may use different attention.

    ``attention_kinds`` is one kind for every layer ("full", "swa", "sa", "gated", "moba",
    "fna", "sa_local", "bigbird") or a list with one kind per layer. ``local`` is read by the
    "sa_local" layers and ``random_keys`` by the "bigbird" layers only (setting either with no
    such layer is an error). ``decode="stochastic"`` makes the SA-like layers ("sa", "gated",
    "sa_local", "bigbird") decode from sampled cached keys in O(window) per token; the other
    layers keep their own decoding. ``attention_backend`` picks the operators'
    backend ("auto", "blocked", "reference", "flex"). The other attention options are those
    of :class:`stochastic_attention.nn.MultiHeadAttention`. (The names avoid Hugging Face's
    ``sliding_window`` / ``layer_types``, which would make its caches drop old keys.)
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
        attention_kinds: str | list[str] = "full",
        window: int = 64,
        sa_window: int | None = None,
        swa_window: int | None = None,
        sinks: int = 0,
        layout: str = "band",
        qk_norm: bool = False,
        perm_per_head: bool = False,
        eval_perm: str = "seeded",
        perm_seed: int = 0,
        gate: str = "sigmoid",
        gate_granularity: str = "head",
        gate_bias: float | list[float] = 0.0,
        moba_block_size: int = 64,
        moba_topk: int = 2,
        fna_alpha: float = 0.5,
        fna_eps: float = 1.0,
        fna_window: int | None = None,
        fna_stochastic: bool = False,
        local: int = 0,
        random_keys: int = 0,
        decode: str = "full",
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
        if isinstance(attention_kinds, str):
            attention_kinds = [attention_kinds] * num_hidden_layers
        attention_kinds = list(attention_kinds)
        if len(attention_kinds) != num_hidden_layers:
            raise ValueError(f"attention_kinds has {len(attention_kinds)} entries but the model "
                             f"has num_hidden_layers={num_hidden_layers}; give one per layer")
        bad = [kind for kind in attention_kinds if kind not in KINDS]
        if bad:
            raise ValueError(f"attention_kinds: unknown kinds {bad}; choose from {KINDS}")
        for name, kind in KIND_OPTIONS.items():
            value = local if name == "local" else random_keys
            if value and kind not in attention_kinds:
                raise ValueError(f"{name}={value} is only used by {kind!r} layers, and "
                                 f"attention_kinds has none; set {name}=0 or add such layers")
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        if decode == "stochastic" and not set(attention_kinds) & set(SPARSE_DECODE_KINDS):
            raise ValueError(f"decode='stochastic' needs a layer of a kind in "
                             f"{SPARSE_DECODE_KINDS}; attention_kinds has none, use 'full'")
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
        self.head_dim, self.attention_kinds = head_dim, attention_kinds
        self.window, self.sa_window, self.swa_window = window, sa_window, swa_window
        self.sinks, self.layout, self.qk_norm = sinks, layout, qk_norm
        self.perm_per_head, self.eval_perm, self.perm_seed = perm_per_head, eval_perm, perm_seed
        self.gate, self.gate_granularity = gate, gate_granularity
        self.gate_bias = list(gate_bias) if isinstance(gate_bias, (list, tuple)) else gate_bias
        self.moba_block_size, self.moba_topk = moba_block_size, moba_topk
        self.fna_alpha, self.fna_eps, self.fna_window = fna_alpha, fna_eps, fna_window
        self.fna_stochastic = fna_stochastic
        self.local, self.random_keys, self.decode = local, random_keys, decode
        self.attention_backend, self.rope_theta = attention_backend, rope_theta
        self.rms_norm_eps, self.max_position_embeddings = rms_norm_eps, max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    def attention_kwargs(self, layer_idx: int) -> dict:
        """Keyword arguments of layer ``layer_idx``'s MultiHeadAttention."""
        options = {name: getattr(self, name) for name in ATTENTION_OPTIONS}
        for name, kind in KIND_OPTIONS.items():
            if self.attention_kinds[layer_idx] != kind:
                options[name] = 0
        if self.attention_kinds[layer_idx] not in SPARSE_DECODE_KINDS:
            options["decode"] = "full"
        if isinstance(options["gate_bias"], list):
            options["gate_bias"] = tuple(options["gate_bias"])
        return dict(options, kind=self.attention_kinds[layer_idx], layer_idx=layer_idx,
                    num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim,
                    backend=self.attention_backend, rope_theta=self.rope_theta,
                    norm_eps=self.rms_norm_eps)
