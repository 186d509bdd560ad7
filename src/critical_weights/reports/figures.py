"""Saving a figure: the one way every stage writes a PNG.

Matplotlib runs headless (Agg). A PNG carries no software tag or timestamp, so the same
figure gives the same bytes, and it is written atomically, so a killed stage leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from critical_weights.core.outputs import atomic_path  # noqa: E402


def save_png(fig: Figure, path: Path, dpi: int = 120) -> None:
    """PNG with no software tag or timestamp, written atomically; the figure is closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, metadata={"Software": None}, format="png")
    plt.close(fig)
