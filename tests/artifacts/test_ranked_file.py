"""critical_weights.artifacts.ranked_file: the ranked set reads back exactly with its meta, and a
missing or corrupt ranked folder is one line naming the stage to rerun."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from critical_weights.artifacts.ranked_file import RANKED_FILE, read_ranked, write_ranked
from critical_weights.config.params import RankParams
from critical_weights.core.errors import ShardError


def ranked_table() -> pa.Table:
    return pa.table({"parameter": ["a.weight", "a.weight", "b.weight"], "flat_index": [3, 1, 0],
                     "score": [3.0, 2.0, 1.0], "group": ["all"] * 3})


def test_ranked_file_round_trips_with_its_meta(tmp_path):
    params = RankParams(mode="global", k=3)
    write_ranked(tmp_path / "r", ranked_table(), params)
    table, info = read_ranked(tmp_path / "r")
    assert table.equals(ranked_table())
    assert info == {"rank": json.loads(json.dumps(params.__dict__)), "n_ranked": 3, "n_groups": 1,
                    "parameters": ["a.weight", "b.weight"]}
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [RANKED_FILE, "meta.json"]


def test_missing_ranked_file_names_the_stage(tmp_path):
    with pytest.raises(ShardError, match=r"ranked file .*critical.parquet is missing; run the rank stage \(dvc repro\)"):
        read_ranked(tmp_path)


def test_corrupt_ranked_file_says_rerun(tmp_path):
    write_ranked(tmp_path / "r", ranked_table(), RankParams())
    (tmp_path / "r" / RANKED_FILE).write_bytes(b"not parquet")
    with pytest.raises(ShardError, match=r"ranked file .* is corrupt \(.*\); rerun dvc repro"):
        read_ranked(tmp_path / "r")
