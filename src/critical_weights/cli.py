"""The command-line plumbing every stage script shares.

A stage script is one function decorated with `stage_command`: it declares its own path
options and receives the validated params and a `Timings` for the stage. The decorator adds
`--params` and `--timings`, sets up logging, loads and validates params.yaml before any work,
turns the library's errors into one-line `Error: ...` messages with exit status 1 (see
`errors.reported`), and writes the timings to the log and the untracked file.

    @stage_command("rank", __doc__)
    @click.option("--sensitivity", type=INPUT_DIR, required=True, help="Output of sensitivity.")
    @click.option("--out", type=PATH, required=True, help="Output folder.")
    def main(params: Params, timings: Timings, sensitivity: Path, out: Path) -> None:
        with timings.phase("rank"):
            run_rank(sensitivity, params.rank, out)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from critical_weights.config.params import Params, load_params
from critical_weights.core.errors import reported
from critical_weights.core.progress import Timings, setup_logging

INPUT_DIR = click.Path(exists=True, file_okay=False, path_type=Path)  # a folder an earlier stage wrote
INPUT_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)  # a file an earlier stage wrote
PATH = click.Path(path_type=Path)  # an output, or an input the library checks itself
OUTPUT_FILE = click.Path(dir_okay=False, path_type=Path)  # a file this stage writes

StageBody = Callable[..., None]


def stage_command(name: str, doc: str | None) -> Callable[[StageBody], click.Command]:
    """Make `body(params, timings, **options)` the Click command of stage `name`; `doc` is its
    --help. Options the body declares come between --params (first) and --timings (last)."""

    def decorate(body: StageBody) -> click.Command:
        own = list(reversed(getattr(body, "__click_params__", [])))  # top-to-bottom, as written

        def run(params_file: Path, timings_file: Path | None, **options: Any) -> None:
            setup_logging()
            timings = Timings(name)
            with reported():
                params = load_params(params_file)
                body(params, timings, **options)
            timings.write(timings_file)

        params_option = click.Option(
            ["--params", "params_file"], type=INPUT_FILE, default="params.yaml", show_default=True,
            help="The params file; validated in full before any work.")
        timings_option = click.Option(
            ["--timings", "timings_file"], type=PATH, help="Untracked JSON file for per-phase seconds.")
        return click.Command(name, callback=run, help=doc, params=[params_option, *own, timings_option])

    return decorate


__all__ = ["INPUT_DIR", "INPUT_FILE", "OUTPUT_FILE", "PATH", "Params", "Timings", "stage_command"]
