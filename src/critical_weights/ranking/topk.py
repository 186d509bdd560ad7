"""Exact top-k over the sensitivity shards, per tensor, block, component or globally.

Every mode is exact for k <= `sensitivity.keep`: a group's top-k is the top-k of the union
of its tensors' top-k candidates, since no weight outside a tensor's top-k can beat its
k-th. Order: score descending, then flat index ascending, then parameter order.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from critical_weights.artifacts import shards
from critical_weights.config.params import RankParams
from critical_weights.core.errors import ParamsError, ShardError

Place = tuple[int | None, str]  # (block, component) of a parameter, from the shards' stats


def group_of(mode: str, parameter: str, place: Place) -> str:
    """The group a parameter's weights compete in under `mode`: the tensor, its block (or its
    component outside blocks), its component (the module path inside the block, whatever the
    architecture calls it), or all."""
    block, component = place
    if mode == "global":
        return "all"
    if mode == "per_tensor":
        return parameter
    if mode == "per_component":
        return component
    return f"block {block}" if block is not None else component


def select_parameters(names: list[str], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """Names matching any `include` pattern (all when empty) and no `exclude` pattern."""
    chosen = [n for n in names if (not include or any(fnmatch.fnmatchcase(n, p) for p in include))
              and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if not chosen:
        examples = ", ".join(dict.fromkeys([names[0], names[len(names) // 2], names[-1]])) if names else "(none)"
        raise ParamsError([f"rank.include/rank.exclude: {list(include)} / {list(exclude)} leave no parameter to rank; "
                           f"the patterns match parameter names such as {examples}"])
    return chosen


def rank_candidates(candidates: pa.Table, param_index: dict[str, int], mode: str, k: int,
                    places: dict[str, Place]) -> pa.Table:
    """Top-k of each group, with a 1-based `rank` and the `group` name, groups in order."""
    group_names: list[str] = []  # in order of their first parameter
    group_id: dict[str, int] = {}  # parameter -> position in group_names
    for name in sorted(param_index, key=param_index.get):
        g = group_of(mode, name, places[name])
        if g not in group_names:
            group_names.append(g)
        group_id[name] = group_names.index(g)
    names = candidates["parameter"].to_pylist()
    p_order = np.array([param_index[n] for n in names], dtype=np.int64)
    groups = np.array([group_id[n] for n in names], dtype=np.int64)
    score = candidates["score"].to_numpy().astype(np.float64)
    flat = candidates["flat_index"].to_numpy()
    # lexsort sorts by the last key first: group, then score desc, flat index, parameter order
    order = np.lexsort((p_order, flat, -score, groups))
    g_sorted = groups[order]
    starts = np.searchsorted(g_sorted, g_sorted, side="left")  # first position of each row's group
    rank_in_group = np.arange(len(order)) - starts
    keep = rank_in_group < k
    table = candidates.take(pa.array(order[keep]))
    table = table.set_column(table.schema.get_field_index("rank"), "rank", pa.array((rank_in_group[keep] + 1).astype(np.int32)))
    return table.append_column("group", pa.array([group_names[g] for g in g_sorted[keep]], pa.string()))


def rank_metric(sensitivity: Path, params: RankParams, metric: str | None = None) -> pa.Table:
    """The ranked critical weights of `metric` (default `params.metric`) from the shards."""
    metric = metric or params.metric
    meta = shards.read_meta(sensitivity)
    if metric not in meta["metrics"]:
        raise ShardError(
            f"rank.metric: {metric!r} is not in the shards; they hold {', '.join(meta['metrics'])} "
            "(add it to sensitivity.metrics)"
        )
    if params.k > meta["keep"]:
        raise ShardError(f"rank.k: {params.k} exceeds the shards' sensitivity.keep {meta['keep']}; raise sensitivity.keep")
    stats = shards.read_stats(sensitivity)
    stats = stats.filter(pc.equal(stats["metric"], metric))
    names = stats["parameter"].to_pylist()
    chosen = set(select_parameters(names, params.include, params.exclude))
    stats = stats.filter(pa.array([n in chosen for n in names]))
    candidates = shards.read_candidates(sensitivity, stats, metric)
    param_index = dict(zip(stats["parameter"].to_pylist(), stats["param_index"].to_pylist()))
    return rank_candidates(candidates, param_index, params.mode, params.k, shards.places(stats))


def rank_every_metric(sensitivity: Path, params: RankParams) -> dict[str, pa.Table]:
    """The same ranking (mode, k, include, exclude) for every metric the shards hold."""
    return {m: rank_metric(sensitivity, params, m) for m in shards.read_meta(sensitivity)["metrics"]}
