"""The ranked critical set on disk: the contract between `rank` and the stages after it.

The folder holds `critical.parquet` (the ranked weights, best first within each group, as
critical_weights.ranking.topk orders them) and `meta.json` (the rank params it was made with,
how many weights and groups, and which parameters). Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from critical_weights.config.params import RankParams
from critical_weights.core.errors import ShardError
from critical_weights.core.outputs import atomic_path

RANKED_FILE = "critical.parquet"


def write_ranked(out: Path, ranked: pa.Table, params: RankParams) -> None:
    """`critical.parquet` and `meta.json` in `out`, replaced whole (atomically)."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        pq.write_table(ranked, tmp / RANKED_FILE, compression="zstd")
        info: dict[str, Any] = {"rank": asdict(params), "n_ranked": ranked.num_rows,
                                "n_groups": len(set(ranked["group"].to_pylist())),
                                "parameters": sorted(set(ranked["parameter"].to_pylist()))}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_ranked(folder: Path) -> tuple[pa.Table, dict[str, Any]]:
    """The ranked table and its meta.json, or one line saying what to rerun."""
    path = folder / RANKED_FILE
    try:
        with pq.ParquetFile(path) as file:
            table = file.read()
        info = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"ranked file {path} is missing; run the rank stage (dvc repro)") from None
    except (pa.ArrowException, OSError, json.JSONDecodeError) as err:
        raise ShardError(f"ranked file {path} is corrupt ({str(err).splitlines()[0]}); rerun dvc repro") from None
    return table, info
