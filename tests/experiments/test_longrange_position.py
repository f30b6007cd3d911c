"""Loss by position: bucketing, per-token losses, held-out documents, the CLI end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stochastic_attention.cli import main as sattn
from stochastic_attention.data import ByteTokenizer, parse_source
from stochastic_attention.data.dataset import split_documents
from stochastic_attention.experiments.longrange.position import (
    bucket_stats,
    compare_positions,
    heldout_documents,
    log2_edges,
    loss_by_position,
    parse_position_method,
    token_losses,
)
from stochastic_attention.experiments.longrange.position_report import (
    gap_table,
    markdown_table,
    paired_gap,
    plot,
)
from stochastic_attention.models import SALlamaConfig, SALlamaForCausalLM
from stochastic_attention.testing import tiny_hf_model


def tiny_sa_llama(method: str = "full", vocab: int = 257, hidden: int = 32, seed: int = 0,
                  **kw) -> SALlamaForCausalLM:
    torch.manual_seed(seed)
    config = SALlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attention_methods=method,
                           attention_options={"window": 4}, **kw)
    return SALlamaForCausalLM(config).eval()


def test_log2_edges_cover_every_position_once():
    assert log2_edges(2047) == [2 ** i for i in range(12)]  # [1,2) ... [1024,2048)
    assert log2_edges(1) == [1, 2]
    assert log2_edges(8) == [1, 2, 4, 8, 16]
    with pytest.raises(ValueError, match="max_position"):
        log2_edges(0)


def test_bucket_stats_exact_means_counts_and_errors():
    positions = torch.arange(1, 11, dtype=torch.float64)  # 2 docs x positions 1..10
    losses = torch.stack([positions, positions + 1])
    losses[1, 9] = float("nan")  # a padded target is left out
    rows = bucket_stats(losses, [1, 2, 4, 8, 11])
    assert [(r["lo"], r["hi"], r["count"]) for r in rows] == [(1, 2, 2), (2, 4, 4), (4, 8, 8),
                                                              (8, 11, 5)]
    assert [r["mean"] for r in rows] == pytest.approx([1.5, 3.0, 6.0, (8 + 9 + 10 + 9 + 10) / 5])
    values = torch.tensor([2.0, 3.0, 3.0, 4.0], dtype=torch.float64)  # bucket [2, 4)
    assert rows[1]["sem"] == pytest.approx(values.std().item() / 2)
    # per-document means 2.5 and 3.5: sample std 0.7071, over sqrt(2) docs
    assert rows[1]["doc_sem"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    with pytest.raises(ValueError, match="buckets"):
        bucket_stats(losses, [0, 2])
    with pytest.raises(ValueError, match="buckets"):
        bucket_stats(losses, [1, 4, 2])


def test_token_losses_average_to_the_models_own_loss():
    model = tiny_sa_llama()
    ids = torch.randint(0, 257, (2, 37), generator=torch.Generator().manual_seed(0))
    losses = token_losses(model, ids, chunk=8)  # several chunks, one partial
    assert losses.shape == (2, 36) and losses.dtype == torch.float64
    with torch.no_grad():
        expected = model(ids, labels=ids).loss
    assert losses.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    # one token of context: the loss of document 0 at position 1 is -log p(ids[0, 1] | ids[0, 0])
    with torch.no_grad():
        first = -torch.log_softmax(model(ids[:1, :1]).logits[0, 0].double(), -1)[ids[0, 1]]
    assert losses[0, 0].item() == pytest.approx(first.item(), rel=1e-5)


def test_token_losses_mark_padding_and_reject_bad_input():
    model = tiny_sa_llama()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    losses = token_losses(model, ids, mask)
    assert torch.isnan(losses[1, 8:]).all() and not torch.isnan(losses[1, :8]).any()
    torch.testing.assert_close(losses[1, :8], token_losses(model, ids[1:, :9])[0])
    with pytest.raises(ValueError, match="input_ids"):
        token_losses(model, ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        token_losses(model, ids, mask[:, :5])


def test_full_attention_model_uses_context_on_repeating_text():
    """A model trained on repeated random 8-token patterns can copy the earlier copy, so its
    loss must fall once a whole period is in context (positions >= 8)."""
    torch.set_num_threads(1)
    vocab, period, reps = 16, 8, 6
    model = tiny_sa_llama("full", vocab=vocab, hidden=64, eos_token_id=None).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        batch = torch.randint(0, vocab, (16, period), generator=gen).repeat(1, reps)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    docs = list(torch.randint(0, vocab, (6, period), generator=gen).repeat(1, reps))
    result = loss_by_position(model, docs, buckets=[1, 8, 16, 48], progress=False)
    early, middle, late = (b["mean"] for b in result["buckets"])
    assert late < 0.5 * early and late < middle < early
    assert late < 0.6 * math.log(vocab)  # better than guessing, which is all position 1..7 allow


def test_parse_position_method_reads_the_window():
    spec, window = parse_position_method("sliding_window:64+sinks=4", 32)
    assert (spec.label, spec.method, spec.options, window) == (
        "sliding_window:64+sinks=4", "sliding_window", {"sinks": 4}, 64)
    spec, window = parse_position_method("stochastic+sinks=4+local=0.75", 64)
    assert window == 64 and spec.settings(window, 2)["window"] == 16  # 48 local + 16 SA
    assert parse_position_method("full", 64)[1] is None
    with pytest.raises(ValueError, match="whole number"):
        parse_position_method("moba:x+sinks=4", 64)
    with pytest.raises(ValueError, match="unknown method"):
        parse_position_method("linear:64", 64)
    with pytest.raises(ValueError, match="'dense' was renamed: use 'full'"):
        parse_position_method("dense:64", 64)


def test_compare_positions_patches_then_restores_the_model():
    model = tiny_hf_model("llama")
    docs = list(torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(2)))
    methods = [parse_position_method(t, 8) for t in
               ("full", "sliding_window:64", "sliding_window:4+sinks=1",
                "stochastic+sinks=1+local=0.5", "moba+sinks=1")]
    result = compare_positions(docs, model=model, methods=methods, progress=False)
    json.dumps(result)  # JSON-able
    rows = {m["label"]: m for m in result["methods"]}
    assert result["edges"] == [1, 2, 4, 8, 16, 32, 64]
    plain = loss_by_position(model, docs, progress=False)  # unpatched again
    assert rows["full"]["buckets"] == plain["buckets"]
    # a window longer than the documents is full attention
    for a, b in zip(rows["sliding_window:64"]["buckets"], plain["buckets"]):
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-5)
    # position 1..4 see the same keys under a 4-token window, later ones do not
    swa = rows["sliding_window:4+sinks=1"]["buckets"]
    assert swa[0]["mean"] == pytest.approx(plain["buckets"][0]["mean"], rel=1e-5)
    assert swa[-1]["mean"] != pytest.approx(plain["buckets"][-1]["mean"], rel=1e-3)
    assert rows["sliding_window:4+sinks=1"]["keys_per_query"] < rows["full"]["keys_per_query"]
    assert all(b["count"] == 3 * (min(b["hi"], 40) - b["lo"]) for b in plain["buckets"])
    table = markdown_table(result)
    assert table.count("\n") == 1 + len(methods) and "32-63" in table
    gaps = gap_table(result, "full")
    assert gaps.count("\n") == len(methods) and "| full |" not in gaps
    assert "| sliding_window:64 | +0.00 ± 0.00 |" in gaps
    with pytest.raises(ValueError, match="reference"):
        gap_table(result, "linear")
    with pytest.raises(ValueError, match="model"):
        compare_positions(docs, methods=methods)


def test_paired_gap_is_the_mean_and_error_of_per_document_differences(tmp_path):
    a = {"doc_means": [3.0, 4.0, None, 6.0]}
    b = {"doc_means": [2.0, 2.0, 1.0, None]}
    gap, err = paired_gap(a, b)  # documents 0 and 1 only: differences 1 and 2
    assert gap == pytest.approx(1.5) and err == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert math.isnan(paired_gap({"doc_means": [1.0]}, {"doc_means": [0.5]})[1])
    edges = [1, 2, 4]
    rows = {name: bucket_stats(torch.tensor([[20.0, 3.0, 3.0], [20.0, 2.0, 4.0]]) + shift, edges)
            for name, shift in (("full", 0.0), ("worse", 0.5), ("awful", 5.0))}
    result = dict(docs=2, seq_len=4, methods=[
        dict(label=k, method="sliding_window" if k == "worse" else k, window=2, buckets=v)
        for k, v in rows.items()])
    path = plot(result, tmp_path / "gap.png")  # two panels, clipped axes, SWA reach marked
    assert path.stat().st_size > 0
    assert "| worse | +0.50 ± 0.00 | +0.50 ± 0.00 |" in gap_table(result)


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    gen = torch.Generator().manual_seed(3)
    for i in range(10):  # some too short for 96 tokens
        words = torch.randint(0, 26, (40 if i % 3 == 0 else 120,), generator=gen)
        (folder / f"doc{i:02d}.txt").write_text(" ".join("ab" + chr(97 + int(w)) for w in words))
    return folder


def test_heldout_documents_come_from_the_validation_split_only(corpus):
    source = str(corpus / "*.txt")
    texts = parse_source(source).load()
    train_idx, val_idx = split_documents(texts, 0.5, 7)
    picked = heldout_documents(ByteTokenizer(), 96, 2, sources=[source], val_fraction=0.5,
                               split_seed=7)
    assert len(picked) == 2
    for doc in picked:
        assert doc["index"] in val_idx and doc["index"] not in train_idx
        assert doc["ids"].tolist() == ByteTokenizer().encode(texts[doc["index"]])[:96]
    long_val = [i for i in val_idx if len(texts[i]) >= 96]
    with pytest.raises(ValueError, match="held-out documents"):
        heldout_documents(ByteTokenizer(), 96, len(long_val) + 1, sources=[source],
                          val_fraction=0.5, split_seed=7)


def test_cli_scores_trained_checkpoints_and_writes_three_files(corpus, tmp_path):
    runs = []
    for name, method in (("full-run", "full"), ("stochastic-run", "stochastic")):
        run = tmp_path / name
        tiny_sa_llama(method).save_pretrained(run / "final")
        data = {"sources": [str(corpus / "*.txt")], "tokenizer": "byte", "val_fraction": 0.5,
                "split_seed": 7}
        (run / "config.json").write_text(json.dumps({"data": data}))
        runs.append(str(run / "final"))
    out = tmp_path / "out"
    assert sattn(["position-loss", "--checkpoints", ",".join(runs), "--seq-len", "96",
                  "--docs", "2", "--out", str(out), "--no-progress"]) == 0
    assert {p.name for p in out.iterdir()} == {"position.json", "position.md", "position.png"}
    result = json.loads((out / "position.json").read_text())
    assert [m["label"] for m in result["methods"]] == ["full-run", "stochastic-run"]
    assert result["data"]["tokenizer"] == "byte" and result["data"]["split_seed"] == 7
    for m in result["methods"]:
        assert sum(b["count"] for b in m["buckets"]) == 2 * 95
        assert m["mean_loss"] > 0
    assert "| stochastic-run |" in (out / "position.md").read_text()
    stochastic = result["methods"][1]
    assert (stochastic["attention_methods"], stochastic["window"]) == (["stochastic"] * 2, 4)
