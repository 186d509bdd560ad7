"""Each group's critical set, and how the groups' sets relate. Torch-free: everything here is
read from the groups' shards.

- **Critical sets** by `rank.metric`: each group's global top-N (`domains.top_n`) and its
  per-tensor top-k (`domains.per_tensor_k`), exact because every group's shards keep `sensitivity.keep`
  candidates per tensor; with each set's share by block and by component.
- **Overlap**: the Jaccard index |A ∩ B| / |A ∪ B| of two sets, for every pair of groups and
  for each group against the whole (every group's in-sample texts together); and Spearman's
  rank correlation of the per-tensor score sums (which tensors matter), over the tensors both
  score.
- **Shared weights**: in every group's top-N.
- **Group-specific weights**: in the group's top-N and in no other group's. Their specificity
  is the group's score over the largest other group's score at the same weight. Another
  group's score is read from its candidates where the weight is among them; where it is not,
  that group's lowest kept candidate in the tensor bounds it from above, so the specificity is
  then a lower bound (`bounded`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from critical_weights.artifacts import shards
from critical_weights.config.params import RankParams
from critical_weights.ranking.topk import rank_metric, select_parameters
from critical_weights.validation.predictiveness import spearman


@dataclass(frozen=True)
class Critical:
    """One group's (or the whole's) critical sets, from its shards."""

    name: str
    top: pa.Table  # global top-N, best first: parameter, flat_index, score, block, component, row, col, ...
    per_tensor: pa.Table  # per-tensor top-k
    tensor_sums: dict[str, float]  # parameter -> the sum of its scores
    candidates: pa.Table  # every kept candidate: parameter, flat_index, score

    def keys(self, which: str = "top") -> set[tuple[str, int]]:
        t = self.top if which == "top" else self.per_tensor
        return set(zip(t["parameter"].to_pylist(), t["flat_index"].to_pylist()))


def critical_of(name: str, folder: Path, rank: RankParams, top_n: int, per_tensor_k: int) -> Critical:
    """The sets of the group whose shards are in `folder`, each row with its block and component
    (the rank table's own `group` column, the ranking group, left out)."""
    stats = shards.read_stats(folder)
    stats = stats.filter(pc.equal(stats["metric"], rank.metric))
    chosen = set(select_parameters(stats["parameter"].to_pylist(), rank.include, rank.exclude))
    stats = stats.filter(pa.array([n in chosen for n in stats["parameter"].to_pylist()]))
    places = shards.places(stats)

    def placed(table: pa.Table) -> pa.Table:
        where = [places[n] for n in table["parameter"].to_pylist()]
        table = table.drop_columns(["group"])
        return (table.append_column("block", pa.array([b for b, _ in where], pa.int64()))
                .append_column("component", pa.array([c for _, c in where], pa.string())))

    top = placed(rank_metric(folder, replace(rank, mode="global", k=top_n)))
    per_tensor = placed(rank_metric(folder, replace(rank, mode="per_tensor", k=per_tensor_k)))
    sums = dict(zip(stats["parameter"].to_pylist(), stats["sum"].to_pylist()))
    candidates = shards.read_candidates(folder, stats, rank.metric).select(["parameter", "flat_index", "score"])
    return Critical(name, top, per_tensor, sums, candidates)


def shares(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A set's share by block (None: outside the blocks) and by component, largest first."""
    n = len(rows)
    out: dict[str, Any] = {}
    for column in ("block", "component"):
        values = [r[column] for r in rows]
        counts: dict[Any, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        out[f"by_{column}"] = [{column: v, "n": c, "share": c / n} for v, c in
                               sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]
    return out


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def overlap(sets: list[Critical]) -> list[dict[str, Any]]:
    """Every ordered pair (a, b), a != b: Jaccard of the top-N and the per-tensor top-k sets,
    and the Spearman correlation of the per-tensor score sums."""
    rows = []
    for a in sets:
        for b in sets:
            if a is b:
                continue
            common = [n for n in a.tensor_sums if n in b.tensor_sums]
            rho = spearman([a.tensor_sums[n] for n in common], [b.tensor_sums[n] for n in common])
            rows.append({"a": a.name, "b": b.name, "jaccard_top": jaccard(a.keys(), b.keys()),
                         "jaccard_per_tensor": jaccard(a.keys("per_tensor"), b.keys("per_tensor")),
                         "spearman_tensor_sums": rho, "n_tensors": len(common)})
    return rows


def shared(sets: list[Critical]) -> list[dict[str, Any]]:
    """The weights in every group's top-N, in the first group's order, with each group's score."""
    common = set.intersection(*(c.keys() for c in sets)) if sets else set()
    scores = {c.name: {(r["parameter"], r["flat_index"]): r["score"] for r in c.top.to_pylist()} for c in sets}
    out = []
    for r in sets[0].top.to_pylist() if sets else []:
        key = (r["parameter"], r["flat_index"])
        if key in common:
            out.append({k: r[k] for k in ("parameter", "flat_index", "block", "component", "expert", "row", "col",
                                          "weight", "token")}
                       | {"score": {name: float(s[key]) for name, s in scores.items()}})
    return out


def _score_at(other: Critical, keys: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """`other`'s score at each (parameter, flat_index), and whether it is only a bound (the
    weight is outside `other`'s candidates: its lowest kept candidate in the tensor)."""
    names = other.candidates["parameter"].to_pylist()
    flat = other.candidates["flat_index"].to_pylist()
    score = other.candidates["score"].to_numpy()
    exact = {(n, f): s for n, f, s in zip(names, flat, score)}
    lowest: dict[str, float] = {}
    for n, s in zip(names, score):
        lowest[n] = min(lowest.get(n, math.inf), float(s))
    got = np.array([exact.get(k, lowest.get(k[0], 0.0)) for k in keys], dtype=np.float64)
    bounded = np.array([k not in exact for k in keys])
    return got, bounded


def specific(sets: list[Critical]) -> dict[str, dict[str, Any]]:
    """Per group: its top-N weights in no other group's top-N, with their specificity (module
    docstring), most specific first."""
    out = {}
    for g in sets:
        others = [h for h in sets if h is not g]
        taken = set().union(*(h.keys() for h in others)) if others else set()
        rows = [r for r in g.top.to_pylist() if (r["parameter"], r["flat_index"]) not in taken]
        keys = [(r["parameter"], r["flat_index"]) for r in rows]
        best, bound = np.zeros(len(rows)), np.zeros(len(rows), dtype=bool)
        for h in others:
            got, bounded = _score_at(h, keys)
            take = got > best
            best, bound = np.where(take, got, best), np.where(take, bounded, bound)
        for r, b, is_bound in zip(rows, best, bound):
            r["largest_other_score"] = float(b)
            r["specificity"] = float(r["score"] / b) if b > 0 else None
            r["bounded"] = bool(is_bound)
        rows.sort(key=lambda r: (-(r["specificity"] if r["specificity"] is not None else math.inf),
                                 -r["score"], r["parameter"], r["flat_index"]))
        out[g.name] = {"n": len(rows), "share_of_top": len(rows) / g.top.num_rows if g.top.num_rows else 0.0,
                       **shares(rows), "weights": rows}
    return out
