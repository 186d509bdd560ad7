"""Validate the ranking: perturb the critical weights and measure the damage to the loss.

Loads a fresh copy of the model, measures the baseline loss on `validate.n_texts` prepared
texts, then for every perturbation in `validate.perturbations` and every k in
`validate.k_values` perturbs the global top-k by `rank.metric` and, as controls, as many
random (`random_k`) and least sensitive (`bottom_k`) weights from the same tensors, and
measures the loss again. The model is restored bit-exactly after every measurement.

Writes REPORT (validation.json, DVC metrics), PLOT (damage_curve.png) and TABLE
(damage_curve.csv, behind the DVC plot).

Example:

    python stages/validate.py --prepared data/prepared --sensitivity data/sensitivity \\
        --source data/texts/corpus.jsonl --report reports/validation.json \\
        --plot reports/plots/damage_curve.png --table reports/plots/damage_curve.csv
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, OUTPUT_FILE, PATH, Params, Timings, stage_command
from critical_weights.validation import run_validate


@stage_command("validate", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity.")
@click.option("--source", type=PATH, required=True, help="texts.source, for held-out texts (validate.holdout).")
@click.option("--report", type=OUTPUT_FILE, required=True, help="JSON report (DVC metrics).")
@click.option("--plot", type=OUTPUT_FILE, required=True, help="Damage-curve PNG.")
@click.option("--table", type=OUTPUT_FILE, required=True, help="Damage-curve CSV.")
def main(params: Params, timings: Timings, prepared: Path, sensitivity: Path, source: Path, report: Path,
         plot: Path, table: Path) -> None:
    run_validate(prepared, sensitivity, source, params, report, plot, table, timings)


if __name__ == "__main__":
    main()
