"""Plot the score distribution, the per-block comparison, the heatmap and metric agreement.

Writes OUT/sensitivity_distribution.png, layer_comparison.png, sensitivity_heatmap.png,
metric_overlap.png,
the CSVs behind DVC's `plots:` (layer_comparison.csv, score_histogram.csv), and
OUT/experts/ (expert_importance.csv; expert_heatmap.png for Mixture-of-Experts models).

Example:

    python stages/plot.py --sensitivity data/sensitivity --ranked data/ranked \\
        --overlap reports/metric_overlap.json --out reports/plots
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, INPUT_FILE, PATH, Params, Timings, stage_command
from critical_weights.reports.plots import run_plot


@stage_command("plot", __doc__)
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity.")
@click.option("--ranked", type=INPUT_DIR, required=True, help="Output of rank.")
@click.option("--overlap", type=INPUT_FILE, required=True, help="metric_overlap.json from export.")
@click.option("--out", type=PATH, required=True, help="Folder for the plots.")
def main(params: Params, timings: Timings, sensitivity: Path, ranked: Path, overlap: Path, out: Path) -> None:
    with timings.phase("plot"):
        run_plot(sensitivity, ranked, overlap, out, params.plot)


if __name__ == "__main__":
    main()
