"""Running the copied project as a user would: dvc and python from this venv, the copy's own
library first on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml


def run_in(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # the venv's python and dvc first; the copied project's own library, not the installed one
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def set_params(repo: Path, **changes: object) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
