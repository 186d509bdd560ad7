"""Selection: the critical sets are the exact global top-k and the exported set; controls draw
the same counts from the same tensors, seeded, and never overlap the critical set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from critical_weights.artifacts import shards
from critical_weights.artifacts.ranked_file import read_ranked
from critical_weights.core.errors import ModelError, ShardError
from critical_weights.ranking.topk import rank_metric
from critical_weights.validation.selection import EXPORTED, bottom_selection, exported_set, plan, random_selection


def test_random_k_draws_the_same_counts_from_the_same_tensors_outside_the_critical_set():
    counts, sizes = {"a": 3, "b": 5}, {"a": 10, "b": 100_000}
    avoid = {"a": np.arange(5, dtype=np.int64), "b": np.array([7], dtype=np.int64)}
    sel = random_selection(counts, sizes, avoid, seed=42, label=8)
    assert list(sel) == ["a", "b"]
    for name, idx in sel.items():
        assert len(idx) == counts[name] == len(set(idx.tolist()))
        assert ((0 <= idx) & (idx < sizes[name])).all()
        assert not np.isin(idx, avoid[name]).any()
        assert (np.diff(idx) > 0).all()
    again = random_selection(counts, sizes, avoid, seed=42, label=8)
    assert all(np.array_equal(sel[n], again[n]) for n in sel)
    assert not np.array_equal(sel["b"], random_selection(counts, sizes, avoid, seed=43, label=8)["b"])
    assert not np.array_equal(sel["b"], random_selection(counts, sizes, avoid, seed=42, label=8, draw=1)["b"])


def test_random_k_in_a_tensor_too_small_raises():
    with pytest.raises(ModelError, match="parameter a has 2 weights outside the critical set, fewer than 3"):
        random_selection({"a": 3}, {"a": 5}, {"a": np.arange(3, dtype=np.int64)}, seed=0, label=3)


def test_bottom_k_takes_the_least_sensitive_rows_of_each_tensor():
    bottom = pa.table({"parameter": ["a", "a", "a", "b", "b"], "rank": [2, 1, 3, 1, 2],
                       "flat_index": [40, 90, 10, 5, 6]})
    sel = bottom_selection(bottom, {"a": 2, "b": 1})
    assert {n: i.tolist() for n, i in sel.items()} == {"a": [40, 90], "b": [5]}
    with pytest.raises(ShardError, match="the bottom shard of b holds 2 weights, fewer than 3"):
        bottom_selection(bottom, {"b": 3})


def dense_scores(sens, metric: str) -> dict[str, np.ndarray]:
    stats = shards.read_stats(sens)
    out = {}
    for row in stats.filter(pa.compute.equal(stats["metric"], metric)).to_pylist():
        t = shards.read_dense(sens, row["param_index"], row["parameter"])
        out[row["parameter"]] = t.filter(pa.compute.equal(t["metric"], metric))["score"].to_numpy()
    return out


def as_lists(sel) -> dict[str, list[int]]:
    return {n: i.tolist() for n, i in sel.items()}


def test_plan_perturbs_the_global_top_k_and_controls_with_matching_counts(validate_run):
    _, sens, ranked, params = validate_run
    exported = exported_set(*read_ranked(ranked), params.rank)
    the_plan = plan(sens, params.rank, params.validate, params.seed, exported)
    top = rank_metric(sens, dataclasses.replace(params.rank, mode="global", k=20))
    scores = dense_scores(sens, params.rank.metric)
    every = np.sort(np.concatenate(list(scores.values())))[::-1]
    for k in (1, 5, 20):
        g = the_plan.groups[f"k{k}"]
        assert sorted((n, int(i)) for n, idx in g.critical.items() for i in idx) == sorted(
            (r["parameter"], r["flat_index"]) for r in top.slice(0, k).to_pylist())
        chosen = np.sort([scores[n][i] for n, idx in g.critical.items() for i in idx])[::-1]
        assert np.array_equal(chosen, every[:k]), "the critical weights are the k highest scores of the model"
        assert len(g.random_k) == params.validate.random_draws
        for sel in [*g.random_k, g.bottom_k]:
            assert {n: len(i) for n, i in sel.items()} == {n: len(i) for n, i in g.critical.items()}
        for sel in g.random_k:
            assert all(not np.isin(idx, g.critical[n]).any() for n, idx in sel.items())
        assert len({str(as_lists(s)) for s in g.random_k}) == len(g.random_k), "draws are independent"
        for name, idx in g.bottom_k.items():
            assert np.array_equal(np.sort(scores[name][idx]), np.sort(scores[name])[: len(idx)]), name
    g = the_plan.groups[EXPORTED]
    assert g.n_weights == exported.num_rows == 3 * len(scores), "per_tensor: rank.k weights in every tensor"
    assert all(len(i) == 3 for i in g.critical.values())


def test_plan_is_deterministic_and_only_random_k_depends_on_the_seed(validate_run):
    _, sens, _, params = validate_run
    a, b, c = (plan(sens, params.rank, params.validate, s) for s in (42, 42, 43))
    for k in (1, 5, 20):
        for x, y in ((a, b), (a, c)):
            assert as_lists(x.groups[f"k{k}"].critical) == as_lists(y.groups[f"k{k}"].critical)
            assert as_lists(x.groups[f"k{k}"].bottom_k) == as_lists(y.groups[f"k{k}"].bottom_k)
        assert [as_lists(s) for s in a.groups[f"k{k}"].random_k] == [as_lists(s) for s in b.groups[f"k{k}"].random_k]
    assert as_lists(a.groups["k20"].random_k[0]) != as_lists(c.groups["k20"].random_k[0])


def test_plan_respects_include_and_exclude(validate_run):
    _, sens, _, params = validate_run
    rank = dataclasses.replace(params.rank, include=("model.layers.*",), exclude=("*mlp*",))
    for g in plan(sens, rank, params.validate, params.seed).groups.values():
        for sel in g.all():
            assert all(n.startswith("model.layers.") and "mlp" not in n for n in sel)


def test_an_exported_set_made_with_other_params_is_refused(validate_run):
    _, _, ranked, params = validate_run
    table, info = read_ranked(ranked)
    with pytest.raises(ShardError, match=r"the ranked critical set was made with rank .*not the params' metric "
                                         r"'grad_x_weight', mode 'per_tensor', k 7; rerun the rank stage \(dvc repro\)"):
        exported_set(table, info, dataclasses.replace(params.rank, k=7))
