"""The README's compare recipe, run exactly as written on the tiny model, with no DVC remote:
two full experiments, `dvc exp show --only-changed`, `dvc exp diff`, `dvc plots diff`, then
`dvc get . --rev` and `critical-weights-compare`. Each experiment's outputs are its own
(nothing stale from the run before it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from critical_weights.reports import offline_plots
from _project import run_in, set_params

pytestmark = pytest.mark.slow


def test_the_readme_compare_recipe_works_without_a_remote(repo: Path) -> None:
    set_params(repo, sensitivity__metrics=["grad_x_weight", "magnitude"], validate__single_weights=2,
                validate__random_draws=2)
    run_in(["git", "commit", "-qam", "two metrics"], repo)
    run_in(["dvc", "exp", "run", "-n", "s1", "-S", "seed=1"], repo)
    run_in(["dvc", "exp", "run", "-n", "s2", "-S", "seed=2"], repo)
    shown = run_in(["dvc", "exp", "show", "--only-changed", "--no-pager", "--md"], repo).stdout
    header = shown.splitlines()[0]
    assert "seed" in header and "loss" in header and "rank.k" not in header, header
    diff = run_in(["dvc", "exp", "diff", "s1", "s2", "--md"], repo).stdout
    assert "seed" in diff and "loss_heldout" in diff
    (repo / ".dvc" / "tmp" / "offline_plots.html").write_text(offline_plots.template(offline_plots.bundle()))  # as setup.sh does
    run_in(["dvc", "plots", "diff", "s1", "s2", "-o", "plots_page"], repo)
    assert (repo / "plots_page" / "index.html").is_file()
    for name in ("s1", "s2"):
        run_in(["dvc", "get", ".", "reports/critical_weights.csv", "--rev", name, "-o", f"{name}.csv"], repo)
        run_in(["dvc", "get", ".", "reports/validation_report.json", "--rev", name, "-o", f"{name}_validation.json"], repo)
        report = json.loads((repo / f"{name}_validation.json").read_text())
        assert report["settings"]["seed"] == int(name[1]), "the experiment's validation is its own"
        manifest = f"{name}_manifest.json"
        run_in(["dvc", "get", ".", "reports/manifest.json", "--rev", name, "-o", manifest], repo)
        assert json.loads((repo / manifest).read_text())["params"]["seed"] == int(name[1])
    printed = run_in(["critical-weights-compare", "s1.csv", "s2.csv", "--out", "compare.json"], repo).stdout
    assert printed.splitlines()[-1].startswith("overall")
    assert 0.0 <= json.loads((repo / "compare.json").read_text())["jaccard"] <= 1.0
