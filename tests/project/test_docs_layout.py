"""docs/layout.md is a true map, and the tests mirror it: its module table names every module of
src/critical_weights/ once and nothing that does not exist, every stage has a heading, and every
library module has its own test file, tests/<package>/test_<module>.py."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "src" / "critical_weights"


def layout_page() -> str:
    return (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")


def mapped_modules() -> list[str]:
    return re.findall(r"^\| `([a-z_0-9/]+\.py)` \|", layout_page(), flags=re.MULTILINE)


def library_modules() -> set[str]:
    """Every module of the library, relative to it (`core/errors.py`), package faces excepted."""
    return {str(p.relative_to(LIBRARY)) for p in LIBRARY.rglob("*.py") if p.name != "__init__.py"}


def test_every_library_module_is_on_the_map_once():
    mapped = mapped_modules()
    repeated = sorted({m for m in mapped if mapped.count(m) > 1})
    assert not repeated, f"docs/layout.md lists these modules more than once: {repeated}"
    on_disk = library_modules()
    missing, stale = sorted(on_disk - set(mapped)), sorted(set(mapped) - on_disk)
    assert not missing and not stale, (
        f"docs/layout.md: add a row for {missing}; remove the row for {stale} (no such module)")


def test_every_stage_has_a_heading_in_the_map():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    headings = re.findall(r"^\| \*\*([a-z_]+)\*\*(?: \(stages? ([a-z_ ]+)\))? \| \|$", layout_page(), flags=re.MULTILINE)
    named = {word for package, also in headings for word in [package, *also.replace(" and ", " ").split()]}
    assert set(stages) <= named, f"docs/layout.md lacks a heading for stages {sorted(set(stages) - named)}"


def test_every_package_face_is_empty_with_a_docstring():
    for init in sorted(LIBRARY.glob("*/__init__.py")):
        text = init.read_text(encoding="utf-8")
        assert re.fullmatch(r'"""[^"]+"""\n', text), f"{init.relative_to(ROOT)}: a one-paragraph docstring and nothing else"


def test_every_library_module_has_its_own_test_file():
    tests = ROOT / "tests"
    want = {str(Path(m).parent / f"test_{Path(m).name}") for m in library_modules()}
    missing = sorted(w for w in want if not (tests / w).is_file())
    assert not missing, f"tests/ lacks a test file for these library modules: {missing}"
