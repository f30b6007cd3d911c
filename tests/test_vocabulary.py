"""One name per method and option: the options classes, and the errors that old names raise."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoConfig

from stochastic_attention.hf import PatchConfig
from stochastic_attention.models import SALlamaConfig
from stochastic_attention.nn import (
    OPTIONS,
    GatedOptions,
    MultiHeadAttention,
    SlidingWindowOptions,
    StochasticOptions,
)
from stochastic_attention.nn.options import options_for
from stochastic_attention.vocabulary import METHODS, check_name, reject_renamed

# Every method's options with non-default values (StochasticLocalOptions needs ``local``).
EXAMPLES = {
    "full": {},
    "sliding_window": dict(window=8, sinks=2),
    "stochastic": dict(window=8, layout="block", sinks=1, decode="stochastic",
                       perm_per_head=True, eval_perm="random", perm_seed=3),
    "stochastic_local": dict(window=8, local=4),
    "gated": dict(window=8, local_window=4, gate="softmax", gate_granularity="channel",
                  gate_bias=(1.0, -1.0)),
    "moba": dict(block_size=16, top_k=3, sinks=1),
    "fractional": dict(alpha=1.2, eps=0.5, window=8, windows="stochastic", layout="block"),
    "bigbird": dict(window=8, random_keys=3, sinks=2, decode="stochastic"),
}


def test_every_method_has_one_options_class():
    assert tuple(OPTIONS) == METHODS == tuple(EXAMPLES)
    for method, cls in OPTIONS.items():
        assert cls.method == method


@pytest.mark.parametrize("method", METHODS)
def test_options_round_trip_through_a_plain_dict_and_json(method):
    cls = OPTIONS[method]
    options = cls(**EXAMPLES[method])
    plain = json.loads(json.dumps(options.to_dict()))
    assert cls.from_dict(plain) == options
    if method != "stochastic_local":  # its `local` has no default
        assert cls.from_dict({}) == cls()


@pytest.mark.parametrize("method,bad,match", [
    ("sliding_window", dict(window=0), "window must be >= 1"),
    ("sliding_window", dict(sinks=-1), "sinks must be >= 0"),
    ("stochastic", dict(layout="diagonal"), "layout must be one of"),
    ("stochastic", dict(decode="sparse"), "decode must be one of"),
    ("stochastic", dict(eval_perm="fixed"), "eval_perm must be one of"),
    ("stochastic_local", dict(local=0), "local must be >= 1"),
    ("gated", dict(gate="tanh"), "gate must be one of"),
    ("gated", dict(gate_bias=(1.0, 2.0, 3.0)), "gate_bias must be a float or a pair"),
    ("gated", dict(local_window=0), "local_window must be >= 1"),
    ("moba", dict(top_k=0), "top_k must be >= 1"),
    ("fractional", dict(alpha=2.5), r"alpha must be in \(0, 2\]"),
    ("fractional", dict(window=None), "windows='stochastic' needs window"),
    ("bigbird", dict(random_keys=-1), "random_keys must be >= 0"),
])
def test_options_check_their_values(method, bad, match):
    with pytest.raises(ValueError, match=match):
        OPTIONS[method](**dict(EXAMPLES[method], **bad))


def test_options_are_frozen_and_name_their_owners():
    options = StochasticOptions(window=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.window = 4
    with pytest.raises(ValueError, match="'top_k' is an option of moba"):
        StochasticOptions.from_dict({"top_k": 2})
    with pytest.raises(TypeError, match="must be a dict"):
        StochasticOptions.from_dict([("window", 8)])
    assert GatedOptions(window=8).sliding_window == 8  # local_window defaults to window
    assert GatedOptions(gate_bias=[1.0, 2.0]).gate_bias == (1.0, 2.0)  # from JSON


def test_layer_takes_an_options_object_or_a_dict_of_its_fields():
    a = MultiHeadAttention(16, 2, method="stochastic", options=StochasticOptions(window=4))
    b = MultiHeadAttention(16, 2, method="stochastic", options={"window": 4})
    assert a.options == b.options == StochasticOptions(window=4)
    with pytest.raises(TypeError, match="takes StochasticOptions"):
        MultiHeadAttention(16, 2, method="stochastic", options=SlidingWindowOptions())
    with pytest.raises(ValueError, match="'sliding_window' draws no permutation"):
        MultiHeadAttention(16, 2, method="sliding_window").draw_permutation(1, 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="sa"), "'kind' was renamed: use 'method'"),
    (dict(method="stochastic", window=8), r"pass it in options, e\.g\. options=\{'window': 8\}"),
    (dict(method="moba", moba_topk=2), "'moba_topk' was renamed: use 'top_k'"),
    (dict(method="gated", swa_window=2), "'swa_window' was renamed: use local_window"),
    (dict(method="fractional", fna_stochastic=True), "use windows='stochastic'"),
    (dict(method="stochastic", colour="red"), "unexpected keyword arguments"),
])
def test_old_layer_keywords_name_the_new_ones(kwargs, match):
    with pytest.raises(TypeError, match=match):
        MultiHeadAttention(16, 2, **kwargs)


@pytest.mark.parametrize("old,new", [("swa", "sliding_window"), ("sa", "stochastic"),
                                     ("sa_band", "stochastic"), ("dense", "full"),
                                     ("sa_local", "stochastic_local"), ("fna", "fractional")])
def test_old_method_names_name_the_new_ones(old, new):
    with pytest.raises(ValueError, match=f"method '{old}' was renamed: use '{new}'"):
        MultiHeadAttention(16, 2, method=old)
    with pytest.raises(ValueError, match=f"'{old}' was renamed: use '{new}'"):
        SALlamaConfig(attention_methods=old)
    assert check_name(new, METHODS) == new


def test_the_helpers_word_every_error_alike():
    with pytest.raises(ValueError, match="^--kinds entry 'sa_block' was renamed: use "
                                         "stochastic with layout='block'"):
        check_name("sa_block", METHODS, what="--kinds entry")
    with pytest.raises(ValueError, match="must be one of"):
        check_name("linear", METHODS)
    with pytest.raises(TypeError, match="^here: 'kind' was renamed: use 'method'$"):
        reject_renamed(["window", "kind"], "here", error=TypeError)
    reject_renamed(["window", "method"], "here")  # current names pass


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention_kinds="sa"), "'attention_kinds' was renamed: use 'attention_methods'"),
    (dict(window=32), r"attention_options=\{'window': 32\}"),
    (dict(sa_window=32), r"attention_options=\{'window': 32\}"),
    (dict(swa_window=8), r"attention_options=\{'local_window': 8\}"),
    (dict(moba_topk=2), r"attention_options=\{'top_k': 2\}"),
    (dict(fna_stochastic=True), r"attention_options=\{'windows': 'stochastic'\}"),
    (dict(attention_options={"moba_block_size": 8}), "'moba_block_size' was renamed: use "
                                                     "'block_size'"),
])
def test_old_model_config_keys_name_the_new_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SALlamaConfig(**kwargs)


def test_a_config_json_saved_with_the_old_keys_is_refused_clearly(tmp_path):
    SALlamaConfig(num_hidden_layers=2, attention_methods="stochastic",
                  attention_options={"window": 8}).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).attention_options == {"window": 8}
    saved = json.loads((tmp_path / "config.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("attention_methods", "attention_options")}
    (tmp_path / "config.json").write_text(json.dumps(dict(old, attention_kinds=["sa", "sa"],
                                                          window=8)))
    with pytest.raises(ValueError, match="'attention_kinds' was renamed: use 'attention_methods'"):
        AutoConfig.from_pretrained(tmp_path)


def test_model_options_shared_and_per_method():
    config = SALlamaConfig(num_hidden_layers=3,
                           attention_methods=["sliding_window", "gated", "moba"],
                           attention_options={"window": 6, "sinks": 1, "top_k": 3,
                                              "gated": {"window": 64, "local_window": 4}})
    assert config.layer_options(0) == SlidingWindowOptions(window=6, sinks=1)
    assert config.layer_options(1) == GatedOptions(window=64, local_window=4, sinks=1)
    assert (config.layer_options(2).top_k, config.layer_options(2).sinks) == (3, 1)
    assert options_for("stochastic", config.attention_options) == StochasticOptions(window=6,
                                                                                    sinks=1)
    with pytest.raises(ValueError, match="entry for 'moba' layers"):
        SALlamaConfig(attention_methods="stochastic", attention_options={"moba": {"top_k": 2}})
    with pytest.raises(ValueError, match="unknown options \\['random_keys'\\] for method 'gated'"):
        SALlamaConfig(attention_methods="gated", attention_options={"gated": {"random_keys": 2}})
    with pytest.raises(TypeError, match="'gated' entry of the options must be a dict"):
        SALlamaConfig(attention_methods="gated", attention_options={"gated": 4})
    # options several methods share may be set for a model that does not read them
    assert SALlamaConfig(attention_methods="full", attention_options={"window": 32})


def test_patched_model_settings_with_an_old_key_name_the_new_one():
    cfg = PatchConfig(method="moba", window=16, top_k=4)
    assert PatchConfig.from_dict(cfg.to_dict()) == cfg and cfg.block_size == 4
    old = dict(cfg.to_dict(), moba_topk=4)
    del old["top_k"]
    with pytest.raises(ValueError, match="'moba_topk' was renamed: use 'top_k'"):
        PatchConfig.from_dict(old)
    with pytest.raises(ValueError, match="'swa' was renamed: use 'sliding_window'"):
        PatchConfig(method="swa", window=16)
