"""Choose `texts.n_texts` texts with `seed`, tokenise them, truncate at `texts.max_length`.

Writes OUT/texts.parquet (one row per sequence, an `input_ids` list column) and the
tokenizer used, OUT/tokenizer/.

Example:

    python stages/prepare.py --source data/texts/corpus.jsonl --out data/prepared
"""

from pathlib import Path

import click

from critical_weights.errors import reported
from critical_weights.params import load_params
from critical_weights.prepare import run_prepare
from critical_weights.progress import Timings, setup_logging


@click.command(help=__doc__)
@click.option("--params", "params_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default="params.yaml", show_default=True)
@click.option("--source", type=click.Path(path_type=Path), required=True, help="Texts: .jsonl, .txt, .parquet or a folder of .txt.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--timings", "timings_file", type=click.Path(path_type=Path), help="Untracked JSON file for per-phase seconds.")
def main(params_file: Path, source: Path, out: Path, timings_file: Path | None) -> None:
    setup_logging()
    timings = Timings("prepare")
    with reported():
        params = load_params(params_file)
        run_prepare(source, params, out, timings)
    timings.write(timings_file)


if __name__ == "__main__":
    main()
