"""critical_weights.reports.figures: the same figure gives the same PNG bytes (no software tag or
timestamp), written whole, and the figure is closed after saving; the layout check finds what a
reader would trip over (a cut label, a legend over a point, colliding ticks) and nothing else."""

from __future__ import annotations

import logging

import matplotlib.pyplot as plt

from critical_weights.reports.figures import layout_problems, save_png


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


def test_layout_check_finds_a_cut_label_a_covering_legend_and_colliding_ticks():
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [0, 1, 2], "o", label="points")
    ax.legend(loc="center")  # right over the middle point
    ax.set_xticks([0, 0.01, 2], ["a long tick label", "another long one", "c"])
    fig.text(0.9, 0.5, "a note that runs off the right edge of the figure")
    problems = layout_problems(fig)
    assert "legend of a panel covers 1 plotted point(s)" in problems
    assert "1 pair(s) of x tick labels collide in a panel" in problems
    assert "text 'a note that runs off the right edge of t...' is cut at the figure's edge" in problems
    plt.close(fig)


def test_layout_check_passes_a_clean_figure_and_ignores_ticks_beyond_the_limits(tmp_path, caplog):
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([1, 2, 3], [3, 1, 2], "o-", label="series")
    ax.set_xticks([-100, 1, 2, 3, 100])  # ticks outside the view are not drawn
    ax.set_xlim(0.5, 3.5)
    ax.annotate("peak", (1, 3), textcoords="offset points", xytext=(0, 6), ha="center")  # its own point is fine
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    assert layout_problems(fig) == []
    with caplog.at_level(logging.WARNING, logger="critical_weights.reports.figures"):
        save_png(fig, tmp_path / "clean.png", dpi=40)
    assert caplog.records == []
