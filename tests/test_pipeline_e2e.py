"""The real thing: `dvc repro` on a copy of this project, with a tiny model.

Checks that a second repro runs nothing, that `dvc repro -f` leaves dvc.lock unchanged, that
changing rank.k, rank.mode or rank.metric reruns rank, export and plot but not prepare or
sensitivity, that `dvc params diff` shows the change, and that `dvc exp run -S seed=7` works.
Then, under `dvc repro`: a failed stage's outputs are deleted by DVC and `dvc checkout` brings
them back; DVC's own message for a missing texts.source; and a local-folder DVC remote
round trip from a fresh clone.
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
    assert _ran(third.stdout) == {"rank", "export", "plot", "validate"}  # validate checks the exported set
    with open(repo / "reports" / "critical_weights.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3 * n_tensors

    _set_params(repo, rank__metric="wanda")  # validate and superweights use the top weights of rank.metric
    assert _ran(_run(["dvc", "repro"], repo).stdout) == {"rank", "export", "plot", "validate", "superweights"}
    for mode in ("per_block", "per_component", "global"):
        _set_params(repo, rank__mode=mode)
        run = _run(["dvc", "repro"], repo)
        assert _ran(run.stdout) == {"rank", "export", "plot", "validate"}, mode
        with open(repo / "reports" / "critical_weights.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["metric"] for r in rows} == {"wanda"}
        if mode == "global":
            assert len(rows) == 3

    _run(["git", "checkout", "params.yaml", "dvc.lock"], repo)
    exp = _run(["dvc", "exp", "run", "-S", "seed=7"], repo)
    assert _ran(exp.stdout) >= {"prepare", "sensitivity"}


def _fails(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, f"{' '.join(args)} should have failed:\n{result.stdout}\n{result.stderr}"
    return result


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def small_repo(repo: Path) -> Path:
    """The tiny project with two metrics, run once and committed."""
    _set_params(repo, sensitivity__metrics=["grad_x_weight", "magnitude"], validate__single_weights=2,
                validate__random_draws=2)
    _run(["dvc", "repro"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "run"], repo)
    return repo


def test_failed_stage_outputs_come_back_with_dvc_checkout(small_repo: Path) -> None:
    repo = small_repo
    before = _tree(repo / "data" / "ranked")
    _set_params(repo, rank__k="many")
    failed = _fails(["dvc", "repro"], repo)
    assert "Error: invalid params.yaml: rank.k: 'many' is not an integer" in failed.stderr
    assert "ERROR: failed to reproduce 'rank': failed to run: python stages/rank.py" in failed.stderr
    assert not (repo / "data" / "ranked").exists(), "DVC deletes a stage's outputs before it runs it"
    _run(["dvc", "checkout", "data/ranked"], repo)
    assert _tree(repo / "data" / "ranked") == before
    _run(["git", "checkout", "params.yaml"], repo)
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], repo).stdout

    _set_params(repo, texts__source="data/texts/missing.jsonl")
    missing = _fails(["dvc", "repro"], repo)
    assert f"ERROR: failed to reproduce 'prepare': [Errno 2] No such file or directory: '{repo / 'data/texts/missing.jsonl'}'" \
        in missing.stderr
    _run(["git", "checkout", "params.yaml"], repo)


def test_a_local_folder_remote_round_trip_from_a_fresh_clone(small_repo: Path, tmp_path: Path) -> None:
    repo, store = small_repo, tmp_path / "store"
    _run(["dvc", "remote", "add", "-d", "shared", str(store)], repo)
    _run(["git", "commit", "-qam", "DVC remote"], repo)
    _run(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "reports" / "critical_weights.csv").exists()
    _run(["dvc", "pull"], clone)
    for out in ("data/prepared", "data/sensitivity", "data/ranked", "reports"):
        assert _tree(clone / out) == _tree(repo / out), out
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], clone).stdout
    _run(["dvc", "get", str(repo), "reports/critical_weights.csv", "--rev", "HEAD", "-o", str(tmp_path / "got.csv")], tmp_path)
    assert (tmp_path / "got.csv").read_bytes() == (repo / "reports" / "critical_weights.csv").read_bytes()
