"""The comparison configs, the paper-scale config, the pass-key probe and the driver."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from stochastic_attention.data import ByteTokenizer
from stochastic_attention.train import build_model, load_config
from stochastic_attention.train.compare import run_comparison
from stochastic_attention.train.passkey import QUESTION, passkey_accuracy, passkey_examples

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"
METHODS = ("full", "sliding_window", "stochastic", "gated")


def test_small_configs_differ_only_in_attention_method():
    configs = {method: load_config(CONFIGS / f"{method}.yaml").to_dict() for method in METHODS}
    for method, cfg in configs.items():
        assert cfg["model"].pop("attention_methods") == method
        cfg["train"].pop("out_dir")
        assert cfg == configs["full"]
    params = {method: sum(p.numel() for p in build_model(load_config(CONFIGS / f"{method}.yaml"),
                                                         257, 256).parameters())
              for method in METHODS}
    assert params["full"] == params["sliding_window"] == params["stochastic"]
    assert 0 < params["gated"] - params["full"] < 0.01 * params["full"]  # the gates only


def test_paper_scale_config_instantiates_at_360m_parameters():
    cfg = load_config(CONFIGS / "paper-360m.yaml")
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=49152, eos_id=2)
    count = sum(p.numel() for p in model.parameters())
    assert 340e6 < count < 380e6
    assert model.config.num_hidden_layers == 24 and model.config.hidden_size == 1024
    assert model.config.num_attention_heads == 16
    assert model.config.attention_options == {"window": 256}
    assert model.model.layers[0].self_attn.options.sliding_window == 256  # both branches
    assert cfg.train.seq_len == 2048


def test_passkey_examples_plant_the_key_at_the_distance():
    tok = ByteTokenizer()
    filler = np.frombuffer(b"lorem ipsum dolor sit amet " * 200, dtype=np.uint8)
    for ids, start, control in passkey_examples(tok, filler, seq_len=300, distance=150,
                                                trials=4):
        assert len(ids) == len(control) == 300
        text = tok.decode(ids)
        key = text[-5:]
        planted = text.index(f"{QUESTION}{key}.") + len(QUESTION)
        assert start - planted == 150 and text.endswith(QUESTION + key)
        differs = np.flatnonzero(ids != control)
        assert differs.tolist() == list(range(planted, planted + 5))  # every key digit changed


class _Oracle(torch.nn.Module):
    """Predicts the token ``offset`` positions back: copies the planted key exactly."""

    def __init__(self, offset: int):
        super().__init__()
        self.offset, self.dummy = offset, torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, use_cache=False):
        source = torch.roll(input_ids, -(1 - self.offset), dims=1)  # next token, offset back
        return type("Out", (), {"logits": torch.nn.functional.one_hot(source, 257).float()})


def test_passkey_accuracy_scores_a_copying_oracle_perfectly():
    tok = ByteTokenizer()
    filler = np.frombuffer(b"lorem ipsum dolor sit amet " * 200, dtype=np.uint8)
    offset = 150  # each answer digit's planted copy lies exactly `distance` tokens back
    scores = passkey_accuracy(_Oracle(offset), tok, filler, seq_len=300, distance=150, trials=8)
    assert scores["digit_accuracy"] == scores["exact_match"] == 1.0
    assert scores["retrieval_gain"] > 0  # the copier is confidently wrong with a wrong key
    wrong = passkey_accuracy(_Oracle(offset + 1), tok, filler, seq_len=300, distance=150,
                             trials=8)
    assert wrong["exact_match"] < 1.0


def _sentence_docs(folder: Path, n_docs: int = 5) -> None:
    """Documents of short sentences of random words, so the cloze tasks find examples."""
    import random

    folder.mkdir()
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta theta".split()
    for i in range(n_docs):
        sentences = (" ".join(rng.choice(words) for _ in range(8)) + "." for _ in range(60))
        (folder / f"{i}.txt").write_text(" ".join(sentences))


def _tiny_configs(tmp_path: Path, docs: Path) -> list[Path]:
    configs = []
    for method in ("sliding_window", "gated"):
        raw = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())
        raw["model"].update(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            attention_options={"window": 8})
        raw["data"] = {"sources": [{"name": "toy", "files": str(docs)}], "val_fraction": 0.4,
                       "cache_dir": str(tmp_path / "cache")}
        raw["train"].update(steps=3, seq_len=128, batch_size=2, micro_batch_size=2,
                            eval_every=3, tensorboard=False)
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(raw))
        configs.append(path)
    return configs


def test_cloze_tasks_build_with_the_byte_tokenizer():
    from stochastic_attention.data.corpora import Document
    from stochastic_attention.eval.tasks import lastword_task, nextline_task

    tok = ByteTokenizer()
    text = " ".join(f"Sentence number {i} speaks of the harbour and the lighthouse." for i in
                    range(40))
    docs = [Document(f"d{i}", text.replace("harbour", f"harbour{i}"), "toy") for i in range(3)]
    lastword = lastword_task(tok, docs, count=4, context=100, seed=0)
    assert len(lastword.examples) == 4
    for ex in lastword.examples:
        assert len(ex["context"]) == 100
        assert tok.decode(ex["target"]) == " lighthouse"
    nextline = nextline_task(tok, docs, count=4, context=100, seed=0)
    assert len(nextline.examples) == 4
    for ex in nextline.examples:
        true = tok.decode(ex["choices"][ex["label"]])
        assert true.startswith(" Sentence number") and len(ex["choices"]) == 4


def test_driver_trains_evaluates_and_reports(tmp_path):
    _sentence_docs(tmp_path / "docs")
    configs = _tiny_configs(tmp_path, tmp_path / "docs")
    report = tmp_path / "report.md"
    runs = run_comparison(configs, [0], out_root=tmp_path / "runs", report=report,
                          overrides=[], eval_chunks=2, passkey_trials=4, progress=False,
                          cloze_examples=3, cloze_context=64)
    assert [r["name"] for r in runs] == ["sliding_window", "gated"]
    text = report.read_text()
    assert "| sliding_window |" in text and "| gated |" in text and "ppl toy" in text
    assert "lastword acc (n=3)" in text and "nextline acc (n=3)" in text
    assert report.with_suffix(".png").stat().st_size > 0
    saved = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert 0 <= saved[1]["eval"]["passkey"]["far"]["digit_accuracy"] <= 1
    for run in saved:
        for task in ("lastword", "nextline"):
            assert run["eval"]["cloze"][task]["examples"] == 3
            assert run["eval"]["cloze"][task]["accuracy"] in (0, 1 / 3, 2 / 3, 1)


def test_report_only_adds_cloze_accuracy_to_finished_runs(tmp_path):
    _sentence_docs(tmp_path / "docs")
    configs = _tiny_configs(tmp_path, tmp_path / "docs")[:1]
    report = tmp_path / "report.md"
    kwargs = dict(out_root=tmp_path / "runs", report=report, overrides=[], eval_chunks=2,
                  passkey_trials=4, progress=False)
    run_comparison(configs, [0], cloze_examples=0, **kwargs)
    assert "cloze" not in json.loads((tmp_path / "runs" / "sliding_window-seed0" / "eval.json")
                                     .read_text())
    assert "lastword acc" not in report.read_text()
    report.write_text(report.read_text() + "hand-written notes\n")
    final = tmp_path / "runs" / "sliding_window-seed0" / "final" / "model.safetensors"
    trained = final.stat().st_mtime_ns
    runs = run_comparison(configs, [0], report_only=True, cloze_examples=2, cloze_context=48,
                          **kwargs)
    assert final.stat().st_mtime_ns == trained  # nothing retrained
    assert runs[0]["eval"]["cloze"]["settings"] == {"examples": 2, "context": 48, "seed": 0}
    text = report.read_text()
    assert "lastword acc (n=2)" in text and "nextline acc (n=2)" in text
    assert text.endswith("hand-written notes\n")


def test_only_rank_zero_evaluates_and_writes_reports(tmp_path, monkeypatch):
    _sentence_docs(tmp_path / "docs")
    configs = _tiny_configs(tmp_path, tmp_path / "docs")[:1]
    report = tmp_path / "report.md"
    kwargs = dict(out_root=tmp_path / "runs", report=report, overrides=[], eval_chunks=2,
                  passkey_trials=4, progress=False, cloze_examples=0)
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it for the second process
    assert run_comparison(configs, [0], **kwargs) == []
    assert (tmp_path / "runs" / "sliding_window-seed0" / "final" / "model.safetensors").exists()  # trained
    assert not report.exists() and not (tmp_path / "runs" / "results.json").exists()
    assert not (tmp_path / "runs" / "sliding_window-seed0" / "eval.json").exists()
    monkeypatch.setenv("RANK", "0")
    runs = run_comparison(configs, [0], **kwargs)  # the finished run is evaluated, not retrained
    assert [r["name"] for r in runs] == ["sliding_window"] and report.exists()
