"""Progress bars, logging set-up and per-phase timings.

Timings go to the log and to an untracked JSON file, never to a DVC output, so tracked
outputs stay byte-identical between runs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from pathlib import Path
from typing import TypeVar

import click

T = TypeVar("T")
log = logging.getLogger("critical_weights")


def first_rank() -> bool:
    """Whether this process speaks for the run: always, but under torchrun, the first rank only."""
    return os.environ.get("RANK", "0") == "0"


def setup_logging() -> None:
    """INFO to stderr, one line per message, quiet third-party libraries; under torchrun, the
    ranks after the first say only warnings and errors, so the log reads as one process's."""
    level = logging.INFO if first_rank() else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


HEARTBEAT_S = 25.0  # off a terminal, a progress line at least this often (the promise is 30 s)


def progress(items: Iterable[T], label: str, length: int | None = None,
             work: Sequence[float] | None = None, every_s: float = HEARTBEAT_S) -> Iterator[T]:
    """Iterate `items` with progress on stderr, then one summary line in the log.

    On a terminal: a progress bar. Elsewhere (`dvc repro > log`, CI, a queue): a log line
    every `every_s` seconds, even in the middle of a long item, with done/total and an ETA.
    `work` (one number per item, e.g. its tokens) weighs the items for the ETA; by default
    every item weighs the same. Under torchrun only the first rank reports."""
    start = time.perf_counter()
    if not first_rank():
        yield from items
        return
    if sys.stderr.isatty():
        with click.progressbar(items, label=label, length=length, file=sys.stderr) as bar:
            yield from bar
    else:
        total = length if length is not None else (len(items) if isinstance(items, Sized) else None)
        beat = _Heartbeat(label, total, work, every_s)
        try:
            for item in items:
                yield item
                beat.step()
        finally:
            beat.stop()
    log.info("%s done in %.2f s", label, time.perf_counter() - start)


@contextlib.contextmanager
def counted(label: str, total: int, every_s: float = HEARTBEAT_S) -> Iterator[Callable[[], None]]:
    """Count `total` planned units of work (forward evaluations, say) as the caller calls the
    yielded `step`: the plan is logged first, then `label: done/total, elapsed, ETA` at least
    every `every_s` seconds, even in the middle of a long unit, then how many took how long."""
    log.info("%s: %d planned", label, total)
    beat = _Heartbeat(label, total, None, every_s)
    try:
        yield beat.step
    finally:
        beat.stop()
        log.info("%s: %d/%d done in %s", label, beat.done, total, _duration(time.perf_counter() - beat.start))


class _Heartbeat:
    """A daemon thread that logs `label: done/total (share), elapsed, ETA` every `every_s` s."""

    def __init__(self, label: str, total: int | None, work: Sequence[float] | None, every_s: float):
        self.label, self.total, self.done = label, total, 0
        self.cumulative = list(itertools.accumulate(work)) if work is not None else None
        self.start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), name=f"progress {label}", daemon=True)
        self._thread.start()

    def step(self) -> None:
        self.done += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            log.info("%s", self.line())

    def line(self) -> str:
        done, total = self.done, self.total
        elapsed = time.perf_counter() - self.start
        counted = f"{done}/{total}" if total is not None else f"{done} done"
        return f"{self.label}: {counted}, {_duration(elapsed)} elapsed, ETA {self._eta(done, elapsed)}"

    def _eta(self, done: int, elapsed: float) -> str:
        if self.total is None:
            return "unknown (total not known)"
        if done == 0:
            return "unknown until the first item ends"
        if self.cumulative is not None and len(self.cumulative) == self.total and self.cumulative[done - 1] > 0:
            share = self.cumulative[done - 1] / self.cumulative[-1]
        else:
            share = done / self.total
        return _duration(elapsed * (1 - share) / share)


def _duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 03 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def peak_memory_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    On Linux, VmHWM of /proc/self/status: this program's own. (ru_maxrss would also count the
    parent's memory at the fork, DVC's or pytest's, since Linux carries it across exec.)
    Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class Timings:
    """Wall-clock and CPU seconds per named phase of a stage.

    CPU seconds (this process's user + system time) tell more than wall time on a machine
    shared with other work: they grow far less when other processes compete for the cores."""

    def __init__(self, stage: str):
        self.stage = stage
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}  # the process's peak resident memory at each phase's end
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu
            self.peak_mib[name] = peak_memory_mib()
            log.info("%s: %s took %.2f s (%.2f s of CPU); peak memory so far %.0f MiB", self.stage, name,
                     self.seconds[name], self.cpu_seconds[name], self.peak_mib[name])

    def write(self, path: Path | None) -> None:
        """Log the totals and, when given a path, write them there (an untracked file; under
        torchrun, the first rank's)."""
        total, cpu = time.perf_counter() - self._start, time.process_time() - self._cpu_start
        log.info("%s: total %.2f s (%.2f s of CPU)", self.stage, total, cpu)
        if path is None or not first_rank():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"stage": self.stage, "total_s": round(total, 4), "phases_s": {k: round(v, 4) for k, v in self.seconds.items()},
                  "total_cpu_s": round(cpu, 4), "phases_cpu_s": {k: round(v, 4) for k, v in self.cpu_seconds.items()},
                  "peak_memory_mib": round(peak_memory_mib(), 1),
                  "peak_memory_mib_after": {k: round(v, 1) for k, v in self.peak_mib.items()}}
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
