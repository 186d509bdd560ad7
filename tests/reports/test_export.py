"""critical_weights.reports.export: the CSV holds exactly the ranked weights (floats that read back to
the same float32), and the statistics, manifest and metrics agree with the shards."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from safetensors import safe_open

from critical_weights.artifacts import shards
from critical_weights.config.params import RankParams
from critical_weights.ranking.stage import run_rank
from critical_weights.ranking.topk import rank_metric
from critical_weights.reports import export


@pytest.fixture(scope="module")
def exported(dense_shards, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny model's shards ranked per layer (k 10) and exported: (sensitivity, ranked, reports)."""
    sens, _ = dense_shards
    folder = tmp_path_factory.mktemp("export")
    ranked, reports = folder / "ranked", folder / "reports"
    run_rank(sens, RankParams(k=10), ranked)
    export.run_export(sens, ranked, sens.parent / "prepared", reports)
    return sens, ranked, reports


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_csv_is_the_ranked_table_best_first_with_both_ranks(exported):
    sens, ranked_dir, reports = exported
    text = (reports / "critical_weights.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    ranked = rank_metric(sens, RankParams(k=10))
    assert text.splitlines()[0] == ",".join(export.CSV_COLUMNS)
    assert len(text.splitlines()) == len(rows) + 1, "one row per line"
    n_tensors = sum(r["metric"] == "grad_x_weight" for r in shards.read_stats(sens).to_pylist())
    assert len(rows) == ranked.num_rows == 10 * n_tensors  # per_tensor: k per tensor
    # best first: score descending, then flat index, then parameter (model) order
    order = {n: i for i, n in enumerate(dict.fromkeys(shards.read_stats(sens)["parameter"].to_pylist()))}
    best_first = sorted(ranked.to_pylist(), key=lambda r: (-np.float64(r["score"]), r["flat_index"], order[r["parameter"]]))
    assert [int(r["global_rank"]) for r in rows] == list(range(1, len(rows) + 1))
    group_rank = {(r["parameter"], r["flat_index"]): r["rank"] for r in ranked.to_pylist()}
    for row, want in zip(rows, best_first):
        assert row["parameter"] == want["parameter"] and int(row["flat_index"]) == want["flat_index"]
        assert int(row["group_rank"]) == group_rank[(want["parameter"], want["flat_index"])]
        assert row["metric"] == "grad_x_weight"
        is_token = want["parameter"] in ("model.embed_tokens.weight", "lm_head.weight")
        assert row["token_id"] == (str(want["row"]) if is_token else "")
        for key in ("score", "weight", "gradient"):
            assert np.float32(row[key]) == np.float32(want[key]), key
        # the module path inside the block, below `model.` outside blocks; no expert in a dense model
        inside = want["parameter"].startswith("model.layers.")
        path = want["parameter"].removesuffix(".weight").split(".")
        assert row["component"] == (".".join(path[3:]) if inside else ".".join(p for p in path if p != "model"))
        assert row["block"] == (path[2] if inside else "")
        assert row["expert"] == ""
        assert (int(row["row"]), int(row["col"])) == (want["row"], want["col"])


def test_concentration_counts_the_most_frequent_column_and_row():
    table = pa.table({"parameter": ["p", "p", "p", "q", "q"], "row": [0, 5, 5, 2, 1], "col": [1, 1, 2, 3, 1]})
    got = export.concentration(table)
    assert got["p"] == {"top_col": 1, "top_col_share": 2 / 3, "distinct_cols": 2,
                        "top_row": 5, "top_row_share": 2 / 3, "distinct_rows": 2}
    assert got["q"]["top_col"] == 1 and got["q"]["top_row"] == 1  # a tie goes to the smaller index
    assert got["q"]["top_col_share"] == 0.5


def test_metrics_and_stats_agree_with_the_shards(exported):
    sens, _, reports = exported
    metrics = read_json(reports / "metrics.json")
    meta = shards.read_meta(sens)
    stats = [r for r in shards.read_stats(sens).to_pylist() if r["metric"] == "grad_x_weight"]
    scores = [float(r["score"]) for r in csv.DictReader(io.StringIO((reports / "critical_weights.csv").read_text()))]
    assert set(metrics) == {"n_tensors", "n_weights", "n_texts", "n_tokens", "loss_prepared", "perplexity_prepared", "n_critical", "max_score"}
    assert metrics["n_critical"] == len(scores)
    assert metrics["n_tensors"] == len(stats) == meta["n_parameters"]
    assert metrics["max_score"] == max(r["max"] for r in stats)
    assert (metrics["loss_prepared"], metrics["n_tokens"], metrics["n_weights"]) == (meta["avg_loss"], meta["n_tokens"], meta["n_weights"])
    critical = read_json(reports / "sensitivity_stats.json")["critical_set"]
    assert critical["mean_score_all_weights"] == pytest.approx(sum(r["sum"] for r in stats) / sum(r["count"] for r in stats), rel=1e-12)
    assert critical["share_of_total_score"] == pytest.approx(sum(scores) / sum(r["sum"] for r in stats), rel=1e-6)
    assert critical["min_score"] == pytest.approx(min(scores), rel=1e-7)
    assert critical["n_critical"] == len(scores) and critical["metric"] == "grad_x_weight"
    per_param = read_json(reports / "sensitivity_stats.json")["parameters"]
    assert list(per_param) == sorted({r["parameter"] for r in shards.read_stats(sens).to_pylist()})  # JSON keys sorted
    first = per_param[stats[0]["parameter"]]["metrics"]["grad_x_weight"]
    assert first == {k: stats[0][k] for k in ("count", "sum", "mean", "std", "min", "max", "zeros", "negatives")}


def test_manifest_records_params_the_csv_hash_and_versions(exported):
    _, ranked_dir, reports = exported
    manifest = read_json(reports / "manifest.json")
    csv_bytes = (reports / "critical_weights.csv").read_bytes()
    assert manifest["critical_weights_csv_sha256"] == hashlib.sha256(csv_bytes).hexdigest()
    assert manifest["params"]["rank"] == read_json(ranked_dir / "meta.json")["rank"]
    assert set(manifest["params"]) >= {"seed", "model", "sensitivity", "texts", "rank"}
    assert manifest["versions"]["critical_weights"] == export.__version__
    assert {"python", "torch", "transformers", "dvc"} <= set(manifest["versions"])


def test_overlap_has_every_pair_of_metrics(exported):
    sens, _, reports = exported
    overlap = read_json(reports / "metric_overlap.json")
    metrics = shards.read_meta(sens)["metrics"]
    assert overlap["metrics"] == metrics
    assert len(overlap["pairs"]) == len(metrics) * (len(metrics) - 1) // 2


def test_a_second_export_writes_the_same_bytes(exported, tmp_path):
    sens, ranked_dir, reports = exported
    export.run_export(sens, ranked_dir, sens.parent / "prepared", tmp_path)
    for path in reports.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_tokens_are_escaped_onto_one_line():
    assert export.escaped("a\nb\\c\td\r") == "a\\nb\\\\c\\td\\r"
    assert export.escaped("x\u2028y\x00z") == "x\\u2028y\\u0000z"
    assert export.escaped("café Ġthe") == "café Ġthe" and export.escaped(None) is None


def test_the_critical_mask_marks_exactly_the_ranked_weights(exported):
    """critical_mask.safetensors, read with the safetensors package and unpacked as the README
    says: 1 at every ranked weight of every tensor holding one, 0 elsewhere."""
    sens, ranked_dir, reports = exported
    ranked = rank_metric(sens, RankParams(k=10))
    shapes = {r["parameter"]: tuple(r["shape"]) for r in shards.read_stats(sens).to_pylist()}
    with safe_open(str(reports / export.CRITICAL_MASK), framework="numpy") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(set(ranked["parameter"].to_pylist()))
        for name in f.keys():
            bits = f.get_tensor(name)
            shape = shapes[name]
            assert bits.dtype == np.uint8 and bits.shape == (*shape[:-1], -(-shape[-1] // 8))
            mask = np.unpackbits(bits, axis=-1, count=shape[-1], bitorder="little").astype(bool)
            want = np.zeros(int(np.prod(shape)), dtype=bool)
            want[[r["flat_index"] for r in ranked.to_pylist() if r["parameter"] == name]] = True
            assert np.array_equal(mask.reshape(-1), want), name
    assert (meta["metric"], meta["mode"], meta["k"], meta["n_critical"]) == \
        ("grad_x_weight", "per_tensor", "10", str(ranked.num_rows))
    assert json.loads(meta["shapes"]) == {n: list(shapes[n]) for n in set(ranked["parameter"].to_pylist())}
