"""Metric predictiveness: Spearman as defined, a seeded sample from every metric's candidates,
scores as the shards hold them, and measured increases equal to an independent measurement."""

from __future__ import annotations

import numpy as np
import pytest

from critical_weights.artifacts import shards
from critical_weights.validation.predictiveness import candidates_by_metric, sample, scores_of, spearman


def test_spearman_matches_its_definition_with_ties_averaged():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    x, y = [1.0, 2.0, 2.0, 5.0, 7.0], [3.0, 1.0, 4.0, 4.0, 9.0]
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3.5, 3.5, 5])  # average ranks, by hand
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_the_sample_is_seeded_distinct_and_drawn_from_every_metric(validate_run):
    _, sens, _, params = validate_run
    tables = candidates_by_metric(sens, params.rank)
    assert set(tables) == {"grad_x_weight", "magnitude", "fisher"}
    a, b, c = sample(tables, 9, 42), sample(tables, 9, 42), sample(tables, 9, 43)
    assert a == b and a != c
    keys = [(w["parameter"], w["flat_index"]) for w in a]
    assert len(keys) == len(set(keys)) <= 9
    assert {w["drawn_from"] for w in a} == set(tables)
    for w in a:
        t = tables[w["drawn_from"]]
        assert t.slice(w["rank_drawn"] - 1, 1).to_pylist()[0]["flat_index"] == w["flat_index"]


def test_scores_are_the_shards_scores(validate_run):
    _, sens, _, params = validate_run
    tables = candidates_by_metric(sens, params.rank)
    weights = sample(tables, 12, 1)
    scores = scores_of(weights, tables)
    stats = shards.read_stats(sens)
    index = dict(zip(stats["parameter"].to_pylist(), stats["param_index"].to_pylist()))
    for i, w in enumerate(weights):
        dense = shards.read_dense(sens, index[w["parameter"]], w["parameter"]).to_pylist()
        for metric in tables:
            want = next(r["score"] for r in dense if r["metric"] == metric and r["flat_index"] == w["flat_index"])
            got = scores[metric][i]
            if got is None:  # a metric knows only its candidates; fisher is not derived from w and g
                assert metric == "fisher"
                continue
            assert np.float32(got) == np.float32(want), (metric, w)
