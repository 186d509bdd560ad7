"""critical_weights.domains.sets on the grouped tiny run: exact top-N sets, Jaccard and
Spearman for every pair, and specific weights that no other group's top-N holds, with a
specificity read from the other groups' candidates."""

from __future__ import annotations

import math

import pytest

from critical_weights.domains import sets
from critical_weights.domains.gradients import folder_name


def test_jaccard():
    assert sets.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5 and sets.jaccard(set(), set()) == 1.0


@pytest.fixture(scope="module")
def critical(grouped):
    report, out, params, _, folder = grouped
    names = [g["name"] for g in report["groups"]["shown"]]
    return [sets.critical_of(n, folder / folder_name(i, n), params.rank, 12, 4) for i, n in enumerate(names)]


def test_each_set_is_its_groups_top_n_best_first_with_its_place(critical):
    for c in critical:
        assert c.top.num_rows == 12
        scores = c.top["score"].to_pylist()
        assert scores == sorted(scores, reverse=True)
        assert {"block", "component"} <= set(c.top.column_names)
        top_in_candidates = max(s for s in c.candidates["score"].to_pylist())
        assert scores[0] == top_in_candidates


def test_overlap_covers_every_ordered_pair_and_is_symmetric(critical):
    rows = sets.overlap(critical)
    assert len(rows) == 6
    by = {(r["a"], r["b"]): r for r in rows}
    for (a, b), r in by.items():
        assert r == {**by[(b, a)], "a": a, "b": b}
        assert 0 <= r["jaccard_top"] <= 1 and -1 <= r["spearman_tensor_sums"] <= 1
        assert r["jaccard_top"] == sets.jaccard(next(c for c in critical if c.name == a).keys(),
                                                next(c for c in critical if c.name == b).keys())


def test_specific_weights_are_in_no_other_top_n_and_their_specificity_is_the_score_ratio(critical):
    spec = sets.specific(critical)
    for c in critical:
        others = set().union(*(o.keys() for o in critical if o is not c))
        mine = spec[c.name]["weights"]
        assert {(r["parameter"], r["flat_index"]) for r in mine} == c.keys() - others
        for r in mine:
            key = (r["parameter"], r["flat_index"])
            exact = [s for o in critical if o is not c
                     for p, f, s in zip(o.candidates["parameter"].to_pylist(), o.candidates["flat_index"].to_pylist(),
                                        o.candidates["score"].to_pylist()) if (p, f) == key]
            assert r["largest_other_score"] > 0
            assert math.isclose(r["specificity"], r["score"] / r["largest_other_score"], rel_tol=1e-12)
            if not r["bounded"]:
                assert r["largest_other_score"] == max(exact)


def test_shared_weights_are_in_every_groups_top_n_with_each_groups_score(critical):
    shared = sets.shared(critical)
    common = set.intersection(*(c.keys() for c in critical))
    assert {(r["parameter"], r["flat_index"]) for r in shared} == common
    for r in shared:
        for c in critical:
            row = next(x for x in c.top.to_pylist() if (x["parameter"], x["flat_index"]) == (r["parameter"], r["flat_index"]))
            assert r["score"][c.name] == row["score"]
