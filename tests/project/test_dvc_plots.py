"""`dvc plots show` works offline: the committed .dvc/config names an HTML template that
inlines Vega, Vega-Lite and Vega-Embed, the page loads no script from the network, and every
interactive plot's spec renders (with the same Vega-Lite, offline) with titled axes, log
scales where the data span decades, the histogram in bin order and one colour per set."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _tiny import copy_project
from critical_weights.config.params import PlotParams
from critical_weights.core.progress import Timings
from critical_weights.reports import offline_plots, plots
from critical_weights.reports.export import run_export
from critical_weights.validation.stage import Outputs, run_validate


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def repo(validate_run, tmp_path_factory) -> Path:
    """The project's dvc.yaml, templates and config, with the tiny model's real plot files."""
    prepared, sens, ranked, params = validate_run
    repo = copy_project(tmp_path_factory.mktemp("plots") / "project")
    reports = repo / "reports"
    run_export(sens, ranked, prepared, reports)
    plots.run_plot(sens, ranked, reports / "metric_overlap.json", reports / "plots", PlotParams(dpi=40))
    params = dataclasses.replace(params, validate=dataclasses.replace(
        params.validate, k_values=(1, 5), n_texts=2, single_weights=0, random_draws=2))
    run_validate(prepared, sens, ranked, Path(params.texts.source), params,
                 Outputs(reports / "validation.json", reports / "validation_report.json", reports / "plots" / "damage_curve.png",
                         reports / "plots" / "damage_curve.csv", reports / "plots" / "metric_predictiveness.png"),
                 Timings("validate"))
    (repo / ".dvc" / "tmp").mkdir()
    (repo / ".dvc" / "tmp" / "offline_plots.html").write_text(offline_plots.template(offline_plots.bundle()))
    run(["git", "init", "-q"], repo)
    return repo


def test_the_page_loads_nothing_from_the_network_and_holds_every_plot(repo):
    run(["dvc", "plots", "show", "-o", "page"], repo)
    page = (repo / "page" / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=", page), "a script is loaded from elsewhere"
    assert "cdn.jsdelivr.net" not in page
    assert "window.vegaEmbed=" in page
    for name in ("score_histogram.csv", "damage_curve.csv"):
        assert name.replace(".", "_") in page or name in page
    for png in ("sensitivity_distribution.png", "damage_curve.png", "metric_predictiveness.png", "metric_overlap.png"):
        assert png in page


def specs(repo: Path) -> dict[str, dict]:
    data = json.loads(run(["dvc", "plots", "show", "--json"], repo).stdout)["data"]
    # plots whose file this repo lacks (another stage's, e.g. superweights) come back empty
    return {name: entries[0]["content"] for name, entries in data.items() if entries and entries[0]["type"] == "vega"}


def rendered(spec: dict) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(spec, vl_version=offline_plots.VEGA_LITE)


def test_each_interactive_plot_renders_offline_with_titled_axes(repo):
    found = specs(repo)
    hist = found["reports/plots/score_histogram.csv"]
    assert hist["encoding"]["y"]["scale"]["type"] == "log"
    xs = [float(v["log10_score"]) for v in hist["data"]["values"]]
    assert xs == sorted(xs), "bins in order"
    svg = rendered(hist)
    assert "X-axis titled 'log10(score), bin centre'" in svg and "Y-axis titled 'number of weights (log scale)' for a log scale" in svg
    curve = found["reports/plots/damage_curve.csv"]
    assert curve["encoding"]["color"]["field"] == "set" and curve["encoding"]["x"]["scale"]["type"] == "log"
    sets = {v["set"] for v in curve["data"]["values"]}
    assert sets == {"zero critical", "zero random_k", "zero bottom_k"}
    svg = rendered(curve)
    assert "X-axis titled 'k, weights perturbed (log scale)' for a log scale" in svg
    for s in sets:
        assert f"set: {s}" in svg, f"{s} is not drawn"
    for name, spec in found.items():
        assert "<svg" in rendered(spec), name


def test_a_nan_loss_is_left_out_not_drawn_as_a_value(repo):
    spec = specs(repo)["reports/plots/damage_curve.csv"]
    values = spec["data"]["values"]
    values[0] = dict(values[0], loss="")  # as the CSV writes a NaN loss
    svg = rendered(spec)
    shown = re.findall(r"set: (zero \w+); revision: workspace; rev: workspace; k: (\d+)", svg)
    assert (values[0]["set"], values[0]["k"]) not in shown
    assert (values[1]["set"], values[1]["k"]) in shown


def test_the_committed_config_names_the_template_setup_writes():
    root = Path(__file__).parents[2]
    config = (root / ".dvc" / "config").read_text()
    assert "html_template = tmp/offline_plots.html" in config
    assert "critical-weights-offline-plots --out .dvc/tmp/offline_plots.html" in (root / "setup.sh").read_text()
    assert offline_plots.DEFAULT_PATH == Path(".dvc/tmp/offline_plots.html")
    assert shutil.which("critical-weights-offline-plots") or (Path(sys.executable).parent / "critical-weights-offline-plots").exists()
