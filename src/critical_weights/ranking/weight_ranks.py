"""Where given weights stand in the gradient ranking: rank and score under every metric in the
shards, within their tensor and globally (over the tensors `rank.include` / `rank.exclude` keep).

Order is the ranking's: score descending, then flat index ascending, then parameter order.
With dense shards (`sensitivity.dense: true`) every rank is exact. Otherwise the shards hold
each tensor's top `sensitivity.keep`, and a rank is exact only when no weight left out of them
could come before it; when one could, the rank is given as a lower bound (`*_at_least`):
- a weight outside its tensor's kept top has `rank_in_tensor_at_least` = keep + 1, no score,
  and `rank_global_at_least` = one past its tensor's last kept weight in the global order;
- a kept weight that a truncated tensor's left-out weights might beat has `rank_global_at_least`.
This module needs pyarrow only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from critical_weights.artifacts import shards
from critical_weights.config.params import RankParams
from critical_weights.ranking import topk

Item = tuple[str, int]  # (parameter, flat_index)


def ranks(sensitivity: Path, rank: RankParams, items: list[Item]) -> list[dict[str, dict[str, Any]]]:
    """Per item, per metric the shards hold: score, rank_in_tensor, rank_global (or bounds)."""
    meta = shards.read_meta(sensitivity)
    dense = bool(meta["params"].get("sensitivity", {}).get("dense"))
    every = shards.read_stats(sensitivity)
    out: list[dict[str, dict[str, Any]]] = [{} for _ in items]
    for metric in meta["metrics"]:
        stats = every.filter(pc.equal(every["metric"], metric))
        names = stats["parameter"].to_pylist()
        chosen = set(topk.select_parameters(names, rank.include, rank.exclude))
        stats = stats.filter(pa.array([n in chosen for n in names]))
        order = dict(zip(stats["parameter"].to_pylist(), stats["param_index"].to_pylist()))
        if dense:
            found = _dense_ranks(sensitivity, order, metric, items)
        else:
            sizes = {n: math.prod(s) for n, s in zip(stats["parameter"].to_pylist(), stats["shape"].to_pylist())}
            found = _kept_ranks(sensitivity, stats, order, sizes, meta["keep"], metric, items)
        for i, entry in enumerate(found):
            out[i][metric] = entry
    return out


def _unscored(name: str) -> dict[str, Any]:
    return {"scored": False, "why": f"{name} is not among the ranked tensors (not scored, or left out by rank.include/exclude)"}


def _kept_ranks(sensitivity: Path, stats: pa.Table, order: dict[str, int], sizes: dict[str, int], keep: int,
                metric: str, items: list[Item]) -> list[dict[str, Any]]:
    cands = shards.read_candidates(sensitivity, stats, metric)
    ranked = topk.rank_candidates(cands, order, "global", max(1, cands.num_rows), shards.places(stats))  # the union, best first
    names = np.asarray(ranked["parameter"].to_pylist(), dtype=object)
    flat = ranked["flat_index"].to_numpy()
    score = ranked["score"].to_numpy()
    in_tensor = ranked["rank"].to_numpy()  # global position, 1-based
    own = cands.to_pydict()
    tensor_rank = {(p, f): r for p, f, r in zip(own["parameter"], own["flat_index"], own["rank"])}
    final = {n: int(g) for n, g in zip(names, in_tensor)}  # tensor -> global position of its last kept weight
    last = {n: g for n, g in final.items() if sizes[n] > keep}  # only truncated tensors hide weights
    out = []
    for name, f in items:
        if name not in order:
            out.append(_unscored(name))
            continue
        hit = np.flatnonzero((names == name) & (flat == f))
        if not len(hit):
            out.append({"scored": True, "exact": False, "score": None, "rank_in_tensor": None,
                        "rank_in_tensor_at_least": keep + 1, "rank_global": None,
                        "rank_global_at_least": last[name] + 1})
            continue
        g = int(in_tensor[hit[0]])
        exact = all(pos > g for n, pos in last.items() if n != name)
        out.append({"scored": True, "exact": exact, "score": float(score[hit[0]]),
                    "rank_in_tensor": int(tensor_rank[(name, f)]), "rank_in_tensor_at_least": None,
                    "rank_global": g if exact else None, "rank_global_at_least": None if exact else g})
    return out


def _dense_ranks(sensitivity: Path, order: dict[str, int], metric: str, items: list[Item]) -> list[dict[str, Any]]:
    scores = {}
    for name, index in order.items():
        table = shards.read_dense(sensitivity, index, name)
        table = table.filter(pc.equal(table["metric"], metric))
        scores[name] = table["score"].to_numpy()  # (numel,) float32, by flat index
    out = []
    for name, f in items:
        if name not in order:
            out.append(_unscored(name))
            continue
        s = scores[name][f]
        within = 1 + _before(scores[name], s, f - 1)
        others = sum(_before(v, s, f if order[n] < order[name] else f - 1) for n, v in scores.items() if n != name)
        out.append({"scored": True, "exact": True, "score": float(s), "rank_in_tensor": int(within),
                    "rank_in_tensor_at_least": None, "rank_global": int(within + others), "rank_global_at_least": None})
    return out


def _before(values: np.ndarray, s: float, last_tie: int) -> int:
    """How many of `values` come before a score s: higher, or equal at flat index <= last_tie
    (ties break by flat index, then parameter order)."""
    n_ties = int(np.count_nonzero(values[: max(0, last_tie + 1)] == s))
    return int(np.count_nonzero(values > s)) + n_ties


def top_weights(sensitivity: Path, rank: RankParams, k: int) -> pa.Table:
    """The global top-k by rank.metric (within rank.include / rank.exclude)."""
    from dataclasses import replace

    return topk.rank_metric(sensitivity, replace(rank, mode="global", k=k))
