"""Progress off a terminal: a heartbeat line with done/total and an ETA, even in the middle of
a long item, and nothing left running afterwards."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time

import pytest

from critical_weights.core import progress as progress_mod
from critical_weights.core.progress import _duration, _Heartbeat, progress


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress_mod.sys.stderr, "isatty", lambda: False, raising=False)


def _wait_for_lines(caplog, n: int, timeout: float = 30.0) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
        if len(lines) >= n:
            return lines
        time.sleep(0.01)
    pytest.fail(f"fewer than {n} progress lines: {caplog.text}")


def test_heartbeat_lines_during_a_long_item(not_a_terminal, caplog):
    """The first item blocks until a heartbeat line has come: lines do not wait for items."""
    items = list(range(4))
    with caplog.at_level(logging.INFO, logger="critical_weights"):
        it = progress(items, "forward+backward", work=[4, 3, 2, 1], every_s=0.01)
        assert next(it) == 0
        first = _wait_for_lines(caplog, 1)[0]
        assert first.startswith("forward+backward: 0/4, ") and "ETA unknown until the first item ends" in first
        assert next(it) == 1  # item 0 is done: 4 of 10 units of work
        caplog.clear()
        line = _wait_for_lines(caplog, 1)[0]
        assert line.startswith("forward+backward: 1/4, ") and "elapsed, ETA " in line
        assert list(it) == [2, 3]
    assert "forward+backward done in" in caplog.text
    assert not [t for t in threading.enumerate() if t.name.startswith("progress forward")]


def test_heartbeat_stops_when_the_loop_breaks(not_a_terminal):
    it = progress(range(10), "scoring parameters", every_s=0.01)
    for i in it:
        if i == 2:
            break
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("progress scoring")]


def test_eta_weighs_items_by_their_work():
    beat = _Heartbeat("x", 4, [6, 2, 1, 1], every_s=3600)
    try:
        assert beat._eta(1, 60.0) == "40 s"  # 6 of 10 units took 60 s: 4 units left
        beat_even = _Heartbeat("y", 4, None, every_s=3600)
        assert beat_even._eta(1, 60.0) == "3 min 00 s"
        beat_even.stop()
        unknown = _Heartbeat("z", None, None, every_s=3600)
        assert unknown.line().startswith("z: 0 done, ") and "total not known" in unknown.line()
        unknown.stop()
    finally:
        beat.stop()


@pytest.mark.parametrize("seconds, text", [(4.4, "4 s"), (59.6, "1 min 00 s"), (245, "4 min 05 s"), (7380, "2 h 03 min")])
def test_duration_reads_like_a_clock(seconds, text):
    assert _duration(seconds) == text


_PEAK_CHILD = """
import sys
from pathlib import Path
from critical_weights.core.progress import Timings
timings = Timings("stage")
with timings.phase("small"):
    pass
with timings.phase("big"):
    block = bytearray(256 << 20)  # 256 MiB, every page touched
    block[::4096] = b"x" * len(block[::4096])
timings.write(Path(sys.argv[1]))
"""


def test_timings_record_the_peak_memory_where_it_was_reached(tmp_path):
    # a process of its own: this one's peak is whatever an earlier test reached
    subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / "t.json")], check=True, timeout=120)
    record = json.loads((tmp_path / "t.json").read_text())
    after = record["peak_memory_mib_after"]
    assert list(after) == ["small", "big"]
    assert after["big"] >= after["small"] + 250  # the process's peak rose by the block in the second phase
    assert record["peak_memory_mib"] >= after["big"]


def test_counted_logs_the_plan_a_heartbeat_with_an_eta_and_the_total(caplog):
    with caplog.at_level(logging.INFO, logger="critical_weights"):
        with progress_mod.counted("validate: loss evaluations", 3, every_s=0.05) as step:
            step()
            time.sleep(0.2)  # a long unit: the heartbeat speaks in the middle of it
            step()
            step()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "validate: loss evaluations: 3 planned"
    beats = [m for m in lines if m.startswith("validate: loss evaluations: 1/3, ")]
    assert beats and all("elapsed, ETA " in m and "unknown" not in m for m in beats)
    assert re.fullmatch(r"validate: loss evaluations: 3/3 done in \d+ s", lines[-1])
