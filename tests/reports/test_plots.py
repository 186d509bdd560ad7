"""critical_weights.reports.plots: each figure shows the data it is given (series, values, labels), and
the CSVs behind DVC's plots equal the exact statistics in the shards."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pyarrow.compute as pc
import pytest
from matplotlib.patches import StepPatch

from critical_weights.artifacts import shards
from critical_weights.artifacts.ranked_file import read_ranked
from critical_weights.config.params import PlotParams, RankParams
from critical_weights.core.errors import ParamsError
from critical_weights.ranking.stage import run_rank
from critical_weights.reports import plots
from critical_weights.reports.export import run_export

ROWS = [  # layer_table rows of a two-block model and its output head
    {"parameter": "model.layers.0.mlp.down_proj.weight", "block": 0, "component": "mlp.down_proj", "max": 4.0, "mean": 0.5},
    {"parameter": "model.layers.1.mlp.down_proj.weight", "block": 1, "component": "mlp.down_proj", "max": 8.0, "mean": 0.25},
    {"parameter": "model.layers.1.self_attn.q_proj.weight", "block": 1, "component": "self_attn.q_proj", "max": 2.0, "mean": 0.125},
    {"parameter": "model.layers.0.self_attn.q_proj.weight", "block": 0, "component": "self_attn.q_proj", "max": 1.0, "mean": 1.0},
    {"parameter": "lm_head.weight", "block": None, "component": "lm_head", "max": 16.0, "mean": 2.0},
]


def test_distribution_shows_the_used_bins_the_threshold_and_every_count():
    edges = np.linspace(-4, 0, 9)
    counts = np.array([0, 0, 3, 0, 5, 2, 0, 0])
    fig = plots.distribution_figure(edges, counts, zeros=7, negatives=1, cutoffs=np.array([0.01]), metric="fisher",
                                    mode="global", k=4)
    ax = fig.axes[0]
    (steps,) = [p for p in ax.patches if isinstance(p, StepPatch)]
    values, step_edges = steps.get_data()[:2]
    assert values.tolist() == [3, 0, 5, 2] and step_edges.tolist() == edges[2:7].tolist()  # empty tails cut
    (line,) = ax.get_lines()
    assert line.get_xdata()[0] == pytest.approx(-2.0)  # log10 of the threshold
    assert ax.get_xlabel() == "log10(fisher score)" and ax.get_ylabel() == "number of weights (log scale)"
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "Distribution of all 18 fisher scores (exact histogram)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["weights per bin", "global top-4 cut-off: 0.01"]
    assert ax.texts[0].get_text() == "zero scores: 7\nnegative scores: 1"


def test_layer_comparison_has_a_panel_per_component_with_its_max_and_mean_and_the_head_in_each():
    fig = plots.layer_comparison_figure(ROWS, "grad_x_weight")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    # the model's own components, in the order its parameters come
    assert [ax.get_title() for ax in panels] == ["mlp.down_proj", "self_attn.q_proj"]
    for ax, comp, (first, second) in zip(panels, ("mlp.down_proj", "self_attn.q_proj"), ((0, 1), (3, 2))):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == ["max", "mean", "lm_head max (not in a block)", "lm_head mean (not in a block)"]
        for stat in ("max", "mean"):
            assert lines[stat].get_xdata().tolist() == [0, 1]  # sorted by block
            assert lines[stat].get_ydata().tolist() == [ROWS[first][stat], ROWS[second][stat]]
            assert np.asarray(lines[f"lm_head {stat} (not in a block)"].get_ydata()).tolist() == [ROWS[4][stat]] * 2
        assert lines["lm_head max (not in a block)"].get_linestyle() == "--"
        peak = max((ROWS[first], ROWS[second]), key=lambda r: r["max"])
        assert [t.get_text() for t in ax.texts] == [f"block {peak['block']}"]
        assert ax.get_yscale() == "log" and ax.get_xlabel() == "transformer block"
    assert panels[0].get_ylabel() == "grad_x_weight score"
    assert panels[0].get_shared_y_axes().joined(panels[0], panels[1]), "one y axis, so panels compare"
    assert plots.layer_comparison_size(7) == (13.4, 6.2) and plots.layer_comparison_size(2) == (7.0, 3.6)


def test_heatmap_cells_are_log10_scores_by_block_and_component():
    tensor = {"parameter": "model.layers.1.mlp.down_proj.weight", "grid": [1.0, 0.0, 10.0, 100.0],
              "grid_rows": 2, "grid_cols": 2, "n_rows": 5, "n_cols": 4}
    fig = plots.heatmap_figure(ROWS, "max", "grad_x_weight", tensor)
    left, right = fig.axes[:2]  # then the two colorbars
    cells = left.get_images()[0].get_array()
    # rows: blocks 0, 1; cols: the components in the order the rows first name them
    assert np.allclose(cells, np.log10([[4.0, 1.0], [8.0, 2.0]]))
    assert [t.get_text() for t in left.get_xticklabels()] == ["mlp.down_proj", "self_attn.q_proj"]
    assert [t.get_text() for t in left.get_yticklabels()] == ["0", "1"]
    shown = right.collections[0].get_array().reshape(2, 2)
    assert shown[0, 1] is np.ma.masked or np.isnan(shown[0, 1])  # a zero score has no log
    assert np.allclose(np.asarray(shown)[[0, 1, 1], [0, 0, 1]], [0.0, 1.0, 2.0])
    assert right.get_xlim() == (0, 4) and right.get_ylim() == (5, 0)  # real columns and rows
    assert right.get_title().startswith("model.layers.1.mlp.down_proj.weight")


def test_overlap_matrix_holds_the_jaccard_of_each_pair():
    per = {"t0": {"jaccard": 0.0}, "t1": {"jaccard": 0.5}}
    overlap = {"metrics": ["a", "b", "c"], "rank": {"mode": "per_tensor", "k": 5},
               "pairs": {"a vs b": {"jaccard": 0.25, "spearman": 0.5, "per_tensor": per},
                         "a vs c": {"jaccard": 0.75, "spearman": None, "per_tensor": per}}}
    fig = plots.overlap_figure(overlap)
    ax = fig.axes[0]
    matrix = np.asarray(ax.get_images()[0].get_array())
    assert matrix[1, 0] == 0.25 and matrix[2, 0] == 0.75 and np.isnan(matrix[2, 1]) and np.isnan(matrix[0, 1])
    cell = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cell == {(1, 0): "0.25", (2, 0): "0.75"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels == ["a vs b\n(ρ 0.50)", "a vs c\n(ρ n/a)"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def plotted(dense_shards, tmp_path_factory) -> tuple[Path, Path]:
    sens, _ = dense_shards
    folder = tmp_path_factory.mktemp("plot")
    run_rank(sens, RankParams(k=10), folder / "ranked")
    overlap = folder / "overlap.json"
    overlap.write_text(json.dumps({"metrics": ["grad_x_weight"], "rank": {"mode": "per_tensor", "k": 10}, "pairs": {}}))
    plots.run_plot(sens, folder / "ranked", overlap, folder / "plots", PlotParams(dpi=40))
    return sens, folder / "plots"


def test_run_plot_writes_every_png_at_the_asked_resolution(plotted):
    _, out = plotted
    assert png_size(out / "sensitivity_distribution.png") == (9 * 40, int(4.8 * 40))
    width, height = plots.layer_comparison_size(7)  # the tiny Llama's seven components
    assert png_size(out / "layer_comparison.png") == (round(width * 40), round(height * 40))
    for name in ("sensitivity_heatmap.png", "metric_overlap.png"):
        png_size(out / name)


def test_the_csvs_behind_dvc_plots_equal_the_shard_statistics(plotted):
    sens, out = plotted
    stats = [r for r in shards.read_stats(sens).to_pylist() if r["metric"] == "grad_x_weight"]
    table = list(csv.DictReader(io.StringIO((out / "layer_comparison.csv").read_text(encoding="utf-8"))))
    inside = [r for r in stats if r["block"] is not None]
    assert len(table) == len(inside)  # long format: one line per tensor inside a block
    by_parameter = {row["parameter"]: row for row in table}
    for r in inside:
        row = by_parameter[r["parameter"]]
        assert (int(row["block"]), row["component"], row["metric"]) == (r["block"], r["component"], "grad_x_weight")
        assert np.float64(row["max"]) == pytest.approx(r["max"], rel=1e-8)
    assert [int(row["block"]) for row in table] == sorted(int(row["block"]) for row in table)
    hist = list(csv.DictReader(io.StringIO((out / "score_histogram.csv").read_text(encoding="utf-8"))))
    positives = sum(r["count"] - r["zeros"] - r["negatives"] for r in stats)
    assert sum(int(h["count"]) for h in hist) == positives
    assert all(int(h["count"]) > 0 for h in hist)



def test_dvc_draws_one_line_per_component_the_model_has(plotted, tmp_path):
    """`dvc plots show` renders dvc.yaml's layer_comparison entry with the project's template:
    colour by the `component` column of the long-format CSV, no fixed list of names."""
    import shutil
    import subprocess
    import sys

    import yaml

    _, out = plotted
    root = Path(__file__).parents[2]
    entry = next(p for p in yaml.safe_load((root / "dvc.yaml").read_text())["plots"]
                 if isinstance(p, dict) and "reports/plots/layer_comparison.csv" in p)
    (tmp_path / "reports" / "plots").mkdir(parents=True)
    shutil.copy(out / "layer_comparison.csv", tmp_path / "reports" / "plots" / "layer_comparison.csv")
    shutil.copytree(root / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": [entry]}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc = Path(sys.executable).parent / "dvc"
    shown = subprocess.run([str(dvc), "plots", "show", "--json"], cwd=tmp_path, check=True, capture_output=True,
                           text=True, timeout=120)
    (plot,) = json.loads(shown.stdout)["data"]["reports/plots/layer_comparison.csv"]
    spec = plot["content"]
    assert spec["encoding"]["color"]["field"] == "component"
    assert (spec["encoding"]["x"]["field"], spec["encoding"]["y"]["field"]) == ("block", "max")
    table = list(csv.DictReader(io.StringIO((out / "layer_comparison.csv").read_text(encoding="utf-8"))))
    assert [v["component"] for v in spec["data"]["values"]] == [r["component"] for r in table]
    assert {r["component"] for r in table} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


# ----------------------------------------------------------------------------- on the tiny model's real run

@pytest.fixture(scope="module")
def reported_run(validate_run, tmp_path_factory) -> tuple[Path, Path, Path]:
    prepared, sens, ranked, params = validate_run
    reports = tmp_path_factory.mktemp("reports")
    run_export(sens, ranked, prepared, reports)
    plots.run_plot(sens, ranked, reports / "metric_overlap.json", reports / "plots", PlotParams(dpi=50))
    return sens, ranked, reports


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def test_every_png_decodes_to_its_figure_size(reported_run):
    _, _, reports = reported_run
    for name, size in [("sensitivity_distribution.png", (9, 4.8)), ("metric_overlap.png", None),
                       ("layer_comparison.png", plots.layer_comparison_size(7)), ("sensitivity_heatmap.png", None)]:
        image = matplotlib.image.imread(reports / "plots" / name)
        assert image.ndim == 3 and image.shape[2] in (3, 4), name
        if size is not None:
            assert image.shape[:2] == (round(size[1] * 50), round(size[0] * 50)), name


def stats_of(sens: Path, metric: str):
    stats = shards.read_stats(sens)
    return stats.filter(pc.equal(stats["metric"], metric))


def test_distribution_is_the_exact_histogram_with_each_groups_cut_off(reported_run):
    sens, ranked_dir, reports = reported_run
    ranked, info = read_ranked(ranked_dir)
    stats = stats_of(sens, "grad_x_weight")
    counts, zeros, negatives = plots.histogram(stats)
    edges = plots._edges(shards.read_meta(sens))
    cutoffs = ranked.group_by("group").aggregate([("score", "min")])["score_min"].to_numpy().astype(np.float64)
    fig = plots.distribution_figure(edges, counts, zeros, negatives, cutoffs, "grad_x_weight", "per_tensor", 3)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "log10(grad_x_weight score)" and ax.get_yscale() == "log"
    assert ax.get_ylabel() == "number of weights (log scale)"
    drawn = ax.patches[0].get_data()  # StepPatch: (values, edges)
    assert int(drawn.values.sum()) == int(counts.sum()) == stats["count"].to_numpy().sum() - zeros - negatives
    ticks = ax.lines[0].get_xdata()
    assert sorted(ticks) == pytest.approx(sorted(np.log10(cutoffs)))
    assert len(ticks) == len(stats) == info["n_groups"], "one cut-off per tensor in per_tensor mode"
    assert "cut-off of each of" in ax.get_legend().get_texts()[1].get_text()
    rows = read_csv(reports / "plots" / "score_histogram.csv")
    centres = [float(r["log10_score"]) for r in rows]
    assert centres == sorted(centres), "bins in order"
    assert sum(int(r["count"]) for r in rows) == int(counts.sum())
    glob = plots.distribution_figure(edges, counts, zeros, negatives, cutoffs[:1], "grad_x_weight", "global", 3)
    assert glob.axes[0].get_legend().get_texts()[1].get_text().startswith("global top-3 cut-off")


def test_layer_comparison_lines_equal_the_csv(reported_run):
    sens, _, reports = reported_run
    rows = plots.layer_table(stats_of(sens, "grad_x_weight"))
    fig = plots.layer_comparison_figure(rows, "grad_x_weight")
    comps = plots._components(rows)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == comps
    table = read_csv(reports / "plots" / "layer_comparison.csv")  # long format
    for comp, ax in panels.items():
        (line,) = [line for line in ax.lines if line.get_label() == "max"]
        want = sorted((int(r["block"]), float(r["max"])) for r in table if r["component"] == comp)
        assert list(line.get_xdata()) == [b for b, _ in want]
        assert list(line.get_ydata()) == pytest.approx([v for _, v in want], rel=1e-6)
        assert ax.get_yscale() == "log"
    assert panels[comps[-1]].get_xlabel() == "transformer block"


def test_heatmap_grid_is_in_real_rows_and_columns_and_the_tensor_is_a_param(reported_run):
    sens, _, _ = reported_run
    stats = stats_of(sens, "grad_x_weight")
    rows = plots.layer_table(stats)
    name = "model.layers.1.mlp.up_proj.weight"
    tensor = plots.heatmap_tensor(stats, name)
    fig = plots.heatmap_figure(rows, "max", "grad_x_weight", tensor)
    grid_ax = fig.axes[1]
    assert grid_ax.get_title().startswith(name)
    assert grid_ax.get_xlim() == (0, tensor["n_cols"]) and grid_ax.get_ylim() == (tensor["n_rows"], 0)
    assert grid_ax.get_xlabel() == "input column (col)" and grid_ax.get_ylabel() == "output row (row)"
    mesh = grid_ax.collections[0]
    grid = np.array(tensor["grid"]).reshape(tensor["grid_rows"], tensor["grid_cols"])
    assert np.allclose(np.asarray(mesh.get_array()).reshape(grid.shape), np.log10(grid), rtol=1e-6)
    assert plots.grid_edges(100, 64)[-1] == 100 and plots.grid_edges(32, 32).tolist() == list(range(33))
    assert plots.heatmap_tensor(stats, "top")["max"] == max(stats["max"].to_pylist())
    with pytest.raises(ParamsError) as info:
        plots.heatmap_tensor(stats, "model.layers.1.mlp.up_proj")
    assert info.value.problems == ["plot.heatmap_tensor: 'model.layers.1.mlp.up_proj' is not a scored parameter "
                                   "(did you mean model.layers.1.mlp.up_proj.weight?); use top or a parameter name "
                                   "from critical_weights.csv"]


def test_overlap_figure_shows_each_pair_per_tensor(reported_run):
    _, _, reports = reported_run
    overlap = json.loads((reports / "metric_overlap.json").read_text())
    fig = plots.overlap_figure(overlap)
    assert len(overlap["metrics"]) == 3 and len(fig.axes) == 3, "matrix, its colour bar, and the per-tensor panel"
    ax = fig.axes[1]
    names = list(overlap["pairs"])
    dots, diamonds = ax.collections[0::2], ax.collections[1::2]  # per pair: its tensors, then its overall index
    assert [float(c.get_offsets()[0][0]) for c in diamonds] == pytest.approx([overlap["pairs"][n]["jaccard"] for n in names])
    for c, n in zip(dots, names):
        assert sorted(c.get_offsets()[:, 0]) == pytest.approx(sorted(t["jaccard"] for t in overlap["pairs"][n]["per_tensor"].values()))
    assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == names
    two = dict(overlap, metrics=overlap["metrics"][:2], pairs={names[0]: overlap["pairs"][names[0]]})
    fig2 = plots.overlap_figure(two)
    assert len(fig2.axes) == 1
    dots = fig2.axes[0].collections[0].get_offsets()[:, 0]
    assert sorted(dots) == pytest.approx(sorted(t["jaccard"] for t in overlap["pairs"][names[0]]["per_tensor"].values()))


def test_run_plot_with_an_unknown_heatmap_tensor_raises(reported_run, tmp_path):
    sens, ranked, reports = reported_run
    with pytest.raises(ParamsError, match="plot.heatmap_tensor: 'nope' is not a scored parameter"):
        plots.run_plot(sens, ranked, reports / "metric_overlap.json", tmp_path, dataclasses.replace(PlotParams(), heatmap_tensor="nope"))


def test_every_plot_passes_the_layout_check(reported_run, tmp_path, caplog):
    """No label cut at the edge, no legend or text over a point, no colliding tick labels: the
    plot stage's figures on the tiny model (run_plot logs each problem it finds)."""
    sens, ranked, reports = reported_run
    with caplog.at_level(logging.WARNING, logger="critical_weights.reports.figures"):
        plots.run_plot(sens, ranked, reports / "metric_overlap.json", tmp_path / "plots", PlotParams())
    assert [r.getMessage() for r in caplog.records if r.name == "critical_weights.reports.figures"] == []
