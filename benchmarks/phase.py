"""Run one torch-free phase of the pipeline (rank, export or plot) in a process of its own.

`bench.py` starts this script once per phase so that each phase's peak host memory
(ru_maxrss) is its own, not the benchmark's. It writes a JSON record to RESULT:
the seconds the library call took, the seconds its imports took, the peak host memory
of this process, and whether torch got imported (the stages after `sensitivity` must
not import it).

Example:

    python benchmarks/phase.py --result rank.json rank --sensitivity S --out R --mode global
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click

_START = time.perf_counter()
_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def _finish(result: Path, import_s: float, call_s: float) -> None:
    record = {
        "import_s": import_s,
        "seconds": call_s,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "torch_imported": "torch" in sys.modules,
    }
    result.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


@click.group()
@click.option("--result", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSON record to write.")
@click.pass_context
def main(ctx: click.Context, result: Path) -> None:
    ctx.obj = result


@main.command()
@click.option("--sensitivity", type=_DIR, required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--metric", default="grad_x_weight", show_default=True)
@click.option("--mode", default="per_tensor", show_default=True)
@click.option("--k", type=int, default=100, show_default=True)
@click.pass_obj
def rank(result: Path, sensitivity: Path, out: Path, metric: str, mode: str, k: int) -> None:
    """critical_weights.ranking.stage.run_rank, as the rank stage calls it."""
    from critical_weights.config.params import RankParams
    from critical_weights.ranking.stage import run_rank

    t0 = time.perf_counter()
    run_rank(sensitivity, RankParams(metric=metric, mode=mode, k=k), out)
    _finish(result, t0 - _START, time.perf_counter() - t0)


@main.command()
@click.option("--sensitivity", type=_DIR, required=True)
@click.option("--ranked", type=_DIR, required=True)
@click.option("--prepared", type=_DIR, required=True)
@click.option("--reports", type=click.Path(path_type=Path), required=True)
@click.pass_obj
def export(result: Path, sensitivity: Path, ranked: Path, prepared: Path, reports: Path) -> None:
    """critical_weights.reports.export.run_export, as the export stage calls it."""
    from critical_weights.reports.export import run_export

    t0 = time.perf_counter()
    run_export(sensitivity, ranked, prepared, reports)
    _finish(result, t0 - _START, time.perf_counter() - t0)


@main.command()
@click.option("--sensitivity", type=_DIR, required=True)
@click.option("--ranked", type=_DIR, required=True)
@click.option("--overlap", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.pass_obj
def plot(result: Path, sensitivity: Path, ranked: Path, overlap: Path, out: Path) -> None:
    """critical_weights.reports.plots.run_plot, as the plot stage calls it (default plot params)."""
    from critical_weights.config.params import PlotParams
    from critical_weights.reports.plots import run_plot

    t0 = time.perf_counter()
    run_plot(sensitivity, ranked, overlap, out, PlotParams())
    _finish(result, t0 - _START, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
