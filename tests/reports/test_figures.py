"""critical_weights.reports.figures: the same figure gives the same PNG bytes (no software tag or
timestamp), written whole, and the figure is closed after saving."""

from __future__ import annotations

import matplotlib.pyplot as plt

from critical_weights.reports.figures import save_png


def drawn():
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [3, 1, 2])
    ax.set_title("a figure")
    return fig


def test_same_figure_same_bytes_without_metadata_and_closed(tmp_path):
    for name in ("a.png", "b.png"):
        fig = drawn()
        save_png(fig, tmp_path / name, dpi=40)
        assert not plt.fignum_exists(fig.number)
    a = (tmp_path / "a.png").read_bytes()
    assert a == (tmp_path / "b.png").read_bytes()
    assert a.startswith(b"\x89PNG\r\n\x1a\n") and b"Software" not in a and b"tIME" not in a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temporary left behind
