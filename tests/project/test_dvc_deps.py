"""dvc.yaml's `deps:` list exactly the library modules each stage imports.

Each stage's import closure is read with `ast`, without importing anything: start from the
script its `cmd` runs, follow every `critical_weights.*` import (at module level or inside a
function) transitively, and count each package `__init__.py` on the way, since Python runs
it first. The closure must equal the `src/` entries of the stage's `deps:`, so a change to
any module a stage runs reruns that stage, and a change to a module it does not run (a plot,
say) leaves it alone. See "Why dvc.yaml lists modules one by one" in docs/layout.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "critical_weights"


def _module_file(dotted: str) -> Path | None:
    """The file that defines module `dotted` (a package's __init__.py), or None if none does."""
    base = SRC.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _package_inits(dotted: str) -> list[str]:
    """`a.b.c` -> ["a", "a.b", "a.b.c"]: every package Python initialises to import `a.b.c`."""
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _this_module(path: Path) -> tuple[str, bool]:
    """The dotted name of a library file and whether it is a package's __init__.py."""
    rel = path.relative_to(SRC).with_suffix("")
    if rel.name == "__init__":
        return ".".join(rel.parent.parts), True
    return ".".join(rel.parts), False


def _imported_modules(path: Path) -> set[str]:
    """Every `critical_weights.*` module that `path` imports, as dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import, only meaningful inside the library
                here, is_init = _this_module(path)
                parts = here.split(".")
                drop = node.level - 1 if is_init else node.level
                parts = parts[: len(parts) - drop]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            # `from pkg import name`: name may be a submodule rather than an attribute
            found.update(f"{base}.{alias.name}" for alias in node.names if _module_file(f"{base}.{alias.name}"))
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def import_closure(script: Path) -> set[str]:
    """Paths (relative to the repository root) of every library file `script` runs on import."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for dotted in _imported_modules(path):
            for name in _package_inits(dotted):
                file = _module_file(name)
                assert file is not None or name != dotted, f"{path.relative_to(ROOT)} imports {dotted}, which does not exist"
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return {str(p.relative_to(ROOT)) for p in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_script(name: str, stage: dict) -> str:
    found = re.findall(r"python\s+(\S+\.py)", stage["cmd"])
    assert len(found) == 1, f"stage {name}: its cmd should run exactly one python script, got {stage['cmd']!r}"
    return found[0]


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_are_its_import_closure(name: str) -> None:
    stage = stages()[name]
    script = stage_script(name, stage)
    deps = [str(d) for d in stage.get("deps", [])]
    assert script in deps, f"stage {name}: deps must list its script {script}"
    folders = [d for d in deps if d.startswith("src/") and (ROOT / d).is_dir()]
    assert not folders, f"stage {name}: list library modules one by one, not the folder(s) {folders}"
    listed = {d for d in deps if d.startswith("src/")}
    needed = import_closure(ROOT / script)
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    problems = [f"missing {m} (imported through {script})" for m in missing]
    problems += [f"extra {e} ({script} never imports it)" for e in extra]
    assert not problems, f"dvc.yaml stage {name}: " + "; ".join(problems)


def test_closure_follows_lazy_and_package_imports(tmp_path: Path) -> None:
    """The reader itself: a function-level import, `from package import submodule`, and every
    package's __init__.py on the way (the top one imports core.kernels) all count."""
    script = tmp_path / "stage.py"
    script.write_text(
        "def main():\n    from critical_weights.core import errors\n    import critical_weights.config.strict_yaml\n",
        encoding="utf-8",
    )
    closure = import_closure(script)
    assert closure == {
        "src/critical_weights/__init__.py",
        "src/critical_weights/core/__init__.py",
        "src/critical_weights/core/kernels.py",
        "src/critical_weights/core/errors.py",
        "src/critical_weights/config/__init__.py",
        "src/critical_weights/config/strict_yaml.py",
        "src/critical_weights/config/rules.py",  # which strict_yaml imports
    }
    # and an attribute of the package (not a module) adds only the package itself
    script.write_text("from critical_weights import __version__\n", encoding="utf-8")
    assert import_closure(script) == {"src/critical_weights/__init__.py", "src/critical_weights/core/__init__.py",
                                      "src/critical_weights/core/kernels.py"}
