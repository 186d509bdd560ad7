"""Compute dL/dW over the prepared texts and score every weight into Parquet shards.

Per parameter and metric, OUT holds the top `sensitivity.keep` candidates, exact
statistics, a log10 histogram and a pooled grid (see critical_weights.artifacts.shards).

Example:

    python stages/sensitivity.py --prepared data/prepared --out data/sensitivity

Data parallel over 2 processes (gloo on CPU, nccl on GPU), same result:

    torchrun --nproc_per_node 2 stages/sensitivity.py --prepared data/prepared --out data/sensitivity
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, PATH, Params, Timings, stage_command
from critical_weights.sensitivity import distributed
from critical_weights.sensitivity.stage import run_sensitivity


@stage_command("sensitivity", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--out", type=PATH, required=True, help="Output folder for the shards.")
def main(params: Params, timings: Timings, prepared: Path, out: Path) -> None:
    try:
        run_sensitivity(prepared, params, out, timings)
    finally:
        distributed.finish()


if __name__ == "__main__":
    main()
