"""The installed transformers / accelerate / lm_eval / safetensors are the tested ones.

stochastic-attention relies on details of these libraries that change between releases (the
KV-cache keyword generate passes, the attention and mask interfaces, which config keys are
saved). pyproject.toml pins the ranges the suite was run with; these tests fail loudly outside
them, and check the contracts directly so that a widened range is checked too.
"""

from __future__ import annotations

import inspect
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PINNED = ("transformers", "accelerate", "lm_eval", "safetensors")


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    found: dict[str, Requirement] = {}
    for spec in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "_", req.name.lower())
        if req.specifier and name in PINNED:
            found.setdefault(name, req)
    return found


@pytest.mark.parametrize("name", PINNED)
def test_installed_version_is_in_the_tested_range(name):
    requirement = _requirements().get(name)
    assert requirement is not None, f"pyproject.toml must pin a tested range for {name}"
    try:
        installed = version(name)
    except PackageNotFoundError:
        pytest.fail(f"{name} is not installed: run scripts/setup.sh")
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{name} {installed} is outside the tested range {requirement} (pyproject.toml). "
        f"Install the tested version (scripts/setup.sh), or run the whole suite on {installed}, "
        "fix what breaks (the cache keyword in models/sa_llama.py, hf/attention.py's interface, "
        "hf/patching.py's saved attn_implementation) and widen the range and setup.sh's pins")


def test_every_extra_pins_the_same_range():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    ranges: dict[str, set[str]] = {}
    for spec in sum(project["optional-dependencies"].values(), []):
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "_", req.name.lower())
        if name in PINNED:
            ranges.setdefault(name, set()).add(str(req.specifier))
    assert all(len(r) == 1 for r in ranges.values()), ranges


def test_generation_passes_the_cache_under_a_keyword_sa_llama_reads():
    from transformers import GenerationMixin

    from stochastic_attention.models.sa_llama import CACHE_KEYWORDS, SALlamaForCausalLM

    prepare = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert set(prepare) & set(CACHE_KEYWORDS), (
        f"GenerationMixin.prepare_inputs_for_generation takes {list(prepare)}: none of "
        f"{CACHE_KEYWORDS}; generate would hand SA-Llama its cache under a name forward ignores")
    forward = inspect.signature(SALlamaForCausalLM.forward).parameters
    assert all(name in forward for name in CACHE_KEYWORDS)
    # position_ids is computed by generate only for models whose forward names it.
    assert "position_ids" in forward


def test_saved_config_key_restores_the_attention_implementation():
    """hf.patching writes attn_implementation to config.json; loading must read it back."""
    from transformers import LlamaConfig

    config = LlamaConfig.from_dict({**LlamaConfig().to_dict(), "attn_implementation": "eager"})
    assert config._attn_implementation == "eager"
    assert "attn_implementation" not in LlamaConfig().to_dict()  # not saved by transformers
