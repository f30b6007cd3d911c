"""The training loop: exact resume, interruption, checkpoint errors, DDP equivalence."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stochastic_attention.cli_args import UsageError
from stochastic_attention.models import SALlamaForCausalLM
from stochastic_attention.train import CheckpointError, config_from_dict, load_config, train
from stochastic_attention.train.config import ConfigError

WORDS = "the quick brown fox jumps over a lazy dog while seven cats sing near old mills".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    directory = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for i in range(6):
        (directory / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)))
    return directory


def raw_config(corpus: Path, out_dir: Path, method: str = "gated", **train) -> dict:
    return {
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "attention_methods": method,
                  "attention_options": {"window": 8}},
        "data": {"sources": [{"name": "toy", "files": str(corpus)}], "val_fraction": 0.3,
                 "cache_dir": str(corpus.parent / "cache")},
        "train": dict({"out_dir": str(out_dir), "seq_len": 32, "batch_size": 4,
                       "micro_batch_size": 2, "steps": 6, "warmup_steps": 2, "lr": 3e-3,
                       "log_every": 1, "eval_every": 3, "eval_batches": 2,
                       "checkpoint_every": 100, "tensorboard": False, "threads": 1}, **train),
    }


def losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_interrupted_and_resumed_run_equals_uninterrupted(corpus, tmp_path):
    # gated layers draw permutations, so this also checks that the RNG state is restored
    full = train(config_from_dict(raw_config(corpus, tmp_path / "a")), progress=False)
    cfg = config_from_dict(raw_config(corpus, tmp_path / "b"))
    first = train(cfg, stop_after=4, progress=False)
    assert first["interrupted"] and first["step"] == 4
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["step"] == 6 and not resumed["interrupted"]
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-6, abs=1e-7)
    assert resumed["val_loss"]["toy"] == pytest.approx(full["val_loss"]["toy"], rel=1e-6)
    assert (tmp_path / "b" / "final" / "model.safetensors").exists()


def test_corrupt_and_mismatched_checkpoints_raise_clear_errors(corpus, tmp_path):
    raw = raw_config(corpus, tmp_path / "run")
    train(config_from_dict(raw), stop_after=2, progress=False)
    changed = raw_config(corpus, tmp_path / "run")
    changed["model"]["attention_options"]["window"] = 16
    with pytest.raises(CheckpointError, match="model.attention_options: checkpoint {'window': 8}"):
        train(config_from_dict(changed), resume=True, progress=False)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated, as after a crash mid-copy
    with pytest.raises(CheckpointError, match="corrupt"):
        train(config_from_dict(raw), resume=True, progress=False)


def test_bad_configs_name_the_key(corpus, tmp_path):
    raw = raw_config(corpus, tmp_path)
    raw["train"]["learning_rate"] = 1e-3
    with pytest.raises(ValueError, match="learning_rate"):
        config_from_dict(raw)
    raw = raw_config(corpus, tmp_path, batch_size=5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        config_from_dict(raw)


def test_unknown_model_keys_are_rejected_with_the_valid_ones(corpus, tmp_path):
    raw = raw_config(corpus, tmp_path)
    raw["model"]["attention_method"] = raw["model"].pop("attention_methods")  # a typo
    with pytest.raises(UsageError, match="attention_method") as info:
        config_from_dict(raw)
    assert "'attention_methods'" in str(info.value) and "'attention_options'" in str(info.value)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(corpus, tmp_path)))
    with pytest.raises(UsageError, match="windw"):
        load_config(path, ["model.windw=8"])
    with pytest.raises(UsageError, match="sources"):
        load_config(path, ["data.source=x"])
    with pytest.raises(UsageError, match="train.lr must be a float"):
        load_config(path, ["train.lr=fast"])
    options = load_config(path, ["model.attention_options.window=16"]).model["attention_options"]
    assert options == {"window": 16}
    with pytest.raises(UsageError, match=r"attention_options=\{'window': 16\}"):
        load_config(path, ["model.window=16"])  # the former key names its new place


def _checkpoint_steps(out_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (out_dir / "checkpoints").glob("step-*.pt"))


def test_a_new_run_never_silently_replaces_an_old_one(corpus, tmp_path):
    old = config_from_dict(raw_config(corpus, tmp_path / "run", method="sliding_window", steps=6,
                                      checkpoint_every=2, keep_checkpoints=2))
    train(old, progress=False)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    weights = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    new = config_from_dict(raw_config(corpus, tmp_path / "run", method="sliding_window", steps=2,
                                      checkpoint_every=1, keep_checkpoints=2))
    with pytest.raises(UsageError, match="--resume.*--overwrite"):
        train(new, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert (tmp_path / "run" / "final" / "model.safetensors").read_bytes() == weights
    assert _checkpoint_steps(tmp_path / "run") == [4, 6]
    train(new, overwrite=True, progress=False)
    # the old run is gone entirely: its step-6 checkpoint would otherwise win a later --resume
    assert _checkpoint_steps(tmp_path / "run") == [1, 2]
    assert max(json.loads(line)["step"] for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_pruning_and_resume_only_touch_the_current_run(corpus, tmp_path):
    other = config_from_dict(raw_config(corpus, tmp_path / "other", method="sliding_window", steps=6,
                                        checkpoint_every=6))
    train(other, progress=False)
    cfg = config_from_dict(raw_config(corpus, tmp_path / "run", method="sliding_window", steps=4,
                                      checkpoint_every=1, keep_checkpoints=1))
    assert train(cfg, stop_after=1, progress=False)["step"] == 1
    # a checkpoint of another run (same configuration) lands in this run's folder
    foreign = tmp_path / "run" / "checkpoints" / "step-0000006.pt"
    foreign.write_bytes((tmp_path / "other" / "checkpoints" / "step-0000006.pt").read_bytes())
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["step"] == 4  # resumed from its own step 1, not the other run's step 6
    assert _checkpoint_steps(tmp_path / "run") == [4, 6]  # own ones pruned, the other kept


def test_resume_says_where_it_resumed_and_the_summary_val_loss_is_its_step(corpus, tmp_path,
                                                                          capsys):
    every = config_from_dict(raw_config(corpus, tmp_path / "every", method="sliding_window", eval_every=1))
    train(every, progress=False)
    val = {json.loads(line)["step"]: json.loads(line)["val_loss"]["toy"] for line in
           (tmp_path / "every" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line}
    cfg = config_from_dict(raw_config(corpus, tmp_path / "run", method="sliding_window", eval_every=3))
    first = train(cfg, stop_after=4, progress=False)
    assert first["interrupted"] and first["step"] == 4
    assert first["val_loss"]["toy"] == pytest.approx(val[4], rel=1e-6)  # not step 3's
    capsys.readouterr()
    resumed = train(cfg, resume=True, progress=False)
    assert "resumed from step 4" in capsys.readouterr().err
    assert resumed["val_loss"]["toy"] == pytest.approx(val[6], rel=1e-6)
    # the extra evaluation at the interruption is not logged: metrics match the full run
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "every"), rel=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_env() -> dict:
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


def _torchrun(config: Path, nproc: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "-m", "stochastic_attention.train", str(config),
           "--no-progress"]
    return subprocess.Popen(cmd, env=_python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(corpus, tmp_path, strategy):
    single = train(config_from_dict(raw_config(corpus, tmp_path / "one", method="sliding_window",
                                               steps=4)), progress=False)
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw_config(corpus, tmp_path / "two", method="sliding_window", steps=4,
                                                distributed=strategy)))
    proc = _torchrun(config, 2)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])[
        "val_loss"]["toy"] == pytest.approx(single["val_loss"]["toy"], rel=1e-4)
    summaries = [line for line in output.splitlines() if line.startswith('{"step"')]
    assert len(summaries) == 1, output  # rank 0 alone prints the summary
    # the final Hugging Face model holds the trained (for FSDP: gathered) weights
    final = SALlamaForCausalLM.from_pretrained(tmp_path / "two" / "final").state_dict()
    saved = torch.load(tmp_path / "two" / "checkpoints" / "step-0000004.pt",
                       weights_only=True)["model"]
    assert set(saved) <= set(final)
    for name, value in saved.items():
        assert torch.equal(final[name], value), name


def test_sigterm_saves_a_checkpoint_that_resumes(corpus, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw_config(corpus, tmp_path / "run", steps=10_000)))
    cmd = [sys.executable, "-m", "stochastic_attention.train", str(config), "--no-progress"]
    proc = subprocess.Popen(cmd, env=_python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(losses(tmp_path / "run")) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["interrupted"] and 2 <= summary["step"] < 10_000
    ckpt = tmp_path / "run" / "checkpoints" / f"step-{summary['step']:07d}.pt"
    assert ckpt.exists()
    cfg = config_from_dict(raw_config(corpus, tmp_path / "run", steps=summary["step"] + 1))
    assert train(cfg, resume=True, progress=False)["step"] == summary["step"] + 1


def test_bf16_autocast_trains_on_cpu(corpus, tmp_path):
    summary = train(config_from_dict(raw_config(corpus, tmp_path, method="stochastic", steps=2,
                                                precision="bf16")), progress=False)
    assert 0 < summary["loss"] < 10 and summary["step"] == 2


def test_a_config_key_added_after_the_checkpoint_takes_its_default():
    from stochastic_attention.train.checkpoint import CheckpointError, check_compatible

    train = {"seq_len": 8, "batch_size": 2, "seed": 0}
    old = {"config": {"model": {}, "data": {"source": "x"}, "train": train}}  # written before data.pack
    check_compatible(old, {"model": {}, "data": {"source": "x", "pack": False}, "train": train}, "ckpt")
    with pytest.raises(CheckpointError, match="data.pack"):
        check_compatible(old, {"model": {}, "data": {"source": "x", "pack": True}, "train": train}, "ckpt")


@pytest.fixture
def cheap_compile(monkeypatch, fresh_dynamo):
    """torch.compile with the aot_eager backend (the loop's logic, not inductor's code, is what
    these tests check), counting the frames it compiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=counter, **kw))
    return counter


def test_train_compile_resumes_exactly_and_checkpoints_plain_weights(corpus, tmp_path,
                                                                     cheap_compile):
    from stochastic_attention.testing import graph_breaks

    train(config_from_dict(raw_config(corpus, tmp_path / "eager")), progress=False)
    cfg = config_from_dict(raw_config(corpus, tmp_path / "b", compile=True))
    first = train(cfg, stop_after=4, progress=False)
    assert cheap_compile.frame_count >= 1 and graph_breaks() == 0

    def weights(run):
        ckpt = next((tmp_path / run / "checkpoints").glob("step-*.pt"))
        return set(torch.load(ckpt, weights_only=True)["model"])

    assert weights("b") == weights("eager")  # no "_orig_mod." prefixes
    resumed = train(cfg, resume=True, progress=False)
    assert first["interrupted"] and resumed["step"] == 6 and not resumed["interrupted"]
    full = train(config_from_dict(raw_config(corpus, tmp_path / "a", compile=True)),
                 progress=False)
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-6, abs=1e-7)
    assert resumed["val_loss"]["toy"] == pytest.approx(full["val_loss"]["toy"], rel=1e-6)
    # compiling changes rounding only: the same run as eager
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    SALlamaForCausalLM.from_pretrained(tmp_path / "b" / "final")  # a plain HF folder


def test_train_compile_option_and_flag():
    from stochastic_attention.cli import build_parser

    args = build_parser().parse_args(["train", "run.yaml", "--compile"])
    assert args.compile
    assert not build_parser().parse_args(["train", "run.yaml"]).compile
    with pytest.raises(ConfigError, match="train.compile must be a bool"):
        config_from_dict({"data": {"sources": ["shakespeare"]}, "train": {"compile": "yes"}})
