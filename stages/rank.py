"""Rank the critical weights: exact top-`rank.k` per tensor, block, component, or globally.

Reads the sensitivity shards (no torch) and writes OUT/critical.parquet and OUT/meta.json.

Example:

    python stages/rank.py --sensitivity data/sensitivity --out data/ranked
"""

from pathlib import Path

import click

from critical_weights.errors import reported
from critical_weights.params import load_params
from critical_weights.progress import Timings, setup_logging
from critical_weights.ranking import run_rank


@click.command(help=__doc__)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default="params.yaml", show_default=True)
@click.option("--sensitivity", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Output of sensitivity.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--timings", "timings_file", type=click.Path(path_type=Path), help="Untracked JSON file for per-phase seconds.")
def main(params_file: Path, sensitivity: Path, out: Path, timings_file: Path | None) -> None:
    setup_logging()
    timings = Timings("rank")
    with reported(), timings.phase("rank"):
        params = load_params(params_file)
        run_rank(sensitivity, params.rank, out)
    timings.write(timings_file)


if __name__ == "__main__":
    main()
