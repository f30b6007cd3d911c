"""The figure helpers every report uses: Agg backend, PNG written, figure always closed."""

import matplotlib
import pytest

from stochastic_attention.viz import pyplot, save_figure


def test_save_figure_writes_the_png_in_new_folders_and_closes_it(tmp_path):
    plt = pyplot()
    assert matplotlib.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    path = save_figure(fig, tmp_path / "a" / "b" / "plot.png")
    assert path == tmp_path / "a" / "b" / "plot.png"
    assert path.read_bytes().startswith(b"\x89PNG")
    assert fig.number not in plt.get_fignums()


def test_save_figure_closes_the_figure_when_writing_fails(tmp_path):
    plt = pyplot()
    (tmp_path / "file").write_text("in the way")
    fig, _ = plt.subplots()
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "file" / "plot.png")  # its folder would be a file
    assert fig.number not in plt.get_fignums()
