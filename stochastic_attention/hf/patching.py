"""Switch a transformers model to stochastic / sliding-window / MoBA attention in place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial, wraps

from ..vocabulary import check_name
from .attention import attention_forward, padding_mask
from .config import CONFIG_KEY, METHODS, PatchConfig, resolve_local

# model_type values whose attention modules follow the contract we rely on (query/key/value
# handed to the attention interface after RoPE, a ``layer_idx`` per module, the model's mask
# built through ``AttentionMaskInterface``). Each is covered by the tests.
SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "qwen2", "mistral")
REGISTERED = ("stochastic", "sliding_window", "moba")


def register() -> None:
    """Register the attention and mask functions with transformers (idempotent).

    Afterwards ``from_pretrained(..., attn_implementation="stochastic")`` and
    ``model.set_attn_implementation("moba")`` work; settings come from
    ``config.stochastic_attention`` (written by :func:`patch`).
    """
    from transformers import AttentionInterface, AttentionMaskInterface

    for name in REGISTERED:
        AttentionInterface.register(name, partial(attention_forward, method=name))
        AttentionMaskInterface.register(name, padding_mask)
    _save_attn_implementation()


def _save_attn_implementation() -> None:
    """Make saved configs of patched models name their attention implementation.

    transformers never writes the active implementation to config.json, so a saved patched
    model would come back with sdpa and ignore its ``stochastic_attention`` settings. A config
    that carries those settings and runs one of our implementations now also writes
    ``"attn_implementation": <name>``, which ``from_pretrained`` reads back: the model loads
    patched once this package is imported, and loading it without the package fails loudly
    (transformers rejects the unknown implementation) instead of silently using full attention.
    """
    from transformers import PretrainedConfig

    original = PretrainedConfig.to_dict
    if getattr(original, "_writes_attn_implementation", False):
        return

    @wraps(original)
    def to_dict(self) -> dict:
        d = original(self)
        implementation = getattr(self, "_attn_implementation", None)
        if d.get(CONFIG_KEY) is not None and implementation in REGISTERED:
            d["attn_implementation"] = implementation
        return d

    to_dict._writes_attn_implementation = True
    PretrainedConfig.to_dict = to_dict


def check_supported(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported by stochastic_attention.hf; supported "
            f"families: {', '.join(SUPPORTED_MODEL_TYPES)} (Llama/SmolLM2, Qwen3, Qwen2, Mistral)")


def patch(
    model,
    method: str,
    window: int,
    *,
    sinks: int = 0,
    local: int = 0,
    layout: str = "band",
    layers=None,
    seed: int = 0,
    decode: str = "full",
    top_k: int = 2,
    head_split: int | None = None,
    ensemble: int = 1,
):
    """Switch ``model``'s attention to ``method`` in place and return the model.

    Args:
        method: "stochastic" (SA), "sliding_window" (SWA), "moba" or "full".
        window: keys per query (the query included). For MoBA, blocks of ``window // top_k``.
        sinks: the first ``sinks`` real tokens are visible to every query.
        local: SA only: every query also sees its last ``local`` tokens, in the same softmax.
            A float in (0, 1) is a share of ``window`` (as in ``sattn eval``'s method specs):
            ``round(window * local)`` recent tokens and an SA window of the rest.
        layout: SA window layout in permuted order, "band" or "block".
        layers: indices of the layers that change (negative ones count from the end); the
            others keep the model's own attention. None = all layers.
        seed: permutations are drawn per layer from (seed, layer); reruns are identical.
        decode: with a KV cache, "full" attends to the whole cache (the default protocol);
            "stochastic" (SA only) to the sinks, ``max(local, 1)`` recent tokens and a fresh
            random sample of ``window`` cached keys, gathered: O(window) per generated token.
        top_k: blocks per query for MoBA (own block included).
        head_split: SA only: the first ``head_split`` query heads use SA, the others SWA
            (0 to the model's number of query heads).
        ensemble: SA only: every SA layer returns the mean of its outputs under ``ensemble``
            independent permutations (a permutation ensemble; that many times the attention
            work, and each query reads the union of the windows).

    The settings are stored in ``model.config.stochastic_attention``; ``save_pretrained`` also
    writes the implementation name, so ``AutoModelForCausalLM.from_pretrained(dir)`` (with
    this package imported) loads the model patched. :func:`unpatch` restores the previous
    attention; :func:`patched` patches for a ``with`` block only.
    """
    check_supported(model)
    check_name(method, METHODS)
    if head_split is not None and method != "stochastic":
        raise ValueError("head_split applies to method='stochastic' only")
    if local and method != "stochastic":
        raise ValueError("local applies to method='stochastic' only (SWA already is local)")
    window, local = resolve_local(window, local)
    heads = getattr(model.config, "num_attention_heads", None)
    if (isinstance(head_split, int) and not isinstance(head_split, bool) and heads is not None
            and head_split > heads):  # type and sign: PatchConfig below
        raise ValueError(f"head_split must be between 0 and the model's {heads} query heads, "
                         f"got {head_split}")
    previous = getattr(model.config, CONFIG_KEY, None)
    restore = (previous["restore_attn_implementation"] if previous
               else model.config._attn_implementation)
    cfg = PatchConfig(method=method, window=window, sinks=sinks, local=local, layout=layout,
                      layers=layers, seed=seed, decode=decode, top_k=top_k,
                      head_split=head_split, ensemble=ensemble, num_layers=model.config.num_hidden_layers,
                      restore_attn_implementation=restore)
    register()
    setattr(model.config, CONFIG_KEY, cfg.to_dict())
    model.set_attn_implementation(restore if method == "full" else method)
    return model


def unpatch(model):
    """Restore the attention the model had before :func:`patch`; returns the model."""
    previous = getattr(model.config, CONFIG_KEY, None)
    if previous is None:
        raise ValueError("this model is not patched (no config.stochastic_attention)")
    model.set_attn_implementation(previous["restore_attn_implementation"] or "sdpa")
    delattr(model.config, CONFIG_KEY)
    return model


@contextmanager
def patched(model, method: str, window: int, **options) -> Iterator:
    """:func:`patch` for the length of a ``with`` block (same arguments), undone on exit.

    The model gets its previous attention back however the block ends, an exception
    included, so an error in the middle of a sweep never leaves it patched. A model that was
    patched already returns to those settings::

        with patched(model, "stochastic", 64, sinks=4):
            loss = score(model)
    """
    before = getattr(model.config, CONFIG_KEY, None)
    implementation = model.config._attn_implementation
    patch(model, method, window, **options)  # (bad arguments raise before any change)
    try:
        yield model
    finally:
        if before is None:
            unpatch(model)
        else:
            setattr(model.config, CONFIG_KEY, before)
            model.set_attn_implementation(implementation)


def patched_config(model) -> PatchConfig | None:
    """The model's settings, or None if it is not patched."""
    d = getattr(model.config, CONFIG_KEY, None)
    return None if d is None else PatchConfig.from_dict(d)
