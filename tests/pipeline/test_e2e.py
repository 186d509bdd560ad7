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

from _project import run_in, set_params

ALL = {"prepare", "sensitivity", "rank", "export", "plot", "validate", "superweights", "compress", "quantize", "domain_sensitivity",
       "domains"}


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_dvc_repro_end_to_end(repo: Path) -> None:
    first = run_in(["dvc", "repro"], repo)
    assert _ran(first.stdout) == ALL
    with open(repo / "reports" / "critical_weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_tensors = len({r["parameter"] for r in rows})
    assert len(rows) == 5 * n_tensors
    for name in ("sensitivity_distribution.png", "layer_comparison.png", "sensitivity_heatmap.png"):
        assert (repo / "reports" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lock = (repo / "dvc.lock").read_bytes()

    again = run_in(["dvc", "repro"], repo)
    assert _ran(again.stdout) == set()

    forced = run_in(["dvc", "repro", "-f"], repo)
    assert _ran(forced.stdout) == ALL
    assert (repo / "dvc.lock").read_bytes() == lock, "dvc repro -f changed dvc.lock"

    run_in(["git", "add", "-A"], repo)
    run_in(["git", "commit", "-qm", "first run"], repo)
    set_params(repo, rank__k=3)
    diff = run_in(["dvc", "params", "diff"], repo)
    assert "rank.k" in diff.stdout and "5" in diff.stdout and "3" in diff.stdout
    third = run_in(["dvc", "repro"], repo)
    assert _ran(third.stdout) == {"rank", "export", "plot", "validate"}  # validate checks the exported set
    with open(repo / "reports" / "critical_weights.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3 * n_tensors

    set_params(repo, rank__metric="wanda")  # validate, superweights, compress's masks and domains' sets use rank.metric
    assert _ran(run_in(["dvc", "repro"], repo).stdout) == {"rank", "export", "plot", "validate", "superweights", "compress",
                                                          "domains"}
    for mode in ("per_block", "global"):  # per_component's output: tests/pipeline/test_stages.py
        set_params(repo, rank__mode=mode)
        run = run_in(["dvc", "repro"], repo)
        assert _ran(run.stdout) == {"rank", "export", "plot", "validate"}, mode
        with open(repo / "reports" / "critical_weights.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert {r["metric"] for r in rows} == {"wanda"}
        if mode == "global":
            assert len(rows) == 3

    set_params(repo, quantize__bits=[2], quantize__keep=[0.05])
    assert _ran(run_in(["dvc", "repro"], repo).stdout) == {"quantize"}  # from the saved sums: no forward+backward

    run_in(["git", "checkout", "params.yaml", "dvc.lock"], repo)
    exp = run_in(["dvc", "exp", "run", "-S", "seed=7"], repo)
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
    set_params(repo, sensitivity__metrics=["grad_x_weight", "magnitude"], validate__single_weights=2,
                validate__random_draws=2)
    run_in(["dvc", "repro"], repo)
    run_in(["git", "add", "-A"], repo)
    run_in(["git", "commit", "-qm", "run"], repo)
    return repo


def test_failed_stage_outputs_come_back_with_dvc_checkout(small_repo: Path) -> None:
    repo = small_repo
    before = _tree(repo / "data" / "ranked")
    set_params(repo, rank__k="many")
    failed = _fails(["dvc", "repro"], repo)
    assert "Error: invalid params.yaml: rank.k: 'many' is not an integer" in failed.stderr
    assert "ERROR: failed to reproduce 'rank': failed to run: python stages/rank.py" in failed.stderr
    assert not (repo / "data" / "ranked").exists(), "DVC deletes a stage's outputs before it runs it"
    run_in(["dvc", "checkout", "data/ranked"], repo)
    assert _tree(repo / "data" / "ranked") == before
    run_in(["git", "checkout", "params.yaml"], repo)
    assert "Data and pipelines are up to date" in run_in(["dvc", "status"], repo).stdout

    set_params(repo, texts__source="data/texts/missing.jsonl")
    missing = _fails(["dvc", "repro"], repo)
    assert f"ERROR: failed to reproduce 'prepare': [Errno 2] No such file or directory: '{repo / 'data/texts/missing.jsonl'}'" \
        in missing.stderr
    run_in(["git", "checkout", "params.yaml"], repo)


def test_a_local_folder_remote_round_trip_from_a_fresh_clone(small_repo: Path, tmp_path: Path) -> None:
    repo, store = small_repo, tmp_path / "store"
    run_in(["dvc", "remote", "add", "-d", "shared", str(store)], repo)
    run_in(["git", "commit", "-qam", "DVC remote"], repo)
    run_in(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    run_in(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "reports" / "critical_weights.csv").exists()
    run_in(["dvc", "pull"], clone)
    for out in ("data/prepared", "data/sensitivity", "data/ranked", "reports"):
        assert _tree(clone / out) == _tree(repo / out), out
    assert "Data and pipelines are up to date" in run_in(["dvc", "status"], clone).stdout
    run_in(["dvc", "get", str(repo), "reports/critical_weights.csv", "--rev", "HEAD", "-o", str(tmp_path / "got.csv")], tmp_path)
    assert (tmp_path / "got.csv").read_bytes() == (repo / "reports" / "critical_weights.csv").read_bytes()
