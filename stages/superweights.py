"""Super weights and massive activations, side by side with the gradient ranking.

One forward pass on `superweights.prompt` (or the prepared texts) records the largest |input|
and |output| of every block's MLP output projection; where both exceed
`superweights.threshold`, the weight joining them is a super-weight candidate, which is zeroed
before searching again. Reports the largest hidden states per layer (massive activations),
each candidate's rank under every metric in the shards, whether the global top-k by
rank.metric lies on a spike channel, and the loss after zeroing each candidate, the global
top-1..N, N random weights, and each candidate with its massive activation restored.

Writes REPORT (superweights.json, DVC metrics), PLOT (superweights.png) and TABLE
(superweights.csv, per block, behind the DVC plot).

Example:

    python stages/superweights.py --prepared data/prepared --sensitivity data/sensitivity \\
        --report reports/superweights.json --plot reports/plots/superweights.png \\
        --table reports/plots/superweights.csv
"""

from pathlib import Path

import click

from critical_weights.errors import reported
from critical_weights.params import load_params
from critical_weights.progress import Timings, setup_logging
from critical_weights.superweights import run_superweights

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_OUT = click.Path(dir_okay=False, path_type=Path)


@click.command(help=__doc__)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default="params.yaml", show_default=True)
@click.option("--prepared", type=_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=_DIR, required=True, help="Output of sensitivity.")
@click.option("--report", type=_OUT, required=True, help="JSON report (DVC metrics).")
@click.option("--plot", type=_OUT, required=True, help="PNG: spikes per block, massive activations per layer.")
@click.option("--table", type=_OUT, required=True, help="Per-block CSV behind the DVC plot.")
@click.option("--timings", "timings_file", type=click.Path(path_type=Path), help="Untracked JSON file for per-phase seconds.")
def main(params_file: Path, prepared: Path, sensitivity: Path, report: Path, plot: Path, table: Path,
         timings_file: Path | None) -> None:
    setup_logging()
    timings = Timings("superweights")
    with reported():
        params = load_params(params_file)
        run_superweights(prepared, sensitivity, params, report, plot, table, timings)
    timings.write(timings_file)


if __name__ == "__main__":
    main()
