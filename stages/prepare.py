"""Choose `texts.n_texts` texts with `seed`, tokenise them, truncate at `texts.max_length`.

Writes OUT/texts.parquet (one row per sequence, an `input_ids` list column) and the
tokenizer used, OUT/tokenizer/.

Example:

    python stages/prepare.py --source data/texts/corpus.jsonl --out data/prepared
"""

from pathlib import Path

import click

from critical_weights.cli import PATH, Params, Timings, stage_command
from critical_weights.texts.stage import run_prepare


@stage_command("prepare", __doc__)
@click.option("--source", type=PATH, required=True, help="Texts: .jsonl, .txt, .parquet or a folder of .txt.")
@click.option("--out", type=PATH, required=True, help="Output folder.")
def main(params: Params, timings: Timings, source: Path, out: Path) -> None:
    run_prepare(source, params, out, timings)


if __name__ == "__main__":
    main()
