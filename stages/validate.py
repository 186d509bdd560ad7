"""Validate the ranking: perturb the critical weights and measure the damage to the loss.

Loads a fresh copy of the model and measures the loss on held-out texts (source texts that
prepare did not choose) and, beside it, on in-sample prepared texts. Then, for every
perturbation in `validate.perturbations`, perturbs the global top-k by `rank.metric` for
every k in `validate.k_values`, and the exported set (rank.mode, rank.k), against
`validate.random_draws` random draws and the least sensitive weights of the same tensors.
Finally it tests how well each computed metric predicts the measured loss change. The model
is restored bit-exactly after every measurement.

Writes METRICS (validation.json, DVC metrics), REPORT (validation_report.json), the damage
curve (PNG and the CSV behind the DVC plot) and the predictiveness PNG.

Example:

    python stages/validate.py --prepared data/prepared --sensitivity data/sensitivity \\
        --ranked data/ranked --source data/texts/corpus.jsonl \\
        --metrics reports/validation.json --report reports/validation_report.json \\
        --plot reports/plots/damage_curve.png --table reports/plots/damage_curve.csv \\
        --predictiveness-plot reports/plots/metric_predictiveness.png
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, OUTPUT_FILE, PATH, Params, Timings, stage_command
from critical_weights.validation.stage import Outputs, run_validate


@stage_command("validate", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity.")
@click.option("--ranked", type=INPUT_DIR, required=True, help="Output of rank (the exported set).")
@click.option("--source", type=PATH, required=True, help="texts.source, for held-out texts.")
@click.option("--metrics", type=OUTPUT_FILE, required=True, help="Headline JSON (DVC metrics).")
@click.option("--report", type=OUTPUT_FILE, required=True, help="Full JSON report.")
@click.option("--plot", type=OUTPUT_FILE, required=True, help="Damage-curve PNG.")
@click.option("--table", type=OUTPUT_FILE, required=True, help="Damage-curve CSV.")
@click.option("--predictiveness-plot", type=OUTPUT_FILE, required=True, help="Metric-predictiveness PNG.")
def main(params: Params, timings: Timings, prepared: Path, sensitivity: Path, ranked: Path, source: Path,
         metrics: Path, report: Path, plot: Path, table: Path, predictiveness_plot: Path) -> None:
    run_validate(prepared, sensitivity, ranked, source, params,
                 Outputs(metrics, report, plot, table, predictiveness_plot), timings)


if __name__ == "__main__":
    main()
