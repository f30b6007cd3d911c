"""``sattn bench``: the union at matched keys, the FLOP bound, the memory ratios, the CPU clock."""

from __future__ import annotations

import torch

import stochastic_attention as sa
from stochastic_attention.bench import cli as bench_cli
from stochastic_attention.bench import run as bench


def mean_keys(n, window, **kw):
    return sa.attended_keys(n, window, **kw).float().mean().item()


def test_union_window_is_the_first_to_match_swa_keys():
    n, window = 300, 16
    swa = mean_keys(n, window, method="sliding_window")
    for layout in ("band", "block"):
        w = bench.matched_union_window(n, window, layout)

        def union(w, layout=layout):
            return mean_keys(n, w, local=window // 2, layout=layout,
                             generator=torch.Generator().manual_seed(0))

        assert union(w) >= swa > union(w - 1)


def test_cells_carry_pairs_bounds_and_tables(tmp_path):
    methods = ("full", "sliding_window", "stochastic", "stochastic_local", "stochastic_local_block")
    cells = bench.benchmark(methods=methods, seq_lens=(64, 96), window=8, heads=2, head_dim=8,
                            modes=("fwd", "fwd+bwd"), repeats=1, full_max_len=64, clock="cpu")
    by = {(c.method, c.seq_len, c.mode): c for c in cells}
    for c in cells:
        if c.method == "full" and c.seq_len == 96:
            assert c.skipped and c.median_s is None
            continue
        assert c.median_s is not None and c.pairs > 0 and c.bound_s > 0, c
    # The bound at 96 tokens uses dense's time per pair at 64 (the longest it ran).
    dense = by[("full", 64, "fwd")]
    swa = by[("sliding_window", 96, "fwd")]
    torch.testing.assert_close(swa.bound_s, dense.median_s / dense.pairs * swa.pairs)
    assert by[("sliding_window", 64, "fwd")].pairs_vs_full == (8 * 9 / 2 + 56 * 8) / (64 * 65 / 2)
    # Matched keys: the unions see at least SWA's pairs, within one window step.
    for m in ("stochastic_local", "stochastic_local_block"):
        ratio = by[(m, 96, "fwd")].pairs / by[("sliding_window", 96, "fwd")].pairs
        assert 1.0 <= ratio < 1.1
    table = bench_cli.markdown_tables(cells, methods, (64, 96), ("fwd", "fwd+bwd"),
                                      io_bytes_per_token=4 * 2 * 8 * 4)
    assert "against the FLOP bound" in table and "sliding_window time/bound" in table
    assert "MB / (q+k+v+out)" in table and "MB / dense MB" in table


def test_cpu_clock_is_refused_on_a_gpu_device(capsys, tmp_path):
    from stochastic_attention.cli import main

    code = main(["bench", "--clock", "cpu", "--device", "cuda", "--seq-lens", "32",
                 "--out", str(tmp_path)])
    assert code != 0 and "--clock cpu" in capsys.readouterr().err
