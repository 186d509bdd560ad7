"""critical_weights.ranking.stage: the rank stage writes the ranked file and its meta, the same
bytes every time."""

from __future__ import annotations

import dataclasses

from critical_weights.ranking.stage import run_rank


def test_ranking_twice_gives_identical_files(dense_shards, tmp_path):
    sens, params = dense_shards
    for out in ("a", "b"):
        run_rank(sens, dataclasses.replace(params.rank, mode="global"), tmp_path / out)
    for name in ("critical.parquet", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
