"""Progress bars, logging set-up and per-phase timings.

Timings go to the log and to an untracked JSON file, never to a DVC output, so tracked
outputs stay byte-identical between runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import click

T = TypeVar("T")
log = logging.getLogger("critical_weights")


def setup_logging() -> None:
    """INFO to stderr, one line per message, quiet third-party libraries."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def progress(items: Iterable[T], label: str, length: int | None = None) -> Iterator[T]:
    """A progress bar on stderr (drawn only on a terminal), then one summary line in the log."""
    start = time.perf_counter()
    with click.progressbar(items, label=label, length=length, file=sys.stderr) as bar:
        yield from bar
    log.info("%s done in %.2f s", label, time.perf_counter() - start)


class Timings:
    """Wall-clock seconds per named phase of a stage."""

    def __init__(self, stage: str):
        self.stage = stage
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            log.info("%s: %s took %.2f s", self.stage, name, self.seconds[name])

    def write(self, path: Path | None) -> None:
        """Log the totals and, when given a path, write them there (an untracked file)."""
        total = time.perf_counter() - self._start
        log.info("%s: total %.2f s", self.stage, total)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"stage": self.stage, "total_s": round(total, 4), "phases_s": {k: round(v, 4) for k, v in self.seconds.items()}}
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
