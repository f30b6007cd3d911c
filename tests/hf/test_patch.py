"""patch / unpatch on tiny random models of every supported family."""

import pytest
import torch

from stochastic_attention.hf import patch, patched_config, unpatch
from stochastic_attention.testing import HF_FAMILIES, tiny_hf_model

METHODS = ("full", "stochastic", "sliding_window", "moba")


def _ids(n=24, batch=2, seed=0):
    return torch.randint(0, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_window_covering_the_sequence_reproduces_the_model(family):
    model = tiny_hf_model(family)
    ids = _ids()
    ref = _logits(model, ids)
    settings = [dict(), dict(sinks=2), dict(local=3, sinks=1), dict(head_split=2, layout="block"),
                dict(ensemble=3, local=2)]
    for method in METHODS:
        for extra in settings if method == "stochastic" else [dict()]:
            patch(model, method, 24, **extra)
            torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=1e-4)
            unpatch(model)


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_our_sliding_window_matches_transformers_sliding_window(family):
    own = {"sliding_window": 5}
    if family == "qwen3":
        own.update(use_sliding_window=True, max_window_layers=0)
    reference = tiny_hf_model(family, **own)
    ours = tiny_hf_model(family, sliding_window=None)
    ours.load_state_dict(reference.state_dict())
    patch(ours, "sliding_window", 5)
    ids = _ids(30)
    torch.testing.assert_close(_logits(ours, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)
    # Unpatched layers keep the model's own window: nothing changes when no layer is selected.
    patch(reference, "stochastic", 3, layers=[])
    torch.testing.assert_close(_logits(ours, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,extra", [("sliding_window", dict(window=6, sinks=2)),
                                          ("moba", dict(window=8, top_k=2, sinks=1)),
                                          ("stochastic", dict(window=40, local=4))])
def test_left_padded_batch_matches_each_sequence_alone(method, extra):
    model = patch(tiny_hf_model("llama"), method, **extra)
    a, b = _ids(20, 1, seed=1), _ids(13, 1, seed=2)
    batch = torch.zeros(2, 20, dtype=torch.long)
    batch[0], batch[1, 7:] = a[0], b[0]
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :7] = 0
    out = _logits(model, batch, mask)
    torch.testing.assert_close(out[0], _logits(model, a)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, 7:], _logits(model, b)[0], atol=1e-4, rtol=1e-4)


def test_generate_after_patching():
    model = tiny_hf_model("qwen2")
    prompt = _ids(16, 1)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    original = model.generate(prompt, **kw)
    patch(model, "stochastic", 64, sinks=2, local=4, decode="full")
    assert torch.equal(model.generate(prompt, **kw), original)
    patch(model, "stochastic", 4, decode="stochastic", local=2, sinks=1)
    sparse = model.generate(prompt, **kw)
    assert sparse.shape == original.shape
    assert torch.equal(model.generate(prompt, **kw), sparse)  # seeded: reruns agree
    patch(model, "moba", 8)
    assert model.generate(prompt, **kw).shape == original.shape


def test_permutation_ensemble_is_the_mean_over_independent_draws():
    from stochastic_attention import stochastic_attention
    from stochastic_attention.hf.attention import _generator, _stochastic
    from stochastic_attention.hf.config import PatchConfig
    from stochastic_attention.ops.permute import routing_permutation

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 17, 8, generator=g) for h in (4, 2, 2))
    cfg = PatchConfig(method="stochastic", window=3, sinks=1, local=2, ensemble=3)
    out = _stochastic(cfg, 5, q, k, v, None, 0.3)
    draws = _generator(0, 5, 0, torch.device("cpu"))
    parts = [stochastic_attention(q, k, v, 3, perm=routing_permutation(2, 4, 17, generator=draws),
                                  sinks=1, local=2, scale=0.3) for _ in range(3)]
    torch.testing.assert_close(out, sum(parts) / 3)
    single = _stochastic(PatchConfig(method="stochastic", window=3, sinks=1, local=2), 5, q, k, v,
                         None, 0.3)
    torch.testing.assert_close(single, parts[0])
    assert not torch.allclose(out, single)
    with pytest.raises(ValueError, match="ensemble applies to method='stochastic'"):
        patch(tiny_hf_model("llama"), "moba", 8, ensemble=2)
    with pytest.raises(ValueError, match="ensemble must be >= 1"):
        patch(tiny_hf_model("llama"), "stochastic", 8, ensemble=0)


def test_stochastic_decode_with_window_covering_the_cache_is_full_decode():
    model = tiny_hf_model("llama")
    prompt = _ids(12, 2)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    original = model.generate(prompt, **kw)
    patch(model, "stochastic", 32, decode="stochastic")
    assert torch.equal(model.generate(prompt, **kw), original)


def test_small_windows_change_the_output_and_unpatch_restores():
    model = tiny_hf_model("llama")
    ids = _ids(32)
    ref = _logits(model, ids)
    for method in ("stochastic", "sliding_window", "moba"):
        patch(model, method, 4)
        assert not torch.allclose(_logits(model, ids), ref, atol=1e-3)
    unpatch(model)
    assert patched_config(model) is None and model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_logits(model, ids), ref)


def test_head_split_extremes_are_sliding_window_and_stochastic():
    model = tiny_hf_model("llama")
    ids = _ids(32)
    patch(model, "stochastic", 4, head_split=0)
    split0 = _logits(model, ids)
    patch(model, "sliding_window", 4)
    torch.testing.assert_close(split0, _logits(model, ids))
    patch(model, "stochastic", 4, head_split=4, seed=3)
    split_all = _logits(model, ids)
    patch(model, "stochastic", 4, seed=3)
    torch.testing.assert_close(split_all, _logits(model, ids))
    patch(model, "stochastic", 4, seed=4)
    assert not torch.allclose(split_all, _logits(model, ids))  # the seed matters


def test_unpatched_layers_and_two_models_do_not_interfere():
    a, b = tiny_hf_model("llama"), tiny_hf_model("llama")
    ids = _ids(32)
    ref = _logits(a, ids)
    patch(a, "stochastic", 4, layers=[])  # no layer selected: the model's own attention
    patch(b, "sliding_window", 4)
    torch.testing.assert_close(_logits(a, ids), ref)
    assert not torch.allclose(_logits(b, ids), ref, atol=1e-3)
    patch(a, "stochastic", 4, layers=[-1])
    assert patched_config(a).applies_to(1) and not patched_config(a).applies_to(0)
    assert patched_config(b).method == "sliding_window"


def test_bad_input_is_rejected_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = tiny_hf_model("llama")
    with pytest.raises(ValueError, match="method must be one of"):
        patch(model, "linear", 8)
    with pytest.raises(ValueError, match="layout must be one of"):
        patch(model, "stochastic", 8, layout="diagonal")
    with pytest.raises(ValueError, match="window must be >= 1"):
        patch(model, "stochastic", 0)
    with pytest.raises(ValueError, match="out of range"):
        patch(model, "stochastic", 8, layers=[2])
    with pytest.raises(ValueError, match="needs method='stochastic'"):
        patch(model, "moba", 8, decode="stochastic")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="llama, qwen3, qwen2, mistral"):
        patch(gpt2, "stochastic", 8)
    with pytest.raises(ValueError, match="not patched"):
        unpatch(model)


def test_settings_survive_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    model = patch(tiny_hf_model("qwen3"), "stochastic", 6, sinks=1, local=2, seed=5)
    ids = _ids(24)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="stochastic").eval()
    assert patched_config(again) == patched_config(model)
    torch.testing.assert_close(_logits(again, ids), expected)
    # An explicit implementation wins: settings kept, unused.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert patched_config(plain) is not None
    unpatch(plain)
    assert not torch.allclose(_logits(plain, ids), expected, atol=1e-3)


@pytest.mark.parametrize("method,extra", [("stochastic", dict(sinks=1, local=2, seed=5)),
                                          ("sliding_window", dict(sinks=1)),
                                          ("moba", dict(top_k=2))])
def test_plain_from_pretrained_loads_the_patched_model(tmp_path, method, extra):
    """A saved patched model must not come back with full attention (it used to: sdpa)."""
    from transformers import AutoModelForCausalLM

    original = tiny_hf_model("llama")
    ids = _ids(24)
    full = _logits(original, ids)
    model = patch(original, method, 6, **extra)
    expected = _logits(model, ids)
    assert not torch.allclose(expected, full, atol=1e-3)
    model.save_pretrained(tmp_path / "a")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert again.config._attn_implementation == method
    assert patched_config(again) == patched_config(model)
    torch.testing.assert_close(_logits(again, ids), expected)
    again.save_pretrained(tmp_path / "b")  # and again after a reload
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), ids),
                               expected)
    unpatch(again)
    again.save_pretrained(tmp_path / "c")  # unpatched: back to the model's own attention
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "c"), ids),
                               full)


def test_full_method_saves_the_models_own_attention(tmp_path):
    from transformers import AutoModelForCausalLM

    model = patch(tiny_hf_model("llama"), "full", 6)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config._attn_implementation == "sdpa"
    assert patched_config(again).method == "full"


def test_loading_a_patched_model_without_the_package_fails_loudly(tmp_path):
    import json
    import subprocess
    import sys

    patch(tiny_hf_model("llama"), "stochastic", 6).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_implementation"] == "stochastic"
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            "AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "assert 'stochastic_attention' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, env={"PATH": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0 and "stochastic" in run.stderr


def test_load_pretrained_reapplies_saved_settings(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from stochastic_attention.models import load_pretrained

    model = patch(tiny_hf_model("mistral"), "moba", 8, top_k=2, sinks=1)
    ids = _ids(24)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")),
                            unk_token="a").save_pretrained(tmp_path)
    again, _ = load_pretrained(str(tmp_path))
    assert again.config._attn_implementation == "moba"
    torch.testing.assert_close(_logits(again, ids), expected)
    with pytest.raises(TypeError, match="name_or_path"):
        load_pretrained(3)


def test_load_pretrained_patches_folders_without_the_implementation_name(tmp_path):
    """Folders saved before config.json named the implementation; every setting comes back."""
    import json

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from stochastic_attention.models import load_pretrained

    model = patch(tiny_hf_model("llama"), "stochastic", 6, ensemble=3, seed=2)
    ids = _ids(24)
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["attn_implementation"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")),
                            unk_token="a").save_pretrained(tmp_path)
    again, _ = load_pretrained(str(tmp_path))
    assert patched_config(again).ensemble == 3
    torch.testing.assert_close(_logits(again, ids), expected)
