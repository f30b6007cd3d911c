"""What one row of an evaluation is: a method with its options, and its attention budget.

A method spec is written ``name[+option=value...]``, e.g. ``stochastic+sinks=4+local=64``,
``sliding_window+sinks=4``, ``moba+top_k=4``, ``stochastic+layout=block+layers=1:29``.
``local`` may be a share of the window (``local=0.5``): the union then has ``window * share``
local keys and an SA window of ``window - local``, so the nominal budget stays ``window``.
``layers=a:b`` patches layers a..b-1 (full attention in the other layers). ``ensemble=K`` averages
every SA layer over K permutations. Old method or option names (``swa``, ``moba_topk`` ...) are
errors that name the new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..functional import attended_keys
from ..hf.config import METHODS, PatchConfig, resolve_local
from ..ops.budget import ensemble_attended_keys
from ..ops.moba import moba_attended_keys
from ..ops.permute import random_permutation
from ..vocabulary import RENAMED_METHODS, reject_renamed

INT_OPTIONS = ("sinks", "top_k", "head_split", "ensemble")
STR_OPTIONS = ("layout", "decode")


@dataclass(frozen=True)
class MethodSpec:
    label: str
    method: str
    options: dict = field(default_factory=dict)

    def settings(self, window: int, num_layers: int, seed: int = 0) -> dict:
        """Keyword arguments for :func:`stochastic_attention.hf.patch` at this window."""
        kw = {k: v for k, v in self.options.items() if k not in ("local", "layers")}
        # An int is a number of tokens, a float a share of the nominal window: the same rule
        # (and the same errors) as hf.patch.
        window, local = resolve_local(window, self.options.get("local", 0))
        if local:
            kw["local"] = local
        if "layers" in self.options:
            a, b = self.options["layers"]
            kw["layers"] = list(range(a, num_layers + b if b <= 0 else b))
        if "head_split" in kw and isinstance(kw["head_split"], float):
            raise ValueError("head_split must be a number of heads")
        return {"method": self.method, "window": window, "seed": seed, **kw}


def parse_method(text: str) -> MethodSpec:
    """``name[+key=value...]`` -> MethodSpec (see the module doc)."""
    name, *parts = text.strip().split("+")
    if name not in METHODS:
        reject_renamed([name], f"method spec {text!r}", renamed=RENAMED_METHODS)
        raise ValueError(f"unknown method {name!r} in {text!r}; choose from {METHODS}")
    options: dict = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"method option {part!r} in {text!r} must look like key=value")
        reject_renamed([key], f"method option in {text!r}")
        if key in INT_OPTIONS:
            options[key] = int(value)
        elif key in STR_OPTIONS:
            options[key] = value
        elif key == "local":
            options[key] = float(value) if "." in value else int(value)
        elif key == "layers":
            a, _, b = value.partition(":")
            options[key] = (int(a or 0), int(b or 0))
        else:
            raise ValueError(f"unknown method option {key!r} in {text!r}; known: "
                             f"{INT_OPTIONS + STR_OPTIONS + ('local', 'layers')}")
    return MethodSpec(label=text.strip(), method=name, options=options)


def parse_methods(text: str) -> list[MethodSpec]:
    return [parse_method(t) for t in text.split(",") if t.strip()]


def _layer_keys(cfg: PatchConfig, n: int, heads: int, seed: int) -> float:
    """Mean keys per query of one patched layer (averaged over heads) at length n, no padding."""
    if cfg.method == "full":
        return (n + 1) / 2
    if cfg.method == "sliding_window":
        return attended_keys(n, cfg.window, method="sliding_window", sinks=cfg.sinks).float().mean().item()
    if cfg.method == "moba":
        keys = moba_attended_keys(n, cfg.block_size, cfg.top_k).float()
        return (keys + torch.clamp(torch.arange(n) + 1, max=cfg.sinks)).clamp(
            max=torch.arange(n) + 1).mean().item()  # sinks: an upper bound
    sa_heads = heads if cfg.head_split is None else min(cfg.head_split, heads)
    gen = torch.Generator().manual_seed(seed)
    if cfg.ensemble > 1:  # a query reads the union of its windows under the K permutations
        perms = [random_permutation(1, max(sa_heads, 1), n, generator=gen) for _ in range(cfg.ensemble)]
        sa = ensemble_attended_keys(n, cfg.window, perms, layout=cfg.layout, sinks=cfg.sinks,
                                    local=cfg.local).float().mean().item()
    else:
        perm = random_permutation(1, max(sa_heads, 1), n, generator=gen)
        sa = attended_keys(n, cfg.window, perm=perm, layout=cfg.layout, sinks=cfg.sinks,
                           local=cfg.local).float().mean().item()
    sliding = attended_keys(n, cfg.window, method="sliding_window", sinks=cfg.sinks).float().mean()
    return (sa * sa_heads + sliding.item() * (heads - sa_heads)) / heads


def mean_keys(spec: MethodSpec, window: int, n: int, model_config, seed: int = 0) -> float:
    """Mean attended keys per query and head over the whole model at sequence length n."""
    layers = model_config.num_hidden_layers
    cfg = PatchConfig(**spec.settings(window, layers, seed), num_layers=layers)
    patched = sum(cfg.applies_to(i) for i in range(layers))
    per_layer = _layer_keys(cfg, n, model_config.num_attention_heads, seed)
    return (per_layer * patched + (n + 1) / 2 * (layers - patched)) / layers
