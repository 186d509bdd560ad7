"""Export the ranked critical weights as CSV, with statistics, a manifest and DVC metrics.

Writes REPORTS/critical_weights.csv, sensitivity_stats.json, manifest.json, metrics.json.

Example:

    python stages/export.py --prepared data/prepared --sensitivity data/sensitivity \\
        --ranked data/ranked --reports reports
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, PATH, Params, Timings, stage_command
from critical_weights.reports.export import run_export


@stage_command("export", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity.")
@click.option("--ranked", type=INPUT_DIR, required=True, help="Output of rank.")
@click.option("--reports", type=PATH, required=True, help="Folder for the reports.")
def main(params: Params, timings: Timings, prepared: Path, sensitivity: Path, ranked: Path, reports: Path) -> None:
    # export reads no param itself; params.yaml is still validated up front
    with timings.phase("export"):
        run_export(sensitivity, ranked, prepared, reports)


if __name__ == "__main__":
    main()
