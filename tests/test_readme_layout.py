"""The README's layout section is a true map: its module table names every module of
src/critical_weights/ once, and nothing that does not exist; every stage script is listed
under the stage it runs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Layout")
    end = text.find("\n## ", start + 1)
    return text[start:] if end == -1 else text[start:end]


def mapped_modules() -> list[str]:
    return re.findall(r"^\| `([a-z_0-9]+\.py)` \|", layout_section(), flags=re.MULTILINE)


def test_every_library_module_is_on_the_map_once():
    on_disk = {p.name for p in (ROOT / "src" / "critical_weights").glob("*.py")} - {"__init__.py"}
    mapped = mapped_modules()
    repeated = sorted({m for m in mapped if mapped.count(m) > 1})
    assert not repeated, f"README layout lists these modules more than once: {repeated}"
    missing, stale = sorted(on_disk - set(mapped)), sorted(set(mapped) - on_disk)
    assert not missing and not stale, (
        f"README layout section: add a row for {missing}; remove the row for {stale} (no such module)")


def test_every_stage_has_a_heading_in_the_map():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    headings = set(re.findall(r"^\| \*\*([a-z_]+)\*\* \| \|$", layout_section(), flags=re.MULTILINE))
    assert set(stages) <= headings, f"README layout section lacks a heading for stages {sorted(set(stages) - headings)}"
