"""critical_weights.ranking.weight_ranks: given weights' ranks under every metric equal a brute-
force sort of the dense scores, or are honest bounds where the kept candidates cannot tell."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from critical_weights.artifacts import shards
from critical_weights.ranking import weight_ranks


def brute_rank(scores: dict[str, np.ndarray], order: dict[str, int], name: str, f: int) -> tuple[int, int]:
    """Ranks by the ranking's order (score desc, flat asc, parameter order), by sorting everything."""
    keys = [(-float(v), i, order[n]) for n, s in scores.items() for i, v in enumerate(s)]
    mine = (-float(scores[name][f]), f, order[name])
    within = sorted((-float(v), i) for i, v in enumerate(scores[name])).index(mine[:2]) + 1
    return within, sorted(keys).index(mine) + 1


def test_dense_ranks_equal_brute_force_and_kept_ranks_are_exact_or_bounds(dense_shards):
    sens, params = dense_shards
    stats = shards.read_stats(sens)
    names = list(dict.fromkeys(stats["parameter"].to_pylist()))
    order = dict(zip(stats["parameter"].to_pylist(), stats["param_index"].to_pylist()))
    scores = {}
    for n in names:
        t = shards.read_dense(sens, order[n], n)
        scores[n] = t.filter(pc.equal(t["metric"], "grad_x_weight"))["score"].to_numpy()
    rng = np.random.default_rng(0)
    items = [(n, int(rng.integers(len(scores[n])))) for n in names] + [(names[2], int(np.argmax(scores[names[2]])))]
    got = weight_ranks.ranks(sens, params.rank, items)
    sub = stats.filter(pc.equal(stats["metric"], "grad_x_weight"))
    sizes = {n: int(np.prod(s)) for n, s in zip(sub["parameter"].to_pylist(), sub["shape"].to_pylist())}
    kept = weight_ranks._kept_ranks(sens, sub, order, sizes, 40, "grad_x_weight", items)
    for (name, f), dense, bounded in zip(items, got, kept):
        within, overall = brute_rank(scores, order, name, f)
        d = dense["grad_x_weight"]
        assert (d["rank_in_tensor"], d["rank_global"], d["score"]) == (within, overall, float(scores[name][f]))
        if bounded["rank_in_tensor"] is not None:
            assert bounded["rank_in_tensor"] == within
        else:
            assert within >= bounded["rank_in_tensor_at_least"] == 41
        if bounded["exact"]:
            assert bounded["rank_global"] == overall
        else:
            assert overall >= bounded["rank_global_at_least"]
    assert kept[-1]["rank_in_tensor"] == 1
