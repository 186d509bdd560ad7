"""Super weights and massive activations, side by side with the gradient ranking.

One forward pass on `superweights.prompt` (or the prepared texts) records the largest |input|
and |output| of every block's MLP output projection; where both exceed
`superweights.threshold`, the weight joining them is a super-weight candidate, which is zeroed
before searching again. Reports the largest hidden states per layer (massive activations),
each candidate's rank under every metric in the shards, whether the global top-k by
rank.metric lies on a spike channel, and the loss after zeroing each candidate, the global
top-1..N, N random weights, and each candidate with its massive activation restored.

Writes REPORT (superweights_report.json, everything measured), METRICS (superweights.json,
a few flat headline numbers for DVC), PLOT (superweights.png) and TABLE (superweights.csv,
per block, behind the DVC plot).

Example:

    python stages/superweights.py --prepared data/prepared --sensitivity data/sensitivity \\
        --report reports/superweights_report.json --metrics reports/superweights.json --plot reports/plots/superweights.png \\
        --table reports/plots/superweights.csv
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, OUTPUT_FILE, Params, Timings, stage_command
from critical_weights.superweights.stage import run_superweights


@stage_command("superweights", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity.")
@click.option("--report", type=OUTPUT_FILE, required=True, help="JSON report: everything measured.")
@click.option("--metrics", type=OUTPUT_FILE, help="Short JSON headline (DVC metrics).")
@click.option("--plot", type=OUTPUT_FILE, required=True, help="PNG: spikes per block, massive activations per layer.")
@click.option("--table", type=OUTPUT_FILE, required=True, help="Per-block CSV behind the DVC plot.")
def main(params: Params, timings: Timings, prepared: Path, sensitivity: Path, report: Path, metrics: Path | None,
         plot: Path, table: Path) -> None:
    run_superweights(prepared, sensitivity, params, report, plot, table, timings, metrics)


if __name__ == "__main__":
    main()
