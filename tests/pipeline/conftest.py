"""Fixtures of the pipeline tests: a git repo holding a copy of the project on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from _project import run_in, set_params
from _tiny import copy_project

METRICS = ("grad_x_weight", "gradient", "magnitude", "fisher", "taylor2", "hutchinson", "wanda")


@pytest.fixture
def repo(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A git repo holding a copy of the project, set to the tiny model and a few texts."""
    repo = copy_project(tmp_path / "project")
    set_params(repo, model__name=str(tiny_model_dir), texts__n_texts=12, texts__max_length=24,
                sensitivity__keep=20, sensitivity__metrics=list(METRICS), sensitivity__hutchinson_probes=2,
                rank__k=5, validate__k_values=[1, 5], superweights__top_k=5, superweights__n_texts=4,
                domains__top_n=10, domains__per_tensor_k=5)
    run_in(["git", "init", "-q"], repo)
    run_in(["git", "add", "-A"], repo)
    run_in(["git", "commit", "-qm", "tiny project"], repo)
    return repo
