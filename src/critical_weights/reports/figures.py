"""Saving a figure, and checking what a reader will see in it.

Matplotlib runs headless (Agg). A PNG carries no software tag or timestamp, so the same
figure gives the same bytes, and it is written atomically, so a killed stage leaves the old
file or the new one, never half of one.

`layout_problems` reads the drawn figure as a reader would: a label cut at the figure's edge,
a legend or a text box over a plotted point, tick labels that collide. `save_png` logs each
problem it finds as a warning, so a figure that misleads is never written in silence.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.patches import Rectangle, StepPatch  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from critical_weights.core.outputs import atomic_path  # noqa: E402

log = logging.getLogger(__name__)
EDGE_PX = 1.0  # a label may touch the figure's edge by this much (antialiasing)


def save_png(fig: Figure, path: Path, dpi: int = 120) -> None:
    """PNG with no software tag or timestamp, written atomically; the figure is closed. Every
    layout problem (`layout_problems`) is logged as a warning naming the file."""
    fig.set_dpi(dpi)
    for problem in layout_problems(fig):
        log.warning("%s: %s", path.name, problem)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, metadata={"Software": None}, format="png")
    plt.close(fig)


def layout_problems(fig: Figure) -> list[str]:
    """What a reader would trip over, one line each: text cut at the figure's edge, a legend or
    a text placed in an axes over a plotted point, colliding tick labels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    problems = []
    edge = fig.bbox.padded(EDGE_PX)
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in axis.get_major_ticks() + axis.get_minor_ticks() for t in (tick.label1, tick.label2)}
    drawn_ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in _tick_labels(axis)}
    for text in _texts(fig):
        if id(text) in ticks and id(text) not in drawn_ticks:
            continue  # a tick beyond the axis' limits is not drawn
        box = text.get_window_extent(renderer)
        if not _inside(box, edge):
            problems.append(f"text {_name(text)} is cut at the figure's edge")
    for ax in fig.axes:
        points = _points(ax)  # (n, 2) display coordinates
        covers = [(f"legend of {_axes_name(ax)}", leg.get_window_extent(renderer), None)
                  for leg in ax.findobj(Legend) if leg.get_visible()]
        covers += [(f"text {_name(t)}", t.get_window_extent(renderer), getattr(t, "xy", None))
                   for t in ax.texts if t.get_visible() and t.get_text().strip()]
        for what, box, own in covers:
            hit = _covered(points, box, ax, own)
            if hit:
                problems.append(f"{what} covers {hit} plotted point(s)")
        for axis, name in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            boxes = [t.get_window_extent(renderer) for t in _tick_labels(axis)]
            clashes = sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
            if clashes:
                problems.append(f"{clashes} pair(s) of {name} tick labels collide in {_axes_name(ax)}")
    return problems


def _texts(fig: Figure) -> list[Text]:
    """Every visible, non-empty text of the figure: titles, labels, tick labels, legends, notes."""
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _tick_labels(axis) -> list[Text]:
    """The tick labels the axis draws: visible, non-empty, at a tick within its view limits."""
    lo, hi = sorted(axis.get_view_interval())
    span = (hi - lo) * 1e-9
    return [label for tick in axis.get_major_ticks() + axis.get_minor_ticks()
            if lo - span <= tick.get_loc() <= hi + span
            for label in (tick.label1, tick.label2) if label.get_visible() and label.get_text().strip()]


def _inside(box: Bbox, edge: Bbox) -> bool:
    return box.x0 >= edge.x0 and box.y0 >= edge.y0 and box.x1 <= edge.x1 and box.y1 <= edge.y1


def _points(ax) -> np.ndarray:
    """Every drawn data point of `ax` (line vertices, the top of each bar, scatter offsets) in
    display coordinates; lines in axes coordinates (axhline) are not points."""
    found = []
    for line in ax.get_lines():
        if not line.get_visible() or line.get_transform() != ax.transData:
            continue
        xy = np.asarray(line.get_xydata(), dtype=float)
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy):
            found.append(ax.transData.transform(xy))
    for patch in ax.patches:  # bars: the middle of each top edge
        if isinstance(patch, Rectangle) and patch.get_visible() and patch.get_transform() == ax.transData \
                and patch.get_height() != 0:
            x, y, w, h = patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()
            found.append(ax.transData.transform(np.array([[x + w / 2, y + h]], dtype=float)))
        elif isinstance(patch, StepPatch) and patch.get_visible():  # a histogram: the middle of each step
            values, edges, _ = patch.get_data()
            xy = np.column_stack([(edges[:-1] + edges[1:]) / 2, values]).astype(float)
            xy = xy[np.isfinite(xy).all(axis=1) & (xy[:, 1] != 0)]
            if len(xy):
                found.append(ax.transData.transform(xy))
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and coll.get_visible():
            xy = np.asarray(coll.get_offsets(), dtype=float)
            xy = xy[np.isfinite(xy).all(axis=1)] if xy.size else xy.reshape(0, 2)
            if len(xy):
                found.append(coll.get_offset_transform().transform(xy))
    return np.concatenate(found) if found else np.empty((0, 2))


def _covered(points: np.ndarray, box: Bbox, ax, own: tuple | None) -> int:
    """How many of `points` lie inside `box` (the point a text annotates excepted)."""
    if not len(points):
        return 0
    inside = (points[:, 0] > box.x0) & (points[:, 0] < box.x1) & (points[:, 1] > box.y0) & (points[:, 1] < box.y1)
    if own is not None:
        anchor = ax.transData.transform(np.asarray(own, dtype=float).reshape(1, 2))
        inside &= ~np.isclose(points, anchor).all(axis=1)
    return int(inside.sum())


def _name(text: Text) -> str:
    words = text.get_text().split()
    return repr(" ".join(words)[:40] + ("..." if len(" ".join(words)) > 40 else ""))


def _axes_name(ax) -> str:
    return f"panel {ax.get_title()!r}" if ax.get_title() else "a panel"
