"""Rank the critical weights: exact top-`rank.k` per tensor, block, component, or globally.

Reads the sensitivity shards (no torch) and writes OUT/critical.parquet and OUT/meta.json.

Example:

    python stages/rank.py --sensitivity data/sensitivity --out data/ranked
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, PATH, Params, Timings, stage_command
from critical_weights.ranking.stage import run_rank


@stage_command("rank", __doc__)
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity.")
@click.option("--out", type=PATH, required=True, help="Output folder.")
def main(params: Params, timings: Timings, sensitivity: Path, out: Path) -> None:
    with timings.phase("rank"):
        run_rank(sensitivity, params.rank, out)


if __name__ == "__main__":
    main()
