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

from critical_weights.errors import reported
from critical_weights.params import load_params
from critical_weights.progress import Timings, setup_logging
from critical_weights.validation import run_validate

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_OUT = click.Path(dir_okay=False, path_type=Path)


@click.command(help=__doc__)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default="params.yaml", show_default=True)
@click.option("--prepared", type=_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=_DIR, required=True, help="Output of sensitivity.")
@click.option("--source", type=click.Path(path_type=Path), required=True, help="texts.source, for held-out texts (validate.holdout).")
@click.option("--report", type=_OUT, required=True, help="JSON report (DVC metrics).")
@click.option("--plot", type=_OUT, required=True, help="Damage-curve PNG.")
@click.option("--table", type=_OUT, required=True, help="Damage-curve CSV.")
@click.option("--timings", "timings_file", type=click.Path(path_type=Path), help="Untracked JSON file for per-phase seconds.")
def main(params_file: Path, prepared: Path, sensitivity: Path, source: Path, report: Path, plot: Path,
         table: Path, timings_file: Path | None) -> None:
    setup_logging()
    timings = Timings("validate")
    with reported():
        params = load_params(params_file)
        run_validate(prepared, sensitivity, source, params, report, plot, table, timings)
    timings.write(timings_file)


if __name__ == "__main__":
    main()
