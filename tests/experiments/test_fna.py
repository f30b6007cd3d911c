"""The fractional-attention experiment's building blocks: graph statistics, the task, the run, the CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from stochastic_attention.experiments.fna import cli as fna_cli
from stochastic_attention.experiments.fna.data import (
    ALPHABET,
    build_task,
    encode,
    normalise,
    synthetic_corpora,
)
from stochastic_attention.experiments.fna.graph import (
    diffusion_map,
    mean_shortest_path,
    spectral_gap,
)
from stochastic_attention.experiments.fna.run import run


def test_graph_statistics_on_known_graphs():
    n = 8
    uniform = np.full((n, n), 1 / n)
    assert spectral_gap(uniform) == pytest.approx(1.0)
    assert mean_shortest_path(uniform) == (pytest.approx(1.0), pytest.approx(1.0))
    cycle = np.roll(np.eye(n), 1, axis=1)  # i -> i + 1: a ring
    assert spectral_gap(cycle) == pytest.approx(0.0, abs=1e-9)
    # On an undirected ring of 8 the other nodes lie 1, 1, 2, 2, 3, 3, 4 hops away.
    assert mean_shortest_path(cycle) == (pytest.approx(16 / 7), pytest.approx(1.0))
    halves = np.kron(np.eye(2), np.full((4, 4), 0.25))  # two separate cliques
    assert mean_shortest_path(halves) == (pytest.approx(1.0), pytest.approx(3 / 7))
    assert spectral_gap(halves) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="row-stochastic"):
        spectral_gap(np.ones((3, 3)))
    # Two loosely linked clusters: the first diffusion coordinate separates them.
    block = np.kron(np.eye(2), np.full((4, 4), 1.0)) + 0.01
    emb = diffusion_map(block / block.sum(1, keepdims=True), 2)
    assert emb.shape == (8, 2)
    assert np.sign(emb[:4, 0]).tolist() == [np.sign(emb[0, 0])] * 4
    assert np.sign(emb[4:, 0]).tolist() == [-np.sign(emb[0, 0])] * 4


def test_task_splits_documents_and_crops_inside_them():
    corpora = synthetic_corpora(n_labels=2, docs_per_label=5, doc_words=60)
    task = build_task(corpora, passage_len=32, test_per_class=7, test_fraction=0.4, seed=3)
    for split in task.split.values():
        assert split["test"] and split["train"] and not set(split["test"]) & set(split["train"])
    assert task.test_tokens.shape == (14, 32) and task.test_labels.tolist() == [0] * 7 + [1] * 7
    tokens, labels = task.sample(16, torch.Generator().manual_seed(0))
    texts = {c: [normalise(d.text) for d in docs if d.title in task.split[c]["train"]]
             for c, docs in corpora.items()}
    for row, c in zip(tokens, labels.tolist(), strict=True):
        passage = "".join(ALPHABET[i] for i in row.tolist())
        assert any(passage in text for text in texts[task.labels[c]])
    assert normalise("Hello,  WORLD 42!\n<b>") == "hello, world ! b"
    assert encode("ab ").tolist() == [0, 1, ALPHABET.index(" ")]


def test_experiment_runs_end_to_end(tmp_path):
    cfg = {
        "task": {"corpora": "synthetic", "passage_len": 24, "test_per_class": 5,
                 "test_fraction": 0.3},
        "variants": [{"name": "FNA alpha=1.2", "attention": "fractional", "alpha": 1.2},
                     {"name": "softmax", "attention": "softmax"}],
        "d_model": [4], "seeds": [0, 1],
        "train": {"steps": 3, "batch_size": 4, "warmup": 1},
        "graph": {"d_model": 4, "seed": 1, "passages": 2, "thresholds": [0.5, 1.0]},
    }
    result = run(cfg, tmp_path, tmp_path / "figs")
    assert len(result["runs"]) == 4
    assert {r["n"] for r in result["summary"]} == {2}
    for name in ("results.json", "table.md"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("fna-accuracy.png", "fna-diffusion-map.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 0
    assert set(result["graph"]) >= {"FNA alpha=1.2", "softmax"}
    assert set(result["graph"]["softmax"]["paths"]) == {"0.5", "1.0"}
    assert result["graph"]["passages"] == 2


def test_cli_parses_the_fna_subcommand():
    parser = argparse.ArgumentParser()
    fna_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fna", "--quick", "--config", "c.yaml"])
    assert args.quick and args.config == "c.yaml" and args.func is fna_cli.main


def test_speed_table_times_every_variant():
    from stochastic_attention.experiments.fna.speed import speed_markdown, speed_table

    rows = speed_table([12], window=4, heads=1, head_dim=4, repeats=1)
    assert rows[0]["seq_len"] == 12
    assert all(rows[0][k] > 0 for k in ("softmax_full", "fractional_full", "fractional_stochastic",
                                        "full_over_stochastic", "stochastic_over_softmax_full"))
    assert "| 12 | 4 |" in speed_markdown(rows)
