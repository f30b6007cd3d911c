"""The evaluation pipeline end to end on a tiny model, a word-level tokenizer and synthetic text."""

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from stochastic_attention import attended_keys
from stochastic_attention.data.corpora import Document
from stochastic_attention.eval import aggregate, mean_keys, parse_method, parse_methods, run_sweep
from stochastic_attention.eval import tasks as T
from stochastic_attention.eval.report import load_records, save
from stochastic_attention.testing import tiny_hf_model

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


def _tokenizer():
    vocab = {"[UNK]": 0, ".": 1, "?": 2, ":": 3}
    for w in WORDS + [w.capitalize() for w in WORDS] + "The pass key is Remember it What".split():
        vocab.setdefault(w, len(vocab))
    for d in range(10):
        vocab[str(d)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def _docs(n=6, sentences=120, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize()
                        + "." for _ in range(sentences))
        docs.append(Document(title=f"doc{i}", text=text, source="synthetic"))
    return docs


def test_tasks_are_reproducible_and_well_formed():
    tok, docs = _tokenizer(), _docs()
    a = T.lastword_task(tok, docs, count=4, context=40, seed=3)
    b = T.lastword_task(tok, docs, count=4, context=40, seed=3)
    assert len(a.examples) == 4
    for x, y in zip(a.examples, b.examples, strict=True):
        assert torch.equal(x["context"], y["context"]) and torch.equal(x["target"], y["target"])
        word = tok.decode(x["target"]).strip()
        assert word in tok.decode(x["context"]).split()  # the answer occurs in the context
    nl = T.nextline_task(tok, docs, count=3, context=40, seed=1)
    assert all(len(ex["choices"]) == 4 and 0 <= ex["label"] < 4 for ex in nl.examples)
    pk = T.passkey_task(tok, docs, lengths=[120], depths=[0.5], per_cell=2, seed=0)
    for ex in pk.examples:
        assert len(ex["ids"]) == 120
        assert " ".join(ex["key"]) in tok.decode(ex["ids"])  # digits are single tokens here
    ppl = T.perplexity_task(tok, docs, count=2, length=50, seed=0)
    assert [len(x) for x in ppl.examples] == [50, 50]


def test_sweep_report_and_budget(tmp_path):
    tok, docs = _tokenizer(), _docs()
    model = tiny_hf_model("llama", vocab_size=len(tok))
    tasks = [T.perplexity_task(tok, docs, count=1, length=40, seed=0),
             T.lastword_task(tok, docs, count=1, context=24, seed=0),
             T.nextline_task(tok, docs, count=1, context=24, seed=0),
             T.passkey_task(tok, docs, lengths=[72], depths=[0.5], per_cell=1, seed=0)]
    specs = parse_methods("full,sliding_window+sinks=2,stochastic+local=0.5,moba")
    records = run_sweep(model, tok, specs, [8, 96], [0, 1], tasks)
    # full once; SWA and MoBA once per window; SA once per window and seed.
    assert len(records) == (1 + 2 + 4 + 2) * 4
    summary = aggregate(records)
    by = {(s["label"], s["window"], s["task"]): s for s in summary}
    full = by[("full", None, "perplexity")]["mean"]
    # A window covering the passage is full attention, whatever the method (local=0.5 splits
    # 96 into an SA window of 48 and 48 local keys).
    for label in ("sliding_window+sinks=2", "stochastic+local=0.5", "moba"):
        assert by[(label, 96, "perplexity")]["mean"] == pytest.approx(full, rel=1e-4)
    assert by[("stochastic+local=0.5", 8, "perplexity")]["seeds"] == 2
    assert model.config._attn_implementation == "sdpa"  # the sweep leaves the model unpatched
    paths = save(tmp_path, {"model": "tiny"}, records, summary, None)
    assert json.loads(paths["json"].read_text())["summary"]
    assert paths["plot"].stat().st_size > 1000 and "| full |" in paths["markdown"].read_text()
    # Shards of a grid merge back into the same summary; a cell given twice is refused.
    half = len(records) // 2
    save(tmp_path / "a", {}, records[:half], aggregate(records[:half]), None)
    save(tmp_path / "b", {}, records[half:], aggregate(records[half:]), None)
    merged, metas = load_records([tmp_path / "a", tmp_path / "b" / "results.json"])
    assert aggregate(merged) == summary and len(metas) == 2
    with pytest.raises(ValueError, match="already in an earlier file"):
        load_records([tmp_path / "a", tmp_path / "a"])
    from stochastic_attention.cli import main

    out = tmp_path / "merged"
    assert main(["eval", "--merge", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--only", "moba,full",
                 "--out", str(out)]) == 0
    labels = [s["label"] for s in json.loads((out / "results.json").read_text())["summary"]]
    assert set(labels) == {"moba", "full"} and labels[0] == "moba"
    assert (out / "results.png").stat().st_size > 1000


def test_equal_budget_table_interpolates_between_windows():
    from stochastic_attention.eval.report import equal_budget_table

    def row(label, window, keys, mean, task="perplexity"):
        return dict(label=label, window=window, task=task, metric=task, length=8, mean=mean,
                    std=0.0, seeds=1, keys_per_query=keys)

    summary = [row("sliding_window", 16, 10, 100.0), row("sliding_window", 64, 40, 25.0),
               row("stochastic", 32, 20, 60.0), row("stochastic", 128, 80, 20.0)]
    table = equal_budget_table(summary, ["sliding_window"])
    lines = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    # 20 keys lies halfway between 10 and 40 in log space: perplexity log-interpolates to 50.
    assert lines["32"].endswith("| 60.0 | 20 | 50.0 |")
    assert lines["128"].endswith("| 20.0 | 80 |  |")  # outside SWA's range: left blank


def test_method_specs_and_budgets():
    cfg = tiny_hf_model("llama").config
    spec = parse_method("stochastic+sinks=4+local=0.25+layers=1:0")
    settings = spec.settings(64, 2)
    assert settings["local"] == 16 and settings["window"] == 48 and settings["layers"] == [1]
    assert mean_keys(parse_method("full"), 64, 100, cfg) == pytest.approx(50.5)
    swa = attended_keys(100, 16, method="sliding_window").float().mean().item()
    assert mean_keys(parse_method("sliding_window"), 16, 100, cfg) == pytest.approx(swa)
    # Unpatched layers count as full attention in the budget.
    half = mean_keys(parse_method("sliding_window+layers=0:1"), 16, 100, cfg)
    assert half == pytest.approx((swa + 50.5) / 2)
    # An ensemble reads the union of its windows: more keys than one draw, at most K times more.
    one = mean_keys(parse_method("stochastic+local=4"), 12, 100, cfg)
    three = mean_keys(parse_method("stochastic+local=4+ensemble=3"), 12, 100, cfg)
    assert parse_method("stochastic+ensemble=3").settings(12, 2)["ensemble"] == 3
    assert one < three <= 3 * one
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("linear")
    with pytest.raises(ValueError, match="unknown method option"):
        parse_method("stochastic+foo=1")


@pytest.mark.parametrize("spec,new", [("swa+sinks=4", "'sliding_window'"), ("sa", "'stochastic'"),
                                      ("dense", "'full'"), ("moba+moba_topk=4", "'top_k'"),
                                      ("moba+topk=4", "'top_k'")])
def test_old_names_in_method_specs_name_the_new_one(spec, new):
    with pytest.raises(ValueError, match=f"was renamed: use {new}"):
        parse_method(spec)


def test_decode_cost_rows_agree_when_the_window_covers_the_context():
    from stochastic_attention.eval.sweep import decode_cost

    model = tiny_hf_model("llama", vocab_size=40)
    ids = torch.randint(0, 40, (30,), generator=torch.Generator().manual_seed(0))
    rows = decode_cost(model, ids, 24, window=64, sinks=1, local=2)
    assert [r["steps"] for r in rows] == [6, 6, 6]
    for r in rows[1:]:
        assert r["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-4)
    small = decode_cost(model, ids, 24, window=2, sinks=0, local=1)
    assert small[2]["perplexity"] != pytest.approx(small[1]["perplexity"], rel=1e-4)


def test_prefill_timing_reports_ratios_to_full():
    from stochastic_attention.eval.sweep import time_prefill

    model = tiny_hf_model("llama")
    rows = time_prefill(model, parse_methods("full,moba"), 4, [16, 24], repeats=2)
    assert {(r["label"], r["length"]) for r in rows} == {(m, n) for m in ("full", "moba")
                                                         for n in (16, 24)}
    assert all(r["ratio_to_full"] == 1.0 for r in rows if r["label"] == "full")
    assert all(r["seconds"] > 0 for r in rows)
    assert model.config._attn_implementation == "sdpa"


def test_cached_scoring_uses_the_installed_cache_keyword_and_equals_uncached():
    # The KV cache goes to the model under the installed transformers' own name (no deprecation
    # warning), and the cached answer log-probs equal one uncached pass over prompt + answer.
    import warnings

    model = tiny_hf_model("llama")
    g = torch.Generator().manual_seed(0)
    prompt, answer = torch.randint(0, 97, (12,), generator=g), torch.randint(0, 97, (4,), generator=g)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        cached = T._continuation_logprobs(model, prompt, answer)
    with torch.no_grad():
        logits = model(torch.cat([prompt, answer])[None]).logits[0, len(prompt) - 1:-1]
    torch.testing.assert_close(cached, torch.log_softmax(logits.float(), -1), rtol=1e-4, atol=1e-4)
