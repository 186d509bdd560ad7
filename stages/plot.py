"""Plot the score distribution, the per-block comparison, the heatmap and metric agreement.

Writes OUT/sensitivity_distribution.png, layer_comparison.png, sensitivity_heatmap.png,
metric_overlap.png,
and the CSVs behind DVC's `plots:` (layer_comparison.csv, score_histogram.csv).

Example:

    python stages/plot.py --sensitivity data/sensitivity --ranked data/ranked \\
        --overlap reports/metric_overlap.json --out reports/plots
"""

from pathlib import Path

import click

from critical_weights.errors import reported
from critical_weights.params import load_params
from critical_weights.plots import run_plot
from critical_weights.progress import Timings, setup_logging

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command(help=__doc__)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default="params.yaml", show_default=True)
@click.option("--sensitivity", type=_DIR, required=True, help="Output of sensitivity.")
@click.option("--ranked", type=_DIR, required=True, help="Output of rank.")
@click.option("--overlap", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True, help="metric_overlap.json from export.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for the plots.")
@click.option("--timings", "timings_file", type=click.Path(path_type=Path), help="Untracked JSON file for per-phase seconds.")
def main(params_file: Path, sensitivity: Path, ranked: Path, overlap: Path, out: Path, timings_file: Path | None) -> None:
    setup_logging()
    timings = Timings("plot")
    with reported(), timings.phase("plot"):
        params = load_params(params_file)
        run_plot(sensitivity, ranked, overlap, out, params.plot)
    timings.write(timings_file)


if __name__ == "__main__":
    main()
