"""``sattn bench-compile``: eager against compiled training steps, table, JSON and plot."""

from __future__ import annotations

import json

import pytest

from stochastic_attention.bench.compile import METHODS, model_config
from stochastic_attention.cli import main


def test_bench_compile_writes_table_json_and_plot(tmp_path, capsys, fresh_dynamo):
    argv = ["bench-compile", "--methods", "full,stochastic_local", "--seq-len", "24",
            "--batch", "2", "--hidden", "32", "--layers", "1", "--steps", "2", "--warmup", "0",
            "--backend", "aot_eager", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| full |" in out and "| stochastic_local |" in out
    report = json.loads((tmp_path / "compile.json").read_text())
    for cell in report["cells"]:
        assert cell["graphs"] == 1 and cell["graph_breaks"] == 0
        assert len(cell["eager_times_ms"]) == len(cell["compiled_times_ms"]) == 2
        assert cell["speedup"] == pytest.approx(cell["eager_ms"] / cell["compiled_ms"])
    assert (tmp_path / "compile.md").exists() and (tmp_path / "compile.png").exists()
    assert main([a if a != "aot_eager" else "nope" for a in argv]) == 2
    assert "not a torch.compile backend" in capsys.readouterr().err


def test_bench_compile_names_the_new_label_of_an_old_one(capsys):
    with pytest.raises(SystemExit):
        main(["bench-compile", "--methods", "swa"])
    assert "sliding_window" in capsys.readouterr().err


@pytest.mark.parametrize("label", list(METHODS))
def test_every_cell_is_a_model_of_its_method(label):
    config = model_config(label, hidden=32, layers=2, heads=4, window=8)
    method, options = METHODS[label]
    assert config.attention_methods == [method, method]
    if method == "stochastic_local":  # half the budget each
        assert (config.attention_options["window"], config.attention_options["local"]) == (4, 4)
    for name, value in options.items():
        assert config.attention_options[name] == value
