"""Compress by the scores: prune every weight tensor of the blocks by each metric and measure it.

For every computed metric, and magnitude and random as controls, rebuilds each weight's score
from the saved sums (no forward or backward pass), prunes unstructured at each of
`compress.sparsities` per output row (Wanda's comparison) or per tensor, and N:M, and measures
the loss and perplexity on held-out texts with validate's own loss code. The model is restored
after every measurement.

Writes METRICS (compression.json, DVC metrics), REPORT (compression_report.json), the table
behind the DVC plot, the figure, and into EXPORTS masks.safetensors (rank.metric, unstructured
per row at `compress.mask_sparsity`, packed bits keyed by the model's own parameter names) and
imatrix.gguf (llama.cpp's importance matrix, from wanda's sums of x², GGUF names).

Example:

    python stages/compress.py --prepared data/prepared --sensitivity data/sensitivity \\
        --source data/texts/corpus.jsonl --metrics reports/compression.json \\
        --report reports/compression_report.json --table reports/plots/pruning.csv \\
        --plot reports/plots/pruning.png --exports reports/exports
"""

from pathlib import Path

import click

from critical_weights.cli import INPUT_DIR, OUTPUT_FILE, PATH, Params, Timings, stage_command
from critical_weights.compression.stage import Outputs, run_compress


@stage_command("compress", __doc__)
@click.option("--prepared", type=INPUT_DIR, required=True, help="Output of prepare.")
@click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity (with its saved sums).")
@click.option("--source", type=PATH, required=True, help="texts.source, for held-out texts.")
@click.option("--metrics", type=OUTPUT_FILE, required=True, help="Headline JSON (DVC metrics).")
@click.option("--report", type=OUTPUT_FILE, required=True, help="Full JSON report.")
@click.option("--table", type=OUTPUT_FILE, required=True, help="Long CSV behind the DVC plot.")
@click.option("--plot", type=OUTPUT_FILE, required=True, help="Perplexity-against-sparsity PNG.")
@click.option("--exports", type=OUTPUT_FILE, required=True,
              help="Folder for masks.safetensors and imatrix.gguf (each when its param asks for it).")
def main(params: Params, timings: Timings, prepared: Path, sensitivity: Path, source: Path, metrics: Path,
         report: Path, table: Path, plot: Path, exports: Path) -> None:
    run_compress(prepared, sensitivity, source, params, Outputs(metrics, report, table, plot, exports), timings)


if __name__ == "__main__":
    main()
