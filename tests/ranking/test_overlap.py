"""Agreement of critical sets: Jaccard and Spearman of shared ranks, against hand-worked values."""

from __future__ import annotations

import pyarrow as pa
import pytest

from critical_weights.ranking.overlap import agreement, jaccard, metric_overlap, spearman_shared


def _table(rows: list[tuple[str, int, float]]) -> pa.Table:
    names, flat, score = zip(*rows)
    return pa.table({"parameter": list(names), "flat_index": list(flat), "score": list(score)})


def test_jaccard_counts_shared_over_union() -> None:
    a = [("w", 1), ("w", 2), ("w", 3)]
    b = [("w", 2), ("w", 3), ("w", 4), ("v", 1)]
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard([], []) == 1.0


def test_spearman_of_shared_ranks() -> None:
    a = [("w", 1), ("w", 2), ("w", 3), ("w", 9)]
    assert spearman_shared(a, a) == pytest.approx(1.0)
    assert spearman_shared(a, list(reversed(a))) == pytest.approx(-1.0)
    assert spearman_shared(a, [("w", 3), ("w", 7)]) is None  # one shared weight


def test_agreement_overall_and_per_tensor() -> None:
    a = _table([("w", 1, 0.9), ("w", 2, 0.8), ("v", 5, 0.7)])
    b = _table([("w", 2, 0.5), ("w", 1, 0.4), ("v", 6, 0.3)])
    got = agreement(a, b)
    assert got["jaccard"] == pytest.approx(2 / 4)
    assert got["n_shared"] == 2
    assert got["per_tensor"]["w"]["jaccard"] == 1.0
    assert got["per_tensor"]["w"]["spearman"] == pytest.approx(-1.0)
    assert got["per_tensor"]["v"] == {"jaccard": 0.0, "spearman": None, "n_a": 1, "n_b": 1, "n_shared": 0}
    assert agreement(a, a)["jaccard"] == 1.0


def test_metric_overlap_covers_every_pair_once() -> None:
    t = _table([("w", 1, 1.0), ("w", 2, 0.5)])
    pairs = metric_overlap({"a": t, "b": t, "c": t})
    assert sorted(pairs) == ["a vs b", "a vs c", "b vs c"]
