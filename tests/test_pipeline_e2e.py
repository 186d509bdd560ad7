"""The real thing: `dvc repro` on a copy of this project, with a tiny model.

Checks that a second repro runs nothing, that `dvc repro -f` leaves dvc.lock unchanged, that
changing rank.k, rank.mode or rank.metric reruns rank, export and plot but not prepare or
sensitivity, that `dvc params diff` shows the change, and that `dvc exp run -S seed=7` works.
Every metric is computed, so each one runs through `dvc repro`.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_project

ALL = {"prepare", "sensitivity", "rank", "export", "plot", "validate", "superweights"}
METRICS = ("grad_x_weight", "gradient", "magnitude", "fisher", "taylor2", "hutchinson", "wanda")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # the venv's python and dvc first; the copied project's own library, not the installed one
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _set_params(repo: Path, **changes: object) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture
def repo(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A git repo holding a copy of the project, set to the tiny model and a few texts."""
    repo = copy_project(tmp_path / "project")
    _set_params(repo, model__name=str(tiny_model_dir), texts__n_texts=12, texts__max_length=24,
                sensitivity__keep=20, sensitivity__metrics=list(METRICS), sensitivity__hutchinson_probes=2,
                rank__k=5, validate__k_values=[1, 5], superweights__top_k=5, superweights__n_texts=4)
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny project"], repo)
    return repo


def test_dvc_repro_end_to_end(repo: Path) -> None:
    first = _run(["dvc", "repro"], repo)
    assert _ran(first.stdout) == ALL
    with open(repo / "reports" / "critical_weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_tensors = len({r["parameter"] for r in rows})
    assert len(rows) == 5 * n_tensors
    for name in ("sensitivity_distribution.png", "layer_comparison.png", "sensitivity_heatmap.png"):
        assert (repo / "reports" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lock = (repo / "dvc.lock").read_bytes()

    again = _run(["dvc", "repro"], repo)
    assert _ran(again.stdout) == set()

    forced = _run(["dvc", "repro", "-f"], repo)
    assert _ran(forced.stdout) == ALL
    assert (repo / "dvc.lock").read_bytes() == lock, "dvc repro -f changed dvc.lock"

    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "first run"], repo)
    _set_params(repo, rank__k=3)
    diff = _run(["dvc", "params", "diff"], repo)
    assert "rank.k" in diff.stdout and "5" in diff.stdout and "3" in diff.stdout
    third = _run(["dvc", "repro"], repo)
    assert _ran(third.stdout) == {"rank", "export", "plot"}
    with open(repo / "reports" / "critical_weights.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3 * n_tensors

    _set_params(repo, rank__metric="wanda")  # validate and superweights use the top weights of rank.metric
    assert _ran(_run(["dvc", "repro"], repo).stdout) == {"rank", "export", "plot", "validate", "superweights"}
    for mode in ("per_block", "per_component", "global"):
        _set_params(repo, rank__mode=mode)
        run = _run(["dvc", "repro"], repo)
        assert _ran(run.stdout) == {"rank", "export", "plot"}, mode
        with open(repo / "reports" / "critical_weights.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["metric"] for r in rows} == {"wanda"}
        if mode == "global":
            assert len(rows) == 3

    _run(["git", "checkout", "params.yaml", "dvc.lock"], repo)
    exp = _run(["dvc", "exp", "run", "-S", "seed=7"], repo)
    assert _ran(exp.stdout) >= {"prepare", "sensitivity"}
