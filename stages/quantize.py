"""Quantise by round-to-nearest, and keep each metric's critical weights at their original values.

Quantises the same tensors compress prunes (every weight tensor of the blocks, or
`compress.include`) at each of `quantize.bits`, in groups of `quantize.group_size` inputs, and
measures the loss and perplexity on compress's held-out texts with validate's own loss code.
Then, per set (every computed metric, magnitude and random), keeps its global top share of the
weights (each of `quantize.keep`) at their original values, and, as AWQ does, the top
`quantize.channels` of each tensor's input channels; each is measured, with the share of RTN's
damage it recovers. Scores are rebuilt from the saved sums: no forward or backward pass.

Writes METRICS (quantization.json, DVC metrics), REPORT (quantization_report.json), the table
behind the DVC plot and the figure.

Example:

    python stages/quantize.py --prepared data/prepared --sensitivity data/sensitivity \\
        --source data/texts/corpus.jsonl --metrics reports/quantization.json \\
        --report reports/quantization_report.json --table reports/plots/quantization.csv \\
        --plot reports/plots/quantization.png
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, OUTPUT_FILE, PATH, Params, Timings, stage_command
from critical_weights.compression.quantization import Outputs, run_quantize


@stage_command("quantize", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity (with its saved sums).")
@click.option("--source", type=PATH, required=True, help="texts.source, for held-out texts.")
@click.option("--metrics", type=OUTPUT_FILE, required=True, help="Headline JSON (DVC metrics).")
@click.option("--report", type=OUTPUT_FILE, required=True, help="Full JSON report.")
@click.option("--table", type=OUTPUT_FILE, required=True, help="Long CSV behind the DVC plot.")
@click.option("--plot", type=OUTPUT_FILE, required=True, help="Perplexity-against-share-kept PNG.")
def main(params: Params, timings: Timings, prepared: Path, sensitivity: Path, source: Path, metrics: Path,
         report: Path, table: Path, plot: Path) -> None:
    run_quantize(prepared, sensitivity, source, params, Outputs(metrics, report, table, plot), timings)


if __name__ == "__main__":
    main()
