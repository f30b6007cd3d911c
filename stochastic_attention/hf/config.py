"""The settings of a patched model: one validated object, stored on the model's config.

It lives in ``model.config.stochastic_attention`` as a plain dict (so ``save_pretrained`` writes
it to config.json and two models never share settings); :meth:`PatchConfig.from_model_config`
reads it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..ops.validate import check_int
from ..vocabulary import check_name, reject_renamed

# The methods a released model can be patched with (a subset of vocabulary.METHODS).
METHODS = ("full", "stochastic", "sliding_window", "moba")
LAYOUTS = ("band", "block")
DECODES = ("full", "stochastic")
CONFIG_KEY = "stochastic_attention"


def resolve_local(window: int, local) -> tuple[int, int]:
    """(window, local) from ``local`` given as a number of keys or as a share of the window.

    An int >= 0 is a number of recent tokens (``window`` unchanged). A float in (0, 1) is a
    share of the nominal window: ``round(window * local)`` recent tokens and an SA window of
    the rest, so the budget stays ``window``. Shared by :func:`~stochastic_attention.hf.patch`
    and ``sattn eval``'s method specs, so both accept the same forms.
    """
    if isinstance(local, bool) or not isinstance(local, (int, float)):
        raise TypeError(f"local must be an int (recent tokens) or a float in (0, 1) (a share of "
                        f"the window), got {local!r}")
    if isinstance(local, float):
        if not 0 < local < 1:
            raise ValueError(f"local as a float is a share of the window and must lie in (0, 1), "
                             f"got {local}; pass an int for a number of tokens")
        check_int("window", window)
        keys = int(round(window * local))
        return max(1, window - keys), keys
    if local < 0:
        raise ValueError(f"local must be >= 0 (0 turns the local window off), got {local}")
    return window, local


@dataclass(frozen=True)
class PatchConfig:
    """How the attention of a patched model works. See :func:`stochastic_attention.hf.patch`."""

    method: str
    window: int
    sinks: int = 0
    local: int = 0
    layout: str = "band"
    layers: tuple[int, ...] | None = None
    seed: int = 0
    decode: str = "full"
    top_k: int = 2
    head_split: int | None = None
    ensemble: int = 1
    num_layers: int | None = None
    restore_attn_implementation: str | None = None

    def __post_init__(self) -> None:
        check_name(self.method, METHODS)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {self.decode!r}")
        if self.decode == "stochastic" and self.method != "stochastic":
            raise ValueError("decode='stochastic' needs method='stochastic'; use decode='full'")
        for name, low in (("window", 1), ("sinks", 0), ("local", 0), ("seed", 0), ("top_k", 1),
                          ("ensemble", 1)):
            object.__setattr__(self, name, check_int(name, getattr(self, name), low))
        if self.ensemble > 1 and self.method != "stochastic":
            raise ValueError("ensemble applies to method='stochastic' only (the others are "
                             "deterministic); use ensemble=1")
        if self.head_split is not None:
            object.__setattr__(self, "head_split", check_int("head_split", self.head_split, 0))
        if self.layers is not None:
            layers = tuple(self.layers)
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int):
                    raise TypeError(f"layers must hold ints, got {i!r}")
                if self.num_layers is not None and not -self.num_layers <= i < self.num_layers:
                    raise ValueError(
                        f"layers entry {i} is out of range for a model with {self.num_layers} "
                        f"layers (use 0..{self.num_layers - 1} or negative indices)")
            object.__setattr__(self, "layers", layers)

    @property
    def block_size(self) -> int:
        """MoBA block size at the same budget as ``window`` keys: about top_k x block keys."""
        return max(1, self.window // self.top_k)

    def applies_to(self, layer_idx: int) -> bool:
        """Does this layer use the method (True) or keep the model's own attention (False)?"""
        if self.layers is None:
            return True
        n = self.num_layers or 0
        return any(layer_idx == (i % n if n else i) for i in self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PatchConfig:
        # settings saved before a rename (e.g. moba_topk) name the new key
        reject_renamed(d, "stochastic_attention settings")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown stochastic_attention settings {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_model_config(cls, config) -> PatchConfig:
        d = getattr(config, CONFIG_KEY, None)
        if d is None:
            raise ValueError(
                "this model has no stochastic_attention settings: call "
                "stochastic_attention.hf.patch(model, method, window, ...) or set "
                "config.stochastic_attention = {'method': ..., 'window': ...} before loading")
        return d if isinstance(d, cls) else cls.from_dict(dict(d))
