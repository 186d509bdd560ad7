"""The sensitivity shards in `data/sensitivity/`: explicit schemas, stable names, fixed order.

Layout of the folder:
- `candidates.parquet`: per parameter (in parameter order, one row group each), the top
  `keep` candidates of every metric, metric by metric in params order, best first (ties by
  flat index);
- `bottom.parquet`: likewise the `keep` least sensitive weights, least first (the
  `bottom_k` control of validation);
- `dense/NNNN-<parameter>.parquet` (only with `sensitivity.dense`): every score;
- `stats.parquet`: per parameter and metric, exact statistics, the log10 histogram and the
  max-pooled grid;
- `meta.json`: model identity, loss, token counts, metrics, keep, histogram bins, params.

A parameter's rows are written as soon as it is scored, so memory holds the scores of only
the parameters being scored (two at a time). This module needs pyarrow only, so ranking,
export and plots never import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from critical_weights.core.errors import ShardError, first_line

FORMAT = "critical-weights/sensitivity/3"  # 2: expert column, block, component, layout; 3: one candidates file

CANDIDATE_SCHEMA = pa.schema([
    ("parameter", pa.string()),
    ("metric", pa.string()),
    ("rank", pa.int32()),  # 1-based within (parameter, metric)
    ("flat_index", pa.int64()),  # index into the tensor as stored; see critical_weights.model.layout
    ("expert", pa.int32()),  # expert index of a 3-D expert tensor, null for dense tensors
    ("row", pa.int64()),  # output unit, for every layout
    ("col", pa.int64()),  # input feature, for every layout
    ("score", pa.float32()),
    ("weight", pa.float32()),
    ("gradient", pa.float32()),  # dL/dw, float32
    ("token", pa.string()),  # decoded token of the row, for embedding and output-head rows
])

STATS_SCHEMA = pa.schema([
    ("param_index", pa.int32()),  # position in named_parameters() among scored parameters
    ("parameter", pa.string()),
    ("block", pa.int32()),  # transformer block index, null outside blocks
    ("component", pa.string()),  # module path inside the block (critical_weights.model.layout)
    ("layout", pa.string()),  # layout kind: linear, conv1d, experts, experts_in_out, embedding, ...
    ("shape", pa.list_(pa.int64())),  # as stored
    ("n_experts", pa.int32()),  # null for dense tensors
    ("n_rows", pa.int64()),  # output units (per expert)
    ("n_cols", pa.int64()),  # input features (per expert)
    ("token_rows", pa.bool_()),  # rows are token ids (embedding or output head)
    ("metric", pa.string()),
    ("count", pa.int64()),
    ("sum", pa.float64()),
    ("mean", pa.float64()),
    ("std", pa.float64()),
    ("min", pa.float64()),
    ("max", pa.float64()),
    ("zeros", pa.int64()),
    ("negatives", pa.int64()),
    ("hist", pa.list_(pa.int64())),  # positive scores per log10 bin, see meta.json
    ("grid_rows", pa.int32()),
    ("grid_cols", pa.int32()),
    ("grid", pa.list_(pa.float32())),  # (grid_rows, grid_cols) row-major, max-pooled; rows are
    # output units and cols input features; experts stacked along rows ((E, out, in) storage)
    # or along cols ((E, in, out) storage)
    ("expert_sum", pa.list_(pa.float64())),  # per expert: sum of its scores (empty for dense)
    ("expert_max", pa.list_(pa.float64())),  # per expert: max of its scores (empty for dense)
])

DENSE_SCHEMA = pa.schema([
    ("parameter", pa.string()),
    ("metric", pa.string()),
    ("flat_index", pa.int64()),
    ("score", pa.float32()),
])


def shard_name(param_index: int, parameter: str) -> str:
    return f"{param_index:04d}-{parameter}.parquet"


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")


KINDS = ("candidates", "bottom")  # most and least sensitive: `<kind>.parquet`


class CandidateWriter:
    """Writes `candidates.parquet` and `bottom.parquet`, one row group per parameter, in the
    order `add` is called (parameter order). One file per kind, not per parameter: opening,
    writing and later reading hundreds of small files cost more than the scoring."""

    def __init__(self, folder: Path):
        self._writers: dict[str, pq.ParquetWriter] = {}
        try:
            for kind in KINDS:
                self._writers[kind] = pq.ParquetWriter(folder / f"{kind}.parquet", CANDIDATE_SCHEMA, compression="zstd")
        except BaseException:
            self.close(quiet=True)
            raise

    def add(self, top: pa.Table, bottom: pa.Table) -> None:
        """One parameter's top and bottom candidates of every metric (CANDIDATE_SCHEMA)."""
        for kind, table in zip(KINDS, (top, bottom)):
            self._writers[kind].write_table(table, row_group_size=max(1, table.num_rows))

    def close(self, quiet: bool = False) -> None:
        """Close both files; `quiet` (another error is already on its way) drops close errors."""
        failed = None
        for writer in self._writers.values():
            try:
                writer.close()
            except (pa.ArrowException, OSError) as err:
                failed = failed or err
        if failed is not None and not quiet:
            raise failed

    def __enter__(self) -> CandidateWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.close(quiet=kind is not None)


def write_dense(folder: Path, param_index: int, parameter: str, metric_scores: dict[str, np.ndarray]) -> None:
    """Every score of one parameter, metric by metric, in flat-index order."""
    parts = []
    for metric, scores in metric_scores.items():
        n = len(scores)
        parts.append(pa.table({
            "parameter": pa.array([parameter] * n, pa.string()),
            "metric": pa.array([metric] * n, pa.string()),
            "flat_index": pa.array(np.arange(n, dtype=np.int64)),
            "score": pa.array(scores.astype(np.float32)),
        }, schema=DENSE_SCHEMA))
    (folder / "dense").mkdir(parents=True, exist_ok=True)
    _write(pa.concat_tables(parts), folder / "dense" / shard_name(param_index, parameter))


def write_stats(folder: Path, rows: list[dict[str, Any]]) -> None:
    _write(pa.Table.from_pylist(rows, schema=STATS_SCHEMA), folder / "stats.parquet")


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    text = json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True, allow_nan=False)
    (folder / "meta.json").write_text(text + "\n", encoding="utf-8")


def _read_table(path: Path, schema: pa.Schema, metric: str | None = None) -> pa.Table:
    """A shard, checked to exist, to parse and to have exactly `schema`; with `metric`, only
    that metric's rows, filtered row group by row group. (One open per file: `pq.read_table`
    with filters costs ten times more on small files.)"""
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; rerun the sensitivity stage (dvc repro)")
    try:
        with pq.ParquetFile(path) as file:
            found = file.schema_arrow
            if not found.equals(schema, check_metadata=False):
                raise ShardError(
                    f"shard {path} has a foreign schema (columns {', '.join(found.names)}), not {FORMAT}; "
                    "rerun the sensitivity stage (dvc repro)"
                )
            if metric is None:
                return file.read()
            kept = []
            for i in range(file.num_row_groups):
                group = file.read_row_group(i)
                kept.append(group.filter(pc.equal(group["metric"], metric)))
            return pa.concat_tables(kept) if kept else schema.empty_table()
    except (pa.ArrowException, OSError) as err:
        raise ShardError(f"shard {path} is corrupt or truncated ({first_line(err)}); rerun the sensitivity stage (dvc repro)") from None


META_KEYS = {"metrics": list, "keep": int, "params": dict, "hist_log10_edges": dict}  # what readers rely on


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"shard {path} is missing; rerun the sensitivity stage (dvc repro)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ShardError(f"shard {path} is corrupt ({first_line(err)}); rerun the sensitivity stage (dvc repro)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShardError(f"shard {path} is not a {FORMAT} file; rerun the sensitivity stage (dvc repro)")
    lacking = [k for k, kind in META_KEYS.items() if not isinstance(meta.get(k), kind)]
    if lacking:
        raise ShardError(f"shard {path} lacks {', '.join(lacking)}; rerun the sensitivity stage (dvc repro)")
    return meta


def read_stats(folder: Path) -> pa.Table:
    return _read_table(folder / "stats.parquet", STATS_SCHEMA)


def places(stats: pa.Table) -> dict[str, tuple[int | None, str]]:
    """Parameter -> (block, component), as the sensitivity stage found them in the model."""
    return {r["parameter"]: (r["block"], r["component"]) for r in stats.select(["parameter", "block", "component"]).to_pylist()}


def read_candidates(folder: Path, stats: pa.Table, metric: str, kind: str = "candidates") -> pa.Table:
    """Candidates of `metric` for every parameter listed in `stats`, in parameter order.

    `kind` is `candidates` (most sensitive first) or `bottom` (least sensitive first)."""
    wanted = stats.filter(pc.equal(stats["metric"], metric))["parameter"]
    path = folder / f"{kind}.parquet"
    table = _read_table(path, CANDIDATE_SCHEMA, metric)
    table = table.filter(pc.is_in(table["parameter"], value_set=wanted.combine_chunks()))
    lacking = set(wanted.to_pylist()) - set(pc.unique(table["parameter"]).to_pylist())
    if lacking:
        raise ShardError(f"shard {path} lacks the {metric} candidates of {min(lacking)}"
                         f"{f' and {len(lacking) - 1} more' if len(lacking) > 1 else ''}; rerun the sensitivity stage (dvc repro)")
    return table


def read_dense(folder: Path, param_index: int, parameter: str) -> pa.Table:
    return _read_table(folder / "dense" / shard_name(param_index, parameter), DENSE_SCHEMA)
