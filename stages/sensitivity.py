"""Compute dL/dW over the prepared texts and score every weight into Parquet shards.

Per parameter and metric, OUT holds the top `sensitivity.keep` candidates, exact
statistics, a log10 histogram and a pooled grid (see critical_weights.artifacts.shards).

Example:

    python stages/sensitivity.py --prepared data/prepared --out data/sensitivity

Data parallel over 2 processes (gloo on CPU, nccl on GPU), same result:

    torchrun --nproc_per_node 2 stages/sensitivity.py --prepared data/prepared --out data/sensitivity

With model.parallel: fsdp the model and its sums are sharded over the processes (docs/scale.md);
run by `dvc repro`, the stage starts torchrun itself with model.processes ranks.
"""

import sys
from pathlib import Path

import click

from critical_weights.artifacts.prepared_texts import read_prepared
from critical_weights.cli import INPUT_DIR, PATH, Params, Timings, stage_command
from critical_weights.sensitivity import distributed, sharded
from critical_weights.sensitivity.stage import run_sensitivity


@stage_command("sensitivity", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--out", type=PATH, required=True, help="Output folder for the shards.")
def main(params: Params, timings: Timings, prepared: Path, out: Path) -> None:
    if params.model.parallel == "fsdp":
        read_prepared(prepared)  # unreadable texts fail here in one line, before any rank starts
    if sharded.launch(params.model, sys.argv):
        raise SystemExit(0)  # the ranks it started did the work, and the first wrote the timings
    try:
        run_sensitivity(prepared, params, out, timings)
    finally:
        distributed.finish()


if __name__ == "__main__":
    main()
