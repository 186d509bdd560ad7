"""Which weights validation perturbs: the critical sets and their controls, from the shards alone.

Critical sets:
- `k<k>`: the exact global top-k of `rank.metric` (within `rank.include` / `rank.exclude`)
  for every k in `validate.k_values`;
- `exported`: the set the user got in `critical_weights.csv` (`rank.mode`, `rank.k`), read
  from the rank stage's output.

Each critical set gets controls with the same count in each tensor:
- `random_k`: `validate.random_draws` independent uniform draws, the critical weights left out;
- `bottom_k`: the least sensitive weights by the same metric (the `bottom` shards).

No torch here: a plan is decided before the model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from critical_weights.artifacts import shards
from critical_weights.config.params import RankParams, ValidateParams
from critical_weights.core.errors import ModelError, ShardError
from critical_weights.core.streams import STREAM_RANDOM_K
from critical_weights.ranking import topk

Selection = dict[str, np.ndarray]  # parameter -> flat indices (n,) int64, ascending
EXPORTED = "exported"  # the label of the exported set


def group(names: Sequence[str], flat: np.ndarray, order: Sequence[str]) -> Selection:
    """Flat indices grouped by parameter, parameters in `order`, indices ascending."""
    names_arr, present = np.asarray(names, dtype=object), set(names)
    return {n: np.sort(flat[names_arr == n]).astype(np.int64) for n in order if n in present}


def from_pairs(pairs: Sequence[tuple[str, int]]) -> Selection:
    """(parameter, flat_index) pairs as a Selection: parameters in first-seen order, each
    one's indices ascending and distinct."""
    out: dict[str, list[int]] = {}
    for name, flat in pairs:
        out.setdefault(name, []).append(flat)
    return {n: np.array(sorted(set(v)), dtype=np.int64) for n, v in out.items()}


def counts(selection: Selection) -> dict[str, int]:
    return {n: len(idx) for n, idx in selection.items()}


def random_selection(per_tensor: dict[str, int], sizes: dict[str, int], avoid: Selection, seed: int, label: int,
                     draw: int = 0) -> Selection:
    """Per tensor, `per_tensor[name]` weights drawn uniformly by (`seed`, `label`, `draw`), none in `avoid`."""
    rng = np.random.default_rng([seed, STREAM_RANDOM_K, label, draw])
    out: Selection = {}
    for name, c in per_tensor.items():
        skip = avoid.get(name, np.empty(0, np.int64))
        draw_idx = rng.choice(sizes[name], size=min(sizes[name], c + len(skip)), replace=False)  # (c + |skip|,)
        kept = draw_idx[~np.isin(draw_idx, skip)][:c]
        if len(kept) < c:
            raise ModelError(f"random_k: parameter {name} has {sizes[name] - len(skip)} weights outside the critical set, fewer than {c}")
        out[name] = np.sort(kept).astype(np.int64)
    return out


def bottom_selection(bottom: pa.Table, per_tensor: dict[str, int]) -> Selection:
    """Per tensor, its `per_tensor[name]` least sensitive weights (bottom shards, least first)."""
    names = np.asarray(bottom["parameter"].to_pylist(), dtype=object)
    rank, flat = bottom["rank"].to_numpy(), bottom["flat_index"].to_numpy()
    out: Selection = {}
    for name, c in per_tensor.items():
        rows = np.flatnonzero(names == name)
        rows = rows[np.argsort(rank[rows], kind="stable")][:c]
        if len(rows) < c:
            raise ShardError(f"bottom_k: the bottom shard of {name} holds {len(rows)} weights, fewer than {c}; raise sensitivity.keep")
        out[name] = np.sort(flat[rows]).astype(np.int64)
    return out


@dataclass(frozen=True)
class SetGroup:
    """One critical set and its controls."""

    critical: Selection
    random_k: list[Selection] = field(default_factory=list)  # one per draw; empty when not asked
    bottom_k: Selection | None = None

    @property
    def n_weights(self) -> int:
        return sum(counts(self.critical).values())

    def all(self) -> list[Selection]:
        return [self.critical, *self.random_k, *([self.bottom_k] if self.bottom_k is not None else [])]


@dataclass(frozen=True)
class Plan:
    """What gets perturbed, decided from the shards alone (no model needed)."""

    sizes: dict[str, int]  # weights per scored parameter, in model order
    groups: dict[str, SetGroup]  # "k1", "k10", ..., "exported" -> the sets
    expected: pa.Table  # parameter, flat_index, weight of every shard row used: checked on the model

    @property
    def touched(self) -> list[str]:
        """Every parameter some selection touches, in model order."""
        names = {n for g in self.groups.values() for sel in g.all() for n in sel}
        return [n for n in self.sizes if n in names]


def _controls(critical: Selection, vp: ValidateParams, sizes: dict[str, int], bottom: pa.Table | None,
              seed: int, label: int) -> SetGroup:
    per_tensor = counts(critical)
    draws = [random_selection(per_tensor, sizes, critical, seed, label, d) for d in range(vp.random_draws)] \
        if "random_k" in vp.controls else []
    return SetGroup(critical, draws, bottom_selection(bottom, per_tensor) if bottom is not None else None)


def plan(sensitivity: Path, rank: RankParams, vp: ValidateParams, seed: int, exported: pa.Table | None = None) -> Plan:
    """The critical sets (global top-k of rank.metric for every k, and the exported set when
    given) and their controls."""
    top = topk.rank_metric(sensitivity, replace(rank, mode="global", k=max(vp.k_values)))  # best first
    stats = shards.read_stats(sensitivity)
    stats = stats.filter(pc.equal(stats["metric"], rank.metric))
    order = stats["parameter"].to_pylist()  # model order
    sizes = {n: math.prod(s) for n, s in zip(order, stats["shape"].to_pylist())}
    used = [top] + ([exported] if exported is not None else [])
    touched = {n for t in used for n in t["parameter"].to_pylist()}
    bottom = None
    if "bottom_k" in vp.controls:
        bottom = shards.read_candidates(sensitivity, stats.filter(pa.array([n in touched for n in order])),
                                        rank.metric, kind="bottom")
    groups: dict[str, SetGroup] = {}
    for k in vp.k_values:
        head = top.slice(0, k)
        groups[f"k{k}"] = _controls(group(head["parameter"].to_pylist(), head["flat_index"].to_numpy(), order),
                                    vp, sizes, bottom, seed, k)
    if exported is not None:
        groups[EXPORTED] = _controls(group(exported["parameter"].to_pylist(), exported["flat_index"].to_numpy(), order),
                                     vp, sizes, bottom, seed, 0)
    columns = ["parameter", "flat_index", "weight"]
    expected = pa.concat_tables([t.select(columns) for t in used + ([bottom] if bottom is not None else [])])
    return Plan(sizes, groups, expected)


def exported_set(ranked: pa.Table, info: dict, rank: RankParams) -> pa.Table:
    """The rank stage's critical set, checked to be the one the params describe."""
    made = info.get("rank", {})
    if made.get("metric") != rank.metric or made.get("mode") != rank.mode or made.get("k") != rank.k:
        raise ShardError(f"the ranked critical set was made with rank {made}, not the params' metric "
                         f"{rank.metric!r}, mode {rank.mode!r}, k {rank.k}; rerun the rank stage (dvc repro)")
    return ranked.select(["parameter", "flat_index", "weight"])
