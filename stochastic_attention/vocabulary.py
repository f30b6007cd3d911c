"""One name per attention method and option, and the errors that old names raise.

The argument that selects a method is ``method`` everywhere (the layer, the model config, the
CLI, ``sattn eval``'s method specs). Old names are not aliases: a config, spec, CLI value or
keyword that still uses one raises an error naming its replacement, through the two helpers
below, so every part of the package words it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

METHODS = ("full", "sliding_window", "stochastic", "stochastic_local", "gated", "moba",
           "fractional", "bigbird")

# Former method names -> their replacement (written as it should be typed).
RENAMED_METHODS = {
    "dense": "full",
    "swa": "sliding_window",
    "sa": "stochastic",
    "sa_band": "stochastic",
    "sa_block": "stochastic with layout='block'",
    "sa_local": "stochastic_local",
    "sa_swa": "gated",
    "fna": "fractional",
}

# Former option / selector names -> their replacement.
RENAMED_OPTIONS = {
    "kind": "method",
    "kinds": "methods",
    "attention_kinds": "attention_methods",
    "moba_topk": "top_k",
    "topk": "top_k",
    "moba_block_size": "block_size",
    "moba_block": "block_size",
    "fna_alpha": "alpha",
    "fna_eps": "eps",
    "fna_window": "window",
    "fna_stochastic": "windows='stochastic'",
    "sa_window": "window",
    "swa_window": "local_window (the gated method's sliding-window branch) or window",
}


def _shown(new: str) -> str:
    return repr(new) if new.isidentifier() else new


def check_name(value, known: Iterable[str], what: str = "method",
               renamed: Mapping[str, str] = RENAMED_METHODS) -> str:
    """``value`` if it is one of ``known``; an old name raises a ValueError naming the new one.

    ``what`` says what the value is ("method", "--methods entry" ...) in the message;
    ``renamed`` maps old names to new ones (contexts with labels of their own extend
    :data:`RENAMED_METHODS`).
    """
    known = tuple(known)
    if value in known:
        return value
    if isinstance(value, str) and value in renamed:
        raise ValueError(f"{what} {value!r} was renamed: use {_shown(renamed[value])} "
                         f"(one of {known})")
    raise ValueError(f"{what} must be one of {known}, got {value!r}")


def reject_renamed(keys: Iterable[str], where: str,
                   renamed: Mapping[str, str] = RENAMED_OPTIONS, error: type = ValueError) -> None:
    """Raise ``error`` for the first of ``keys`` (option / keyword names) that is an old name.

    ``where`` names the place in the message: "model config", "MultiHeadAttention()" ...
    """
    for key in keys:
        if key in renamed:
            raise error(f"{where}: {key!r} was renamed: use {_shown(renamed[key])}")
