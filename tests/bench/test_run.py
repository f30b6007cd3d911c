"""``sattn bench``: the union at matched keys, the FLOP bound, the memory ratios, the CPU clock."""

from __future__ import annotations

import pytest
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


def test_projected_inputs_time_the_methods_as_a_model_calls_them(tmp_path):
    """``--inputs projected``: q, k, v are [B, n, H, D]; every method's timed call gives what the
    contiguous call gives, as the [B, n, H * D] a model's output projection takes."""
    n, heads, dim = 40, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, dim, generator=g) for _ in range(3))
    perm = sa.random_permutation(1, heads, n, generator=g)
    for method in ("full", "sliding_window", "stochastic", "stochastic_local"):
        projected = bench._runner(method, 8, q, k, v, perm, "fwd", "projected")
        assert projected() is None  # timed calls return nothing; compare through method_fn
        want = bench.method_fn(method, 8, n)(*(x.transpose(1, 2).contiguous() for x in (q, k, v)),
                                              perm)
        got = bench.method_fn(method, 8, n)(*(x.transpose(1, 2) for x in (q, k, v)), perm)
        torch.testing.assert_close(got.transpose(1, 2).flatten(2),
                                   want.transpose(1, 2).reshape(1, n, heads * dim))
    cells = bench.benchmark(methods=("sliding_window", "stochastic"), seq_lens=(48,), window=8,
                            heads=heads, head_dim=dim, repeats=1, inputs="projected")
    assert all(c.median_s is not None for c in cells)


def test_projected_inputs_through_the_cli(tmp_path, capsys):
    from stochastic_attention.cli import main

    assert main(["bench", "--inputs", "projected", "--seq-lens", "48", "--window", "8",
                 "--heads", "2", "--head-dim", "8", "--methods", "sliding_window,stochastic",
                 "--repeats", "1", "--no-progress", "--out", str(tmp_path)]) == 0
    assert "projected inputs" in (tmp_path / "bench.md").read_text()
    with pytest.raises(SystemExit):
        main(["bench", "--inputs", "bnhd", "--out", str(tmp_path)])
    assert "--inputs" in capsys.readouterr().err


def test_sinks_reach_every_windowed_method(tmp_path):
    """``--sinks``: the windowed methods get the sinks (their outputs change, and equal the
    operators called with them); dense attention is unchanged."""
    n, heads, dim = 40, 2, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
    perm = sa.random_permutation(1, heads, n, generator=g)
    with_sinks = {m: bench.method_fn(m, 8, n, sinks=3)(q, k, v, perm)
                  for m in ("full", "sliding_window", "stochastic", "stochastic_local")}
    for m, out in with_sinks.items():
        plain = bench.method_fn(m, 8, n)(q, k, v, perm)
        assert torch.equal(out, plain) == (m == "full"), m
    torch.testing.assert_close(with_sinks["stochastic"],
                               sa.stochastic_attention(q, k, v, 8, perm=perm[:, :1], sinks=3))
    from stochastic_attention.cli import main

    assert main(["bench", "--sinks", "3", "--seq-lens", "48", "--window", "8", "--heads", "2",
                 "--head-dim", "8", "--methods", "sliding_window,stochastic", "--repeats", "1",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    assert "sinks=3" in (tmp_path / "bench.md").read_text()
