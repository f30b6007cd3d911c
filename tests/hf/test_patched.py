"""patched(): patch for a ``with`` block, and the model's own attention back however it ends."""

import pytest
import torch

from stochastic_attention.eval import parse_methods, run_sweep
from stochastic_attention.eval import sweep as sweep_module
from stochastic_attention.eval.tasks import Task
from stochastic_attention.hf import patch, patched, patched_config, unpatch
from stochastic_attention.hf.config import CONFIG_KEY
from stochastic_attention.testing import tiny_hf_model


def _ids(n=32, batch=2, seed=0):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _assert_unpatched(model, ids, reference):
    assert patched_config(model) is None and not hasattr(model.config, CONFIG_KEY)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(model, ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["stochastic", "sliding_window", "moba"])
def test_patched_inside_the_block_and_restored_after(method):
    model = tiny_hf_model("llama")
    ids = _ids()
    reference = _logits(model, ids)
    with patched(model, method, 4, sinks=1) as inside:
        assert inside is model and model.config._attn_implementation == method
        assert patched_config(model).method == method and patched_config(model).sinks == 1
        assert not torch.allclose(_logits(model, ids), reference, atol=1e-3)
    _assert_unpatched(model, ids, reference)


@pytest.mark.parametrize("method", ["stochastic", "sliding_window", "moba", "full"])
def test_an_exception_in_the_block_leaves_the_model_unpatched(method):
    model = tiny_hf_model("qwen3")
    ids = _ids()
    reference = _logits(model, ids)
    with pytest.raises(RuntimeError, match="mid-sweep"):
        with patched(model, method, 4):
            assert patched_config(model) is not None
            _logits(model, ids)
            raise RuntimeError("mid-sweep")
    _assert_unpatched(model, ids, reference)


def test_bad_arguments_raise_before_anything_changes():
    model = tiny_hf_model("llama")
    ids = _ids()
    reference = _logits(model, ids)
    with pytest.raises(ValueError, match="window must be >= 1"):
        with patched(model, "stochastic", 0):
            pytest.fail("the block must not run")
    _assert_unpatched(model, ids, reference)


def test_a_patched_model_returns_to_its_own_settings():
    model = tiny_hf_model("llama")
    ids = _ids()
    reference = _logits(model, ids)
    patch(model, "sliding_window", 6, sinks=1)
    settings, before = patched_config(model), _logits(model, ids)
    with pytest.raises(KeyError):
        with patched(model, "stochastic", 4, seed=3):
            assert patched_config(model).method == "stochastic"
            raise KeyError("inner")
    assert patched_config(model) == settings
    assert model.config._attn_implementation == "sliding_window"
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=0)
    unpatch(model)  # and the attention before the first patch is still the one restored
    _assert_unpatched(model, ids, reference)


def test_a_failing_task_in_an_eval_sweep_leaves_the_model_unpatched(monkeypatch):
    model = tiny_hf_model("llama")
    ids = _ids()
    reference = _logits(model, ids)
    seen = []

    def failing(model, task, tokenizer):
        seen.append(patched_config(model).method)
        if len(seen) == 2:  # the second row of the grid: full attention scored, SA patched
            raise RuntimeError("scorer failed")
        return 1.0

    monkeypatch.setitem(sweep_module.SCORERS, "perplexity", failing)
    task = Task("perplexity", "perplexity", higher_is_better=False, length=32)
    with pytest.raises(RuntimeError, match="scorer failed"):
        run_sweep(model, None, parse_methods("full,stochastic"), [4], [0], [task])
    assert seen == ["full", "stochastic"]
    _assert_unpatched(model, ids, reference)
