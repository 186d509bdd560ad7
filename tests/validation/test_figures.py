"""The validation figures show what the report holds: one series per set, the random draws'
spread as error bars, NaN as a label on the k axis, and each metric's scatter equal to its
sampled weights; and both pass the layout check (nothing cut, covered or colliding)."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from critical_weights.core.progress import Timings
from critical_weights.reports.figures import layout_problems
from critical_weights.validation.figures import damage_figure, predictiveness_figure
from critical_weights.validation.stage import Outputs, run_validate


@pytest.fixture(scope="module")
def report(validate_run, tmp_path_factory) -> dict:
    prepared, sens, ranked, params = validate_run
    params = dataclasses.replace(params, validate=dataclasses.replace(params.validate, k_values=(1, 5), n_texts=4, single_weights=6))
    out = tmp_path_factory.mktemp("validation")
    return run_validate(prepared, sens, ranked, Path(params.texts.source), params,
                        Outputs(out / "v.json", out / "r.json", out / "d.png", out / "d.csv", out / "p.png"), Timings("validate"))


def series(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (x, y) of each errorbar series."""
    out = {}
    for container in ax.containers:
        line = container.lines[0]
        out[container.get_label()] = (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
    return out


def test_damage_figure_draws_each_set_with_the_reports_numbers(report):
    fig = damage_figure(report)
    ax = fig.axes[0]
    base = report["texts"]["heldout"]["loss"]
    got = series(ax)
    assert set(got) == {"critical (global top-k)", "random_k mean ± sd over draws", "bottom_k (least sensitive)",
                        "critical, in-sample texts"}
    dmg = report["damage"]["zero"]
    assert got["critical (global top-k)"][1] == pytest.approx([dmg[f"k{k}"]["critical"]["heldout"]["loss"] for k in (1, 5)])
    assert got["random_k mean ± sd over draws"][1] == pytest.approx([base + dmg[f"k{k}"]["random_k"]["mean_increase"] for k in (1, 5)])
    assert got["critical, in-sample texts"][1] == pytest.approx([dmg[f"k{k}"]["critical"]["in_sample"]["loss"] for k in (1, 5)])
    bars = next(c for c in ax.containers if c.get_label().startswith("random_k")).lines[2][0]
    half = [np.ptp(seg[:, 1]) / 2 for seg in bars.get_segments()]
    assert half == pytest.approx([dmg[f"k{k}"]["random_k"]["std_increase"] for k in (1, 5)])
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "k, weights perturbed (log scale)"
    assert ax.get_ylabel() == "mean token loss (nats)"  # held-out and in-sample curves share the axis
    assert any(t.get_text().startswith("exported set (") for t in ax.texts)
    assert not any(t.get_text() == "NaN" for t in ax.texts)


def test_a_nan_loss_is_a_label_not_a_value(report):
    broken = copy.deepcopy(report)
    rec = broken["damage"]["zero"]["k5"]["critical"]["heldout"]
    rec.update(loss=None, loss_increase=None, finite=False)
    ax = damage_figure(broken).axes[0]
    crit = series(ax)["critical (global top-k)"]
    assert np.isnan(crit[1][1]) and not np.isnan(crit[1][0])
    nan = [t for t in ax.texts if t.get_text() == "NaN"]
    assert len(nan) == 1 and nan[0].xy[0] == 5 and nan[0].xycoords == ("data", "axes fraction")


def test_predictiveness_figure_scatters_each_metrics_scores_against_the_measured_change(report):
    fig = predictiveness_figure(report)
    single = report["predictiveness"]["single_weights"]
    metrics = list(single["metrics"])
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == len(metrics)
    for ax, m in zip(panels, metrics):
        pts = np.asarray(ax.collections[0].get_offsets(), float)
        want = [(w["scores"][m], w["loss_increase"]) for w in single["weights"] if w["scores"][m] is not None]
        assert np.allclose(pts, np.array(want, float), rtol=1e-12, atol=0)
        assert ax.get_xlabel() == f"{m} score" and ax.get_title().startswith(f"{m}: Spearman ")
    top = fig.axes[0]
    assert [line.get_label() for line in top.lines] == list(report["predictiveness"]["top_k"]["metrics"])
    assert top.get_xlabel().startswith("k, the metric's own global top-k")


def test_both_figures_pass_the_layout_check(report):
    for figure in (damage_figure, predictiveness_figure):
        assert layout_problems(figure(report)) == [], figure.__name__
