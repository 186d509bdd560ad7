"""Export the ranked critical weights as CSV, with statistics, a manifest and DVC metrics.

Writes REPORTS/critical_weights.csv, sensitivity_stats.json, manifest.json, metrics.json.

Example:

    python stages/export.py --prepared data/prepared --sensitivity data/sensitivity \\
        --ranked data/ranked --reports reports
"""

from pathlib import Path

import click

from critical_weights.errors import reported
from critical_weights.export import run_export
from critical_weights.params import load_params
from critical_weights.progress import Timings, setup_logging

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command(help=__doc__)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default="params.yaml", show_default=True)
@click.option("--prepared", type=_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=_DIR, required=True, help="Output of sensitivity.")
@click.option("--ranked", type=_DIR, required=True, help="Output of rank.")
@click.option("--reports", type=click.Path(path_type=Path), required=True, help="Folder for the reports.")
@click.option("--timings", "timings_file", type=click.Path(path_type=Path), help="Untracked JSON file for per-phase seconds.")
def main(params_file: Path, prepared: Path, sensitivity: Path, ranked: Path, reports: Path, timings_file: Path | None) -> None:
    setup_logging()
    timings = Timings("export")
    with reported(), timings.phase("export"):
        load_params(params_file)  # validated up front, though export reads no param itself
        run_export(sensitivity, ranked, prepared, reports)
    timings.write(timings_file)


if __name__ == "__main__":
    main()
