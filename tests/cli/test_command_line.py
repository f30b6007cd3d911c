"""The sattn command line: one option language, help everywhere, user errors as one line + 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

import stochastic_attention
from stochastic_attention import cli_args
from stochastic_attention.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
PROGRESS_COMMANDS = ("bench", "bench-decode", "coverage", "graph", "fna", "train", "pretrain-compare", "eval",
                     "longrange run")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's own errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(argv: list[str], capsys, *fragments: str) -> str:
    code, _, err = run(argv, capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"sattn {argv[0]}: error: "), err
    assert "Traceback" not in err and "ZeroDivisionError" not in err
    for fragment in fragments:
        assert fragment in last, last
    return last


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict:
    """Every (sub)command's parser, nested ones included, by name ("longrange run")."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_subparsers(sub, prefix + name + " "))
    return found


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    missing = [f"sattn {a.dest}" for a in parser._actions if not (a.help or "").strip()]
    for name, sub in _subparsers(parser).items():
        missing += [f"sattn {name} {'/'.join(a.option_strings) or a.dest}"
                    for a in sub._actions if not (a.help or "").strip()]
    assert not missing, f"options without help text: {missing}"


def test_version_prints_the_package_version(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"sattn {stochastic_attention.__version__}"


def test_progress_and_out_mean_the_same_in_every_subcommand():
    subs = _subparsers(build_parser())
    for name in PROGRESS_COMMANDS:
        options = {s for a in subs[name]._actions for s in a.option_strings}
        assert "--no-progress" in options, name
    for name, sub in subs.items():
        out = next((a for a in sub._actions if "--out" in a.option_strings), None)
        if out is not None:
            assert "folder" in out.help, (name, out.help)


def test_list_options_are_comma_separated_everywhere(capsys):
    seeds = {name: next(a for a in sub._actions if "--seeds" in a.option_strings)
             for name, sub in _subparsers(build_parser()).items()
             if any("--seeds" in a.option_strings for a in sub._actions)}
    assert set(seeds) == {"coverage", "pretrain-compare", "eval", "longrange run"}
    for action in seeds.values():
        assert action.nargs is None and list(action.type("0,1, 2")) == [0, 1, 2]
    # the old space-separated spelling is an error, not a silently different value
    assert_usage_error(["coverage", "--seeds", "0", "1"], capsys, "unrecognized arguments")
    assert_usage_error(["pretrain-compare", "x.yaml", "--seeds", "0", "1"], capsys)


def test_shared_types_name_the_problem():
    assert cli_args.int_list("3,1") == [3, 1]
    assert cli_args.str_list("a, b,") == ["a", "b"]
    assert cli_args.optional_list(cli_args.length_list)("") == []
    for parse, text in ((cli_args.positive_int, "0"), (cli_args.int_list, "1,x"),
                        (cli_args.length_list, "1"), (cli_args.zero_or_length, "1"),
                        (cli_args.int_list, "")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    with pytest.raises(cli_args.UsageError, match="GiB"):
        cli_args.check_memory(2.0**80, "this", "use less")


# --- bad input, one subcommand at a time -----------------------------------------------------

def test_bench_rejects_bad_values(capsys, tmp_path):
    out = str(tmp_path)
    assert_usage_error(["bench", "--window", "0", "--out", out], capsys, "--window", ">= 1")
    assert_usage_error(["bench", "--seq-lens", "64,x", "--out", out], capsys, "--seq-lens")
    assert_usage_error(["bench", "--methods", "sliding_window,fast", "--out", out], capsys, "fast")
    assert_usage_error(["bench", "--modes", "bwd", "--out", out], capsys, "bwd")
    assert_usage_error(["bench", "--device", "nonsense:x", "--out", out],
                       capsys, "--device")
    assert_usage_error(["bench", "--seq-lens", str(2**40), "--methods", "sliding_window", "--out", out],
                       capsys, "GiB", "--seq-lens")
    # former names are errors that name the new one
    assert_usage_error(["bench", "--methods", "dense,sa_band", "--out", out], capsys,
                       "'dense' was renamed: use 'full'")
    assert_usage_error(["bench", "--methods", "sa_band_per_head", "--out", out], capsys,
                       "use 'stochastic_per_head'")
    assert_usage_error(["bench", "--dense-max-len", "8", "--out", out], capsys,
                       "--dense-max-len was renamed --full-max-len")
    assert not list(tmp_path.iterdir())  # nothing written, nothing run


def test_patterns_rejects_bad_values_and_writes_to_the_current_folder(capsys, tmp_path,
                                                                      monkeypatch):
    assert_usage_error(["patterns", "--window", "0"], capsys, "--window")
    assert_usage_error(["patterns", "--seq-len", "1"], capsys, "--seq-len")
    assert_usage_error(["patterns", "--seq-len", "100000"], capsys, "too long")
    shipped = ROOT / "docs" / "figures" / "patterns.png"
    before = shipped.stat().st_mtime_ns if shipped.exists() else None
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["patterns", "--seq-len", "16", "--window", "4"], capsys)
    assert code == 0 and (tmp_path / "patterns.png").stat().st_size > 0
    assert out.strip() == "patterns.png"
    assert (shipped.stat().st_mtime_ns if shipped.exists() else None) == before
    (tmp_path / "file").write_text("x")
    assert_usage_error(["patterns", "--seq-len", "16", "--out", "file"], capsys, "folder")


def test_coverage_and_graph_reject_bad_values(capsys, tmp_path):
    out = str(tmp_path / "o")
    assert_usage_error(["coverage", "--window", "0", "--out", out], capsys, "--window")
    assert_usage_error(["coverage", "--seq-len", "1", "--out", out], capsys, "--seq-len")
    assert_usage_error(["coverage", "--patterns", "sliding_window,nope", "--out", out], capsys, "nope")
    assert_usage_error(["coverage", "--patterns", "sa_swa", "--out", out], capsys,
                       "pattern 'sa_swa' was renamed: use 'gated'")
    assert_usage_error(["graph", "--patterns", "sa_block", "--out", out], capsys,
                       "use 'stochastic_block'")
    assert_usage_error(["coverage", "--position-seq-len", "1", "--out", out], capsys)
    assert_usage_error(["coverage", "--position-seq-len", "10000000", "--out", out], capsys,
                       "GiB", "--position-seq-len")
    assert_usage_error(["graph", "--seq-len", "1", "--out", out], capsys, "--seq-len")
    assert_usage_error(["coverage", "--seq-len", str(10**12), "--sweep-seq-lens", "",
                        "--position-seq-len", "0", "--out", out], capsys, "GiB", "--seq-len")
    assert_usage_error(["graph", "--seq-len", str(10**12), "--out", out], capsys, "GiB")
    assert_usage_error(["graph", "--window", "0", "--out", out], capsys, "--window")
    assert_usage_error(["graph", "--depths", "0", "--out", out], capsys, "--depths")
    assert_usage_error(["coverage", "--seq-len", "8", "--window", "8", "--out", out], capsys,
                       "shorter")
    assert_usage_error(["coverage", "--window", "1", "--out", out], capsys, ">= 2")
    assert_usage_error(["graph", "--small-world-seq-len", "3", "--out", out], capsys,
                       "--small-world-seq-len")
    assert_usage_error(["graph", "--connectome-nodes", "5", "--out", out], capsys,
                       "--connectome-nodes", "too short")
    assert_usage_error(["graph", "--connectome-nodes", "40", "--connectome-degree", "39",
                        "--out", out], capsys,
                       "--connectome-degree")
    assert not (tmp_path / "o").exists()


def test_coverage_of_a_short_sequence_has_no_division_by_zero(capsys, tmp_path):
    code, out, err = run(["coverage", "--seq-len", "32", "--window", "4", "--patterns", "sliding_window",
                          "--seeds", "0", "--max-layers", "4", "--sweep-seq-lens", "",
                          "--position-seq-len", "40", "--position-depths", "1",
                          "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    assert "--seeds 0 " in (tmp_path / "coverage.md").read_text()  # the reproducing command


def test_fna_rejects_bad_values(capsys, tmp_path):
    missing = str(tmp_path / "missing.yaml")
    assert_usage_error(["fna", "--config", missing, "--out", str(tmp_path)], capsys,
                       "does not exist")
    assert_usage_error(["fna", "--speed", "1,512"], capsys, "--speed")
    assert_usage_error(["fna", "--window", "0"], capsys, "--window")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    assert_usage_error(["fna", "--config", str(bad), "--out", str(tmp_path)], capsys,
                       "cannot be read")
    # former names in a variant name the new one, before any work
    shipped = yaml.safe_load((ROOT / "configs" / "fna" / "synthetic.yaml").read_text())
    for variant, message in (({"name": "a", "attention": "fna"},
                              "attention 'fna' was renamed: use 'fractional'"),
                             ({"name": "b", "attention": "softmax", "window": 4,
                               "stochastic": True},
                              "'stochastic' was renamed: use windows: stochastic")):
        old = tmp_path / "old.yaml"
        old.write_text(yaml.safe_dump(dict(shipped, variants=[variant])))
        assert_usage_error(["fna", "--config", str(old), "--out", str(tmp_path / "o")], capsys,
                           message)


def _train_config(tmp_path: Path, **model) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (docs / f"{i}.txt").write_text("the cat sat on the mat and the dog ran far away " * 20)
    raw = {"model": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "attention_methods": "sliding_window", "attention_options": {"window": 4},
                     **model},
           "data": {"sources": [{"name": "toy", "files": str(docs)}], "val_fraction": 0.34,
                    "cache_dir": str(tmp_path / "cache")},
           "train": {"out_dir": str(tmp_path / "run"), "seq_len": 16, "batch_size": 2,
                     "micro_batch_size": 2, "steps": 2, "warmup_steps": 1, "eval_every": 2,
                     "eval_batches": 1, "tensorboard": False, "threads": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_rejects_bad_configs_and_files(capsys, tmp_path):
    config = str(_train_config(tmp_path))
    assert_usage_error(["train", str(tmp_path / "nope.yaml")], capsys, "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {hidden_size: [\n")
    assert_usage_error(["train", str(broken)], capsys, "not valid YAML")
    typo = _train_config(tmp_path / "typo", attention_method="stochastic")
    last = assert_usage_error(["train", str(typo)], capsys, "attention_method", "known")
    assert "'attention_methods'" in last and "'attention_options'" in last
    assert_usage_error(["train", config, "--set", "model.windw=8"], capsys, "windw")
    assert_usage_error(["train", config, "--set", "model.attention_methods=sparse"], capsys,
                       "attention_methods")
    # the former keys name their replacement
    assert_usage_error(["train", config, "--set", "model.attention_kinds=swa"], capsys,
                       "'attention_kinds' was renamed: use 'attention_methods'")
    assert_usage_error(["train", config, "--set", "model.window=8"], capsys,
                       "attention_options={'window': 8}")
    assert_usage_error(["train", config, "--set", "model.attention_methods=swa"], capsys,
                       "'swa' was renamed: use 'sliding_window'")
    assert_usage_error(["train", config, "--set", "model.attention_options={moba_topk: 2}"],
                       capsys, "'moba_topk' was renamed: use 'top_k'")
    assert_usage_error(["train", config, "--set", "train.steps=ten"], capsys, "train.steps")
    assert_usage_error(["train", config, "--set", "train.seq_len=1"], capsys, "seq_len")
    assert_usage_error(["train", config, "--set", "data.split=0"], capsys, "data", "split")
    assert_usage_error(["train", config, "--set", "data.sources=[nocorpus]"], capsys,
                       "unknown data source")
    assert_usage_error(["train", config, "--set", "train.seq_len=100000"], capsys,
                       "not enough tokens")
    assert_usage_error(["train", config, "--resume", "--overwrite"], capsys, "--overwrite")
    assert_usage_error(["train", config, "--resume"], capsys, "no checkpoint")
    assert not (tmp_path / "run").exists()


def test_train_refuses_to_replace_a_run_and_reports_corrupt_checkpoints(capsys, tmp_path):
    config = str(_train_config(tmp_path))
    code, out, err = run(["train", config, "--no-progress"], capsys)
    assert code == 0, err
    assert '"step": 2' in out and "train run" not in err  # no progress bar
    assert "Writing model shards" not in err  # nor Hugging Face's
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert_usage_error(["train", config, "--set", "train.steps=1"], capsys, "--resume",
                       "--overwrite", "already holds a run")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # untouched
    # --overwrite replaces the old run only once the new one is known to start
    assert_usage_error(["train", config, "--overwrite", "--set",
                        "model.attention_options.window=0"], capsys, "model: window")
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step-*.pt"):
        ckpt.write_bytes(b"not a checkpoint")
    assert_usage_error(["train", config, "--resume"], capsys, "corrupt")


def test_pretrain_compare_rejects_bad_values(capsys, tmp_path):
    out = ["--out", str(tmp_path / "runs"), "--report", str(tmp_path / "r.md")]
    assert_usage_error(["pretrain-compare", str(tmp_path / "nope.yaml"), *out], capsys,
                       "does not exist")
    config = str(_train_config(tmp_path))
    assert_usage_error(["pretrain-compare", config, "--report-only", *out], capsys,
                       "nothing to report")
    assert_usage_error(["pretrain-compare", config, "--eval-chunks", "0", *out], capsys,
                       "--eval-chunks")


def test_eval_rejects_bad_values(capsys, tmp_path):
    out = ["--out", str(tmp_path / "o")]
    assert_usage_error(["eval", "--windows", "0,64", *out], capsys, "--windows")
    assert_usage_error(["eval", "--seeds", "0 1", *out], capsys, "--seeds")
    assert_usage_error(["eval", "--tasks", "perplexity,nope", *out], capsys, "nope")
    assert_usage_error(["eval", "--methods", "stochastic,warp", *out], capsys, "warp")
    assert_usage_error(["eval", "--methods", "swa+sinks=4", *out], capsys,
                       "'swa' was renamed: use 'sliding_window'")
    assert_usage_error(["eval", "--methods", "moba+moba_topk=4", *out], capsys,
                       "'moba_topk' was renamed: use 'top_k'")
    assert_usage_error(["eval", "--passkey-depths", "0.5,2", *out], capsys, "[0, 1]")
    assert_usage_error(["eval", "--decode-check", "2048", *out], capsys, "PROMPT,STEPS")
    assert_usage_error(["eval", "--model", str(tmp_path / "no-model"), *out], capsys,
                       "no such folder")
    assert_usage_error(["eval", "--merge", str(tmp_path / "missing"), *out], capsys,
                       "results.json")
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "results.json").write_text("{broken")
    assert_usage_error(["eval", "--merge", str(tmp_path / "shard"), *out], capsys, "corrupt")
    assert not (tmp_path / "o").exists()


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    import stochastic_attention.viz as viz

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(viz, "plot_patterns", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["patterns", "--out", str(tmp_path)])


def test_no_progress_silences_the_progress_bars(capsys, tmp_path):
    argv = ["bench", "--seq-lens", "32", "--window", "4", "--methods", "sliding_window", "--modes", "fwd",
            "--repeats", "1", "--out", str(tmp_path)]
    code, _, err = run(argv, capsys)
    assert code == 0 and "bench:" in err  # the bar is there by default
    code, _, err = run([*argv, "--no-progress"], capsys)
    assert code == 0 and "bench:" not in err
    code, _, err = run(["coverage", "--seq-len", "32", "--window", "4", "--patterns", "stochastic",
                        "--seeds", "0", "--max-layers", "3", "--sweep-seq-lens", "",
                        "--position-seq-len", "0", "--causal", "causal", "--out", str(tmp_path),
                        "--no-progress"], capsys)
    assert code == 0 and "coverage n=" not in err and "it/s" not in err
