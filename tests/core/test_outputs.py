"""critical_weights.core.outputs: a target is always the whole old output or the whole new one, and
temporaries of dead processes are cleaned up. (A real SIGKILL mid-write is in test_faults.py.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from critical_weights.core import outputs
from critical_weights.core.outputs import atomic_path, glob_escape, remove_stale, write_json, write_text


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_file_and_a_folder_are_replaced_whole(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new"
    with atomic_path(tmp_path / "dir") as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    with atomic_path(tmp_path / "dir") as tmp:
        tmp.mkdir()
        (tmp / "y").write_text("2")
    assert siblings(tmp_path / "dir") == ["y"]  # nothing of the old folder is left
    assert siblings(tmp_path) == ["a.txt", "dir"]  # and no temporary


def test_a_failure_keeps_the_old_output_and_leaves_no_temporary(tmp_path):
    write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert siblings(tmp_path) == ["a.txt"]


def test_json_is_sorted_with_a_newline_and_nan_is_refused_before_writing(tmp_path):
    write_json(tmp_path / "m.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"a": math.nan})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1.5], "b": 1}
    assert siblings(tmp_path) == ["m.json"]


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "out[1]"  # glob characters in the name are taken literally
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    stale = tmp_path / f".out[1].{dead}.abcdefgh.tmp"
    live = tmp_path / f".out[1].{os.getppid()}.abcdefgh.tmp"  # the test runner's parent is alive
    other = tmp_path / f".other.{dead}.abcdefgh.tmp"
    for folder in (stale, live, other):
        folder.mkdir()
    assert remove_stale(target) == [stale]
    assert siblings(tmp_path) == sorted([live.name, other.name])


def test_glob_escape():
    assert glob_escape("a*b?c[d]") == "a[*]b[?]c[[]d]"
    assert list(Path("/").glob(glob_escape("*"))) == []


def test_float_text_reads_back_as_the_same_float32():
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(2000) * 10.0 ** rng.integers(-30, 30, 2000)).astype(np.float32)
    values = np.concatenate([values, np.array([1 / 3, np.finfo(np.float32).tiny, 3.4e38], np.float32)])
    for v in values:
        assert np.float32(float(outputs.csv_field(float(v)))) == v


@pytest.mark.parametrize("value, text", [
    (None, ""), (3, "3"), (float(np.float32(0.1)), "0.100000001"), (0.1, "0.1"), ("plain", "plain"), ("a,b", '"a,b"'),
    ('say "hi"', '"say ""hi"""'), (" lead", '" lead"'), ("two\nlines", '"two\nlines"'),
])
def test_csv_fields_are_quoted_only_when_needed(value, text):
    assert outputs.csv_field(value) == text


def test_csv_text_is_the_header_then_one_line_per_row():
    assert outputs.csv_text(("a", "b"), [[1, None], [0.5, "x,y"]]) == 'a,b\n1,\n0.5,"x,y"\n'
