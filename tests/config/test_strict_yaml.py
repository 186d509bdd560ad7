"""critical_weights.config.strict_yaml: strict YAML reading, each failure one line naming the file
(and, for bad YAML, the line and column)."""

from __future__ import annotations

from pathlib import Path

import pytest

from critical_weights.config.strict_yaml import read_yaml
from critical_weights.core.errors import ParamsError


def problem(path: Path) -> str:
    with pytest.raises(ParamsError) as info:
        read_yaml(path)
    (only,) = info.value.problems
    return only


def test_safe_values_read_back(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("\ufeffa: 1\nb: [x, 2.5, true, null]\nc: {d: e}\n", encoding="utf-8")
    assert read_yaml(path) == {"a": 1, "b": ["x", 2.5, True, None], "c": {"d": "e"}}
    path.write_text("# only a comment\n", encoding="utf-8")
    assert read_yaml(path) is None


def test_a_key_given_twice_is_refused_with_its_place(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("rank:\n  k: 1\n  k: 2\n", encoding="utf-8")
    assert problem(path) == f"{path}: is not valid YAML (key k appears twice in one mapping at line 3, column 3)"


def test_python_objects_are_not_constructed(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['true']\n", encoding="utf-8")
    assert problem(path).startswith(f"{path}: is not valid YAML (could not determine a constructor for the tag")


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"seed: 4\xff2\n")
    assert problem(path) == f"{path}: is not UTF-8 text (bad byte at offset 7)"


def test_a_folder_cannot_be_read(tmp_path):
    assert problem(tmp_path) == f"{tmp_path}: cannot be read (Is a directory)"


def test_n_of_m_stays_a_string_as_yaml_1_2_and_dvc_read_it_but_numbers_stay_numbers(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("s: [unstructured, 2:4, 4:8]\nt: 1:30\na: 12\nb: 0.5\nc: -3\nd: .inf\ne: 0x1f\nf: 1.5e+3\n",
                    encoding="utf-8")
    got = read_yaml(path)
    assert got["s"] == ["unstructured", "2:4", "4:8"] and got["t"] == "1:30"
    assert (got["a"], got["b"], got["c"], got["d"], got["e"], got["f"]) == (12, 0.5, -3, float("inf"), 31, 1500.0)
