"""critical_weights.artifacts.shards: what is written reads back exactly, in a fixed order, and anything
else is refused with a message that says what to rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from critical_weights.artifacts import shards
from critical_weights.core.errors import ShardError

META = {"metrics": ["grad_x_weight", "magnitude"], "keep": 3, "params": {"seed": 1},
        "hist_log10_edges": {"low": -12, "high": 4, "per_decade": 4}}


def candidate_table(parameter: str, metric_rows: dict[str, list[tuple[int, float]]], n_cols: int) -> pa.Table:
    """CANDIDATE_SCHEMA rows of one parameter from (flat_index, score) pairs per metric."""
    rows = [{"parameter": parameter, "metric": metric, "rank": rank, "flat_index": flat, "expert": None,
             "row": flat // n_cols, "col": flat % n_cols, "score": score, "weight": score / 2, "gradient": -score,
             "token": None}
            for metric, pairs in metric_rows.items() for rank, (flat, score) in enumerate(pairs, start=1)]
    return pa.Table.from_pylist(rows, schema=shards.CANDIDATE_SCHEMA)


def stats_row(index: int, parameter: str, metric: str) -> dict:
    """A STATS_SCHEMA row; columns it does not set are left empty."""
    return {**dict.fromkeys(shards.STATS_SCHEMA.names), "param_index": index, "parameter": parameter, "shape": [2, 3], "n_rows": 2, "n_cols": 3,
            "token_rows": False, "metric": metric, "count": 6, "sum": 6.0, "mean": 1.0, "std": 0.5,
            "min": 0.0, "max": 2.0, "zeros": 1, "negatives": 0, "hist": [0, 5, 0], "grid_rows": 1,
            "grid_cols": 2, "grid": [1.5, 2.0]}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two parameters, two metrics: candidates, bottom, stats and meta."""
    with shards.CandidateWriter(tmp_path) as writer:
        for name in ["b.weight", "a.weight"]:  # parameter order is param_index, not the name
            writer.add(candidate_table(name, {"grad_x_weight": [(5, 3.0), (0, 2.0)], "magnitude": [(1, 1.5)]}, n_cols=3),
                       candidate_table(name, {"grad_x_weight": [(2, 0.0)]}, 3))
    shards.write_stats(tmp_path, [stats_row(i, n, m) for i, n in enumerate(["b.weight", "a.weight"])
                                  for m in META["metrics"]])
    shards.write_meta(tmp_path, META)
    return tmp_path


def test_shard_names_are_stable_and_sort_in_parameter_order():
    assert shards.shard_name(7, "model.layers.0.mlp.down_proj.weight") == "0007-model.layers.0.mlp.down_proj.weight.parquet"
    names = [shards.shard_name(i, n) for i, n in [(10, "a"), (2, "z"), (0, "m")]]
    assert sorted(names) == [names[2], names[1], names[0]]


def test_candidates_read_back_per_metric_in_parameter_order(folder):
    stats = shards.read_stats(folder)
    got = shards.read_candidates(folder, stats, "grad_x_weight")
    assert got.schema.equals(shards.CANDIDATE_SCHEMA)
    assert got.column("parameter").to_pylist() == ["b.weight", "b.weight", "a.weight", "a.weight"]
    assert got.column("flat_index").to_pylist() == [5, 0, 5, 0]
    assert got.column("row").to_pylist() == [1, 0, 1, 0] and got.column("col").to_pylist() == [2, 0, 2, 0]
    assert got.column("rank").to_pylist() == [1, 2, 1, 2]
    magnitude = shards.read_candidates(folder, stats, "magnitude")
    assert magnitude.column("score").to_pylist() == [1.5, 1.5]
    bottom = shards.read_candidates(folder, stats, "grad_x_weight", kind="bottom")
    assert bottom.column("flat_index").to_pylist() == [2, 2]


def test_a_metric_no_parameter_has_gives_an_empty_table(folder):
    got = shards.read_candidates(folder, shards.read_stats(folder), "fisher")
    assert got.num_rows == 0 and got.schema.equals(shards.CANDIDATE_SCHEMA)


def test_stats_round_trip_with_their_schema(folder):
    stats = shards.read_stats(folder)
    assert stats.schema.equals(shards.STATS_SCHEMA)
    assert stats.num_rows == 4
    assert stats.to_pylist()[0] == stats_row(0, "b.weight", "grad_x_weight")


def test_dense_holds_every_score_in_flat_order_as_float32(tmp_path):
    scores = {"grad_x_weight": np.array([0.5, 0.25, 1.0 / 3.0]), "magnitude": np.array([2.0, 0.0, 1.0])}
    shards.write_dense(tmp_path, 3, "w", scores)
    got = shards.read_dense(tmp_path, 3, "w")
    assert got.schema.equals(shards.DENSE_SCHEMA)
    assert got.column("metric").to_pylist() == ["grad_x_weight"] * 3 + ["magnitude"] * 3
    assert got.column("flat_index").to_pylist() == [0, 1, 2, 0, 1, 2]
    assert got.column("score").to_numpy().tolist() == np.concatenate(list(scores.values())).astype(np.float32).tolist()


def test_meta_carries_the_format_tag_sorted_and_refuses_nan(tmp_path):
    shards.write_meta(tmp_path, {"z": 1, **META})
    text = (tmp_path / "meta.json").read_text(encoding="utf-8")
    assert json.loads(text)["format"] == shards.FORMAT
    assert list(json.loads(text)) == sorted(json.loads(text)) and text.endswith("}\n")
    assert shards.read_meta(tmp_path) == {"format": shards.FORMAT, "z": 1, **META}
    with pytest.raises(ValueError):
        shards.write_meta(tmp_path, {**META, "avg_loss": math.nan})


def test_meta_that_lacks_what_readers_need(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": shards.FORMAT, "metrics": "x", "keep": 3}), encoding="utf-8")
    with pytest.raises(ShardError) as info:
        shards.read_meta(tmp_path)
    assert str(info.value) == (f"shard {tmp_path / 'meta.json'} lacks metrics, params, hist_log10_edges; "
                               "rerun the sensitivity stage (dvc repro)")


def test_a_shard_with_the_right_columns_but_other_types_is_foreign(tmp_path):
    wrong = pa.table({name: pa.array([1], pa.int8()) for name in shards.STATS_SCHEMA.names})
    pq.write_table(wrong, tmp_path / "stats.parquet")
    with pytest.raises(ShardError) as info:
        shards.read_stats(tmp_path)
    assert "has a foreign schema" in str(info.value) and shards.FORMAT in str(info.value)


def test_a_parameter_missing_from_the_candidates_is_named(folder):
    stats = shards.read_stats(folder)
    path = folder / "candidates.parquet"
    kept = pq.read_table(path)
    pq.write_table(kept.filter(pc.equal(kept["parameter"], "b.weight")), path)  # a.weight's rows are gone
    with pytest.raises(ShardError) as info:
        shards.read_candidates(folder, stats, "grad_x_weight")
    assert str(info.value) == (f"shard {path} lacks the grad_x_weight candidates of a.weight; "
                               "rerun the sensitivity stage (dvc repro)")
    path.unlink()
    with pytest.raises(ShardError, match=f"shard {path} is missing; rerun the sensitivity stage"):
        shards.read_candidates(folder, stats, "grad_x_weight")


def test_the_same_table_gives_the_same_bytes(tmp_path):
    """Shards are outputs DVC hashes: writing the same rows twice gives identical files."""
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        with shards.CandidateWriter(tmp_path / run) as writer:
            for name in ("w", "v"):
                writer.add(candidate_table(name, {"grad_x_weight": [(4, 1.0), (1, 0.5)]}, n_cols=2),
                           candidate_table(name, {"grad_x_weight": [(0, 0.0)]}, n_cols=2))
    for kind in shards.KINDS:
        assert (tmp_path / "one" / f"{kind}.parquet").read_bytes() == (tmp_path / "two" / f"{kind}.parquet").read_bytes()


def test_a_failing_close_never_hides_the_error_already_on_its_way(tmp_path, monkeypatch):
    """Ctrl-C (or any error) while scoring must reach the user as itself, even if closing the
    half-written candidate files then fails too; with no error in flight, the failure shows."""
    def broken_close(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "close", broken_close)
    with pytest.raises(KeyboardInterrupt):
        with shards.CandidateWriter(tmp_path):
            raise KeyboardInterrupt
    with pytest.raises(OSError, match="No space left on device"):
        with shards.CandidateWriter(tmp_path):
            pass
