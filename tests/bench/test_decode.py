"""The decoding benchmark: ``sattn bench-decode`` writes its table, JSON and plot."""

import json

from stochastic_attention.cli import main


def test_bench_decode_writes_a_table_json_and_plot(tmp_path, capsys):
    argv = ["bench-decode", "--contexts", "64,128", "--steps", "2", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "8", "--window", "8", "--local", "4",
            "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| 64 |" in out and "| 128 |" in out and "full / sparse" in out
    cells = json.loads((tmp_path / "decode.json").read_text())["cells"]
    assert sorted((c["method"], c["context"]) for c in cells) == [
        ("full", 64), ("full", 128), ("sparse", 64), ("sparse", 128)]
    assert all(len(c["times_ms"]) == 2 and c["median_ms"] > 0 for c in cells)
    assert (tmp_path / "decode.png").stat().st_size > 0
    assert main([*argv[:-3], "--kv-heads", "3", "--out", str(tmp_path)]) == 2
    assert "--kv-heads 3 must divide --heads 4" in capsys.readouterr().err
