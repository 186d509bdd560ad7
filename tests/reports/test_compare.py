"""`critical-weights-compare`: Jaccard and Spearman of two runs' critical weights, a table and
JSON; one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from _tiny import ROOT
from critical_weights.reports.compare import main

HEADER = ["rank", "parameter", "block", "component", "row", "col", "flat_index", "score", "weight",
          "gradient", "metric", "token"]


def write_csv(path: Path, rows: list[tuple[str, int, float]], metric: str = "grad_x_weight") -> Path:
    """A critical_weights.csv with the export's columns; rows are (parameter, flat_index, score)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for rank, (parameter, flat, score) in enumerate(rows, start=1):
            block = parameter.split(".")[2] if parameter.startswith("model.layers.") else ""
            writer.writerow([rank, parameter, block, parameter.split(".")[-2], flat // 16, flat % 16, flat, score,
                             0.5, -0.1, metric, ""])
    return path


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.output.rstrip("\n").splitlines() == [f"Error: {message}"]


Q = "model.layers.0.self_attn.q_proj.weight"
D = "model.layers.10.mlp.down_proj.weight"
D2 = "model.layers.2.mlp.down_proj.weight"
RUN_A = [(Q, 0, 0.9), (Q, 1, 0.8), (D, 5, 0.7), (D2, 3, 0.6), (D2, 4, 0.5), (D2, 9, 0.4)]


def test_a_run_against_itself_agrees_perfectly(tmp_path):
    a = write_csv(tmp_path / "a.csv", RUN_A)
    out = tmp_path / "compare.json"
    result = invoke(a, a, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["jaccard"] == 1.0 and report["spearman"] == 1.0
    assert report["n_a"] == report["n_b"] == report["n_shared"] == 6
    assert {n: r["jaccard"] for n, r in report["per_tensor"].items()} == {Q: 1.0, D: 1.0, D2: 1.0}
    lines = result.output.splitlines()
    assert lines[0].split() == ["tensor", "n_a", "n_b", "shared", "jaccard", "spearman"]
    assert [line.split()[0] for line in lines[1:]] == [Q, D2, D, "overall"]  # block order, then overall
    assert lines[-1].split() == ["overall", "6", "6", "6", "1.000", "1.000"]


def test_two_runs_that_differ(tmp_path):
    a = write_csv(tmp_path / "a.csv", RUN_A)
    # Q's two weights swap order; D loses weight 5 for 6; D2 is the same
    b = write_csv(tmp_path / "b.csv", [(Q, 1, 0.95), (Q, 0, 0.85), (D, 6, 0.7), (D2, 3, 0.6), (D2, 4, 0.5), (D2, 9, 0.4)])
    out = tmp_path / "compare.json"
    result = invoke(a, b, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["jaccard"] == pytest.approx(5 / 7)
    assert report["n_shared"] == 5
    assert report["per_tensor"][Q] == {"jaccard": 1.0, "spearman": pytest.approx(-1.0), "n_a": 2, "n_b": 2, "n_shared": 2}
    assert report["per_tensor"][D] == {"jaccard": 0.0, "spearman": None, "n_a": 1, "n_b": 1, "n_shared": 0}
    assert report["per_tensor"][D2]["spearman"] == pytest.approx(1.0)
    assert report["a"] == str(a) and report["b"] == str(b)
    d_line = next(line for line in result.output.splitlines() if line.startswith(D + " "))
    assert d_line.split() == [D, "1", "1", "0", "0.000", "-"]


def test_different_metrics_get_a_note(tmp_path):
    a = write_csv(tmp_path / "a.csv", RUN_A)
    b = write_csv(tmp_path / "b.csv", RUN_A, metric="magnitude")
    result = invoke(a, b)
    assert result.exit_code == 0
    assert result.output.splitlines()[-1] == "note: the runs rank different metrics: grad_x_weight vs magnitude"


def test_a_missing_file_is_one_error_line(tmp_path):
    a = write_csv(tmp_path / "a.csv", RUN_A)
    assert_error(invoke(a, tmp_path / "nope.csv"), f"{tmp_path / 'nope.csv'}: no such file")


def test_a_csv_without_the_columns_is_one_error_line(tmp_path):
    a = write_csv(tmp_path / "a.csv", RUN_A)
    bad = tmp_path / "bad.csv"
    bad.write_text("parameter,rank\nmodel.x.weight,1\n", encoding="utf-8")
    assert_error(invoke(bad, a, "--out", tmp_path / "c.json"),
                 f"{bad}: not a critical_weights.csv; it lacks the column(s) flat_index, score")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("body, message", [
    ("", "not a critical_weights.csv; it lacks the column(s) parameter, flat_index, score"),
    ("parameter,flat_index,score\n", "holds no critical weight"),
    ("parameter,flat_index,score\nq,1,0.5\nq,two,0.4\n", "line 3 has no integer flat_index or numeric score"),
])
def test_malformed_csvs(tmp_path, body, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(body, encoding="utf-8")
    assert_error(invoke(bad, bad), f"{bad}: {message}")


def test_registered_as_a_console_script():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["critical-weights-compare"] == "critical_weights.reports.compare:main"
