"""Compute dL/dW over the prepared texts and score every weight into Parquet shards.

Per parameter and metric, OUT holds the top `sensitivity.keep` candidates, exact
statistics, a log10 histogram and a pooled grid (see critical_weights.shards).

Example:

    python stages/sensitivity.py --prepared data/prepared --out data/sensitivity

Data parallel over 2 processes (gloo on CPU, nccl on GPU), same result:

    torchrun --nproc_per_node 2 stages/sensitivity.py --prepared data/prepared --out data/sensitivity
"""

from pathlib import Path

import click

from critical_weights import distributed
from critical_weights.errors import reported
from critical_weights.models import resolve_device
from critical_weights.params import load_params
from critical_weights.pipeline import run_sensitivity
from critical_weights.progress import Timings, setup_logging


@click.command(help=__doc__)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default="params.yaml", show_default=True)
@click.option("--prepared", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="Output of prepare.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder for the shards.")
@click.option("--timings", "timings_file", type=click.Path(path_type=Path), help="Untracked JSON file for per-phase seconds.")
def main(params_file: Path, prepared: Path, out: Path, timings_file: Path | None) -> None:
    setup_logging()
    timings = Timings("sensitivity")
    with reported():
        params = load_params(params_file)
        resolve_device(params.model)  # a device or dtype this machine lacks fails here, before any work
        try:
            run_sensitivity(prepared, params, out, timings)
        finally:
            distributed.finish()
    timings.write(timings_file)


if __name__ == "__main__":
    main()
