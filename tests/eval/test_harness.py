"""lm-evaluation-harness adapter: a local multiple-choice task scored on a tiny patched model."""

import json
import random
import sys

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from stochastic_attention.eval.harness import harness_sweep, harness_table, run_harness
from stochastic_attention.eval.methods import parse_methods
from stochastic_attention.hf import patch, unpatch
from stochastic_attention.testing import tiny_hf_model

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]
TASK = "tiny_mc"


def _tokenizer():
    vocab = {"[UNK]": 0, "[EOS]": 1, ".": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]",
                                   eos_token="[EOS]")


def _write_task(folder, items=4, seed=0):
    """A task YAML and a jsonl of ``items`` 40-word contexts with 4 one-word choices each."""
    rng = random.Random(seed)
    data = folder / "tiny_mc.jsonl"
    with data.open("w") as f:
        for _ in range(items):
            choices = rng.sample(WORDS, 4)
            f.write(json.dumps(dict(question=" ".join(rng.choices(WORDS, k=40)) + " .",
                                    choices=choices, label=rng.randrange(4))) + "\n")
    (folder / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def _loglikelihoods(out):
    return [float(r[0][0]) for s in out["samples"][TASK] for r in s["resps"]]


def test_harness_scores_the_patched_model(tmp_path):
    pytest.importorskip("lm_eval")
    folder = _write_task(tmp_path)
    model, tok = tiny_hf_model("llama"), _tokenizer()
    kw = dict(include_path=folder, include_defaults=False, log_samples=True)
    full = run_harness(model, tok, TASK, **kw)
    assert TASK in full["results"] and "acc,none" in full["results"][TASK]
    assert len(full["samples"][TASK]) == 4

    patch(model, "stochastic", window=512, seed=3)  # window >= length: exactly full attention
    try:
        sa = run_harness(model, tok, [TASK], **kw)
    finally:
        unpatch(model)
    assert sa["results"][TASK]["acc,none"] == full["results"][TASK]["acc,none"]
    assert _loglikelihoods(sa) == pytest.approx(_loglikelihoods(full), abs=1e-4)

    patch(model, "sliding_window", window=2)  # the harness must see the patched attention
    try:
        narrow = run_harness(model, tok, TASK, **kw)
    finally:
        unpatch(model)
    assert _loglikelihoods(narrow) != pytest.approx(_loglikelihoods(full), abs=1e-3)


def test_harness_sweep_table(tmp_path):
    pytest.importorskip("lm_eval")
    folder = _write_task(tmp_path, items=2)
    model, tok = tiny_hf_model("llama"), _tokenizer()
    specs = parse_methods("full,stochastic+sinks=1")
    records = harness_sweep(model, tok, specs, [512], [0], TASK, include_path=folder,
                            include_defaults=False, limit=2)
    assert {r["metric"] for r in records} == {"acc"}
    accs = {r["label"]: r["value"] for r in records}
    assert set(accs) == {"full", "stochastic+sinks=1"}
    assert accs["full"] == accs["stochastic+sinks=1"]
    table = harness_table(records)
    assert "tiny_mc acc" in table.splitlines()[0] and len(table.splitlines()) == 4


def test_missing_harness_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"stochastic-attention\[harness\]"):
        run_harness(tiny_hf_model("llama"), _tokenizer(), TASK)


def test_bad_arguments():
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match="tasks"):
        run_harness(tiny_hf_model("llama"), _tokenizer(), " , ")
    with pytest.raises(ValueError, match="batch_size"):
        run_harness(tiny_hf_model("llama"), _tokenizer(), TASK, batch_size=0)


def test_cli_eval_harness(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from stochastic_attention.cli import main

    (tmp_path / "tasks").mkdir()
    folder = _write_task(tmp_path / "tasks")
    tiny_hf_model("llama").save_pretrained(tmp_path / "model")
    _tokenizer().save_pretrained(tmp_path / "model")
    code = main(["eval", "--model", str(tmp_path / "model"), "--methods", "full,stochastic",
                 "--windows", "512", "--seeds", "0", "--harness", TASK, "--harness-limit", "3",
                 "--harness-include", str(folder), "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| full") or
            line.startswith("| stochastic")]
    assert len(rows) == 2 and rows[0].split("|")[3] == rows[1].split("|")[3]
    records = json.loads((tmp_path / "out" / "harness.json").read_text())
    assert {r["task"] for r in records} == {TASK}


def test_written_choice_task_matches_the_builtin_scorer(tmp_path):
    pytest.importorskip("lm_eval")
    import torch

    from stochastic_attention.eval.harness import write_choice_task
    from stochastic_attention.eval.tasks import Task, score_nextline

    tok, rng = _tokenizer(), random.Random(1)
    task = Task("nextline", "accuracy", True, 30)
    for _ in range(6):  # one-word choices: sum and mean log-probability pick the same one
        ids = tok(" ".join(rng.choices(WORDS, k=30)), add_special_tokens=False)["input_ids"]
        task.examples.append(dict(context=torch.tensor(ids), label=rng.randrange(4),
                                  choices=[torch.tensor(tok(" " + w)["input_ids"])
                                           for w in rng.sample(WORDS, 4)]))
    folder = write_choice_task(task, tok, tmp_path / "tasks")
    model = tiny_hf_model("llama", seed=2)
    out = run_harness(model, tok, "sattn_nextline", include_path=folder, include_defaults=False)
    assert out["results"]["sattn_nextline"]["acc,none"] == pytest.approx(score_nextline(model, task))
    with pytest.raises(ValueError, match="multiple choice"):
        write_choice_task(Task("lastword", "accuracy", True, 3, [dict(context=None)]), tok, tmp_path)


def _trained_byte_model(tmp_path, method="stochastic"):
    """A tiny SA-Llama trained by the ``sattn train`` loop (byte tokenizer); its final/ folder."""
    from stochastic_attention.train import config_from_dict, train

    docs = tmp_path / "docs"
    docs.mkdir()
    rng = random.Random(0)
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    raw = {"model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "attention_methods": method, "attention_options": {"window": 8}},
           "data": {"sources": [{"name": "toy", "files": str(docs)}], "val_fraction": 0.3,
                    "cache_dir": str(tmp_path / "cache")},
           "train": {"out_dir": str(tmp_path / "run"), "seq_len": 32, "batch_size": 2,
                     "micro_batch_size": 2, "steps": 4, "warmup_steps": 1, "lr": 3e-3, "log_every": 2, "eval_every": 4,
                     "eval_batches": 1, "checkpoint_every": 100, "tensorboard": False,
                     "threads": 1}}
    train(config_from_dict(raw), progress=False)
    return tmp_path / "run" / "final"


def test_harness_scores_a_model_trained_by_sattn_train(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    import torch

    from stochastic_attention.data import ByteTokenizer
    from stochastic_attention.eval.harness import load_trained

    final = _trained_byte_model(tmp_path)
    assert not (final / "tokenizer.json").exists()  # the byte tokenizer comes from run config
    model, tok = load_trained(final)
    assert model.config.model_type == "sa_llama" and not model.training
    (tmp_path / "tasks").mkdir()
    folder = _write_task(tmp_path / "tasks")
    out = run_harness(model, tok, TASK, include_path=folder, include_defaults=False,
                      log_samples=True)
    assert 0.0 <= out["results"][TASK]["acc,none"] <= 1.0
    samples = out["samples"][TASK]
    assert len(samples) == 4

    # Every score is the model's own log-likelihood of the choice's UTF-8 bytes after the
    # context's (wrong token ids, an added BOS or a patched attention would change it).
    byte = ByteTokenizer()
    for sample in samples:
        doc = sample["doc"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            context, target = byte.encode(doc["question"]), byte.encode(" " + choice)
            ids = torch.tensor([context + target])
            with torch.no_grad():
                logp = model(input_ids=ids[:, :-1]).logits.log_softmax(-1)[0]
            expected = sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(target))
            assert float(resp[0][0]) == pytest.approx(expected, abs=1e-4)
    # the scores depend on the trained weights: a fresh model scores the task differently
    fresh = type(model)(model.config).eval()
    other = run_harness(fresh, tok, TASK, include_path=folder, include_defaults=False,
                        log_samples=True)
    assert _loglikelihoods(other) != pytest.approx(_loglikelihoods(out), abs=1e-3)

    # the same through the command line: sattn eval --model runs/NAME/final --harness TASK
    from stochastic_attention.cli import main

    base = ["eval", "--model", str(final), "--harness", TASK, "--harness-include", str(folder)]
    assert main(base + ["--out", str(tmp_path / "out")]) == 0
    assert "sa_llama:stochastic" in capsys.readouterr().out
    records = json.loads((tmp_path / "out" / "harness.json").read_text())
    assert [(r["label"], r["task"], r["metric"]) for r in records] == [("sa_llama:stochastic", TASK, "acc")]
    assert records[0]["value"] == out["results"][TASK]["acc,none"]
    for extra, fragment in ((["--methods", "stochastic"], "--methods"),
                            (["--tasks", "perplexity"], "--tasks")):
        assert main(base + extra + ["--out", str(tmp_path / "x")]) == 2
        assert fragment in capsys.readouterr().err
    assert main(base[:3] + ["--out", str(tmp_path / "x")]) == 2
    assert "--harness" in capsys.readouterr().err


def test_load_trained_errors_and_tokenizer_choices(tmp_path):
    from stochastic_attention.data import ByteTokenizer
    from stochastic_attention.eval.harness import load_trained, trained_tokenizer

    with pytest.raises(ValueError, match="config.json"):
        load_trained(tmp_path)
    tiny_hf_model("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="load_pretrained"):
        load_trained(tmp_path / "llama")
    from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM

    SALlamaForCausalLM(SALlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     vocab_size=40)).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="tokenizer="):  # not 257 tokens: not surely bytes
        load_trained(tmp_path / "small")
    with pytest.raises(ValueError, match="40"):  # a 257-token tokenizer for a 40-token model
        load_trained(tmp_path / "small", tokenizer="byte")
    _tokenizer().save_pretrained(tmp_path / "small")  # a saved tokenizer wins
    model, tok = load_trained(tmp_path / "small")
    assert tok("alpha bravo")["input_ids"] == [3, 4]
    byte = trained_tokenizer(tmp_path / "small", "byte")
    text = "Zoë's café: 42 €\n"
    assert byte(text)["input_ids"] == ByteTokenizer().encode(text)
    assert byte.decode(ByteTokenizer().encode(text)) == text and byte.eos_token_id == 256
