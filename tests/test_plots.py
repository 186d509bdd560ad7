"""critical_weights.plots: each figure shows the data it is given (series, values, labels), and
the CSVs behind DVC's plots equal the exact statistics in the shards."""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.patches import StepPatch

from critical_weights import plots, shards
from critical_weights.params import PlotParams, RankParams
from critical_weights.ranking import run_rank

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
    fig = plots.distribution_figure(edges, counts, zeros=7, negatives=1, threshold=0.01, metric="fisher", label="cut")
    ax = fig.axes[0]
    (steps,) = [p for p in ax.patches if isinstance(p, StepPatch)]
    values, step_edges = steps.get_data()[:2]
    assert values.tolist() == [3, 0, 5, 2] and step_edges.tolist() == edges[2:7].tolist()  # empty tails cut
    (line,) = ax.get_lines()
    assert line.get_xdata()[0] == pytest.approx(-2.0)  # log10 of the threshold
    assert ax.get_xlabel() == "log10(fisher score)" and ax.get_ylabel() == "number of weights"
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "Distribution of all 18 fisher scores (exact histogram)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["weights per bin", "cut: 0.01"]
    assert ax.texts[0].get_text() == "zero scores: 7\nnegative scores: 1"


def test_layer_comparison_has_a_line_per_component_and_the_head_dashed():
    fig = plots.layer_comparison_figure(ROWS, "grad_x_weight")
    top, bottom = fig.axes
    for ax, stat in ((top, "max"), (bottom, "mean")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        # the model's own components, in the order its parameters come, then the rest
        assert list(lines) == ["mlp.down_proj", "self_attn.q_proj", "lm_head (not in a block)"]
        assert lines["mlp.down_proj"].get_xdata().tolist() == [0, 1]
        assert lines["mlp.down_proj"].get_ydata().tolist() == [ROWS[0][stat], ROWS[1][stat]]
        assert lines["self_attn.q_proj"].get_ydata().tolist() == [ROWS[3][stat], ROWS[2][stat]]  # sorted by block
        assert np.asarray(lines["lm_head (not in a block)"].get_ydata()).tolist() == [ROWS[4][stat]] * 2
        assert lines["lm_head (not in a block)"].get_linestyle() == "--"
        assert ax.get_ylabel() == f"{stat} grad_x_weight score"
    assert bottom.get_xlabel() == "transformer block"


def test_heatmap_cells_are_log10_scores_by_block_and_component():
    grid = np.array([[1.0, 0.0], [10.0, 100.0]], dtype=np.float32)
    fig = plots.heatmap_figure(ROWS, "max", "grad_x_weight", grid, "model.layers.1.mlp.down_proj.weight")
    left, right = fig.axes[:2]  # then the two colorbars
    cells = left.get_images()[0].get_array()
    # rows: blocks 0, 1; cols: the components in the order the rows first name them
    assert np.allclose(cells, np.log10([[4.0, 1.0], [8.0, 2.0]]))
    assert [t.get_text() for t in left.get_xticklabels()] == ["mlp.down_proj", "self_attn.q_proj"]
    assert [t.get_text() for t in left.get_yticklabels()] == ["0", "1"]
    shown = right.get_images()[0].get_array()
    assert shown[0, 1] is np.ma.masked or np.isnan(shown[0, 1])  # a zero score has no log
    assert np.allclose(np.asarray(shown)[[0, 1, 1], [0, 0, 1]], [0.0, 1.0, 2.0])
    assert "max-pooled 2x2 grid" in right.get_title()


def test_overlap_matrix_is_symmetric_with_the_jaccard_of_each_pair():
    overlap = {"metrics": ["a", "b", "c"], "rank": {"mode": "per_layer", "k": 5},
               "pairs": {"a vs b": {"jaccard": 0.25, "spearman": 0.5}, "a vs c": {"jaccard": 0.75, "spearman": None}}}
    fig = plots.overlap_figure(overlap)
    ax = fig.axes[0]
    matrix = ax.get_images()[0].get_array()
    assert np.array_equal(matrix, [[1, 0.25, 0.75], [0.25, 1, 0], [0.75, 0, 1]])
    cell = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cell[(0, 1)] == cell[(1, 0)] == "J 0.25\nρ 0.50" and cell[(0, 2)] == "J 0.75\nρ n/a"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


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
    overlap.write_text(json.dumps({"metrics": ["grad_x_weight"], "rank": {"mode": "per_layer", "k": 10}, "pairs": {}}))
    plots.run_plot(sens, folder / "ranked", overlap, folder / "plots", PlotParams(dpi=40))
    return sens, folder / "plots"


def test_run_plot_writes_every_png_at_the_asked_resolution(plotted):
    _, out = plotted
    assert png_size(out / "sensitivity_distribution.png") == (9 * 40, int(4.8 * 40))
    assert png_size(out / "layer_comparison.png") == (11 * 40, 8 * 40)
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
    root = Path(__file__).parents[1]
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
