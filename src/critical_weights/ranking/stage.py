"""The `rank` stage: the exact top-k of `rank.metric` over the shards, written for the stages after it."""

from __future__ import annotations

from pathlib import Path

from critical_weights.artifacts.ranked_file import write_ranked
from critical_weights.config.params import RankParams
from critical_weights.ranking.topk import rank_metric


def run_rank(sensitivity: Path, params: RankParams, out: Path) -> None:
    """Read the shards, rank, and write `critical.parquet` and `meta.json` to `out`."""
    write_ranked(out, rank_metric(sensitivity, params), params)
