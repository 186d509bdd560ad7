"""Agreement between two critical sets: Jaccard index and Spearman correlation of shared ranks.

A critical weight is identified by (parameter, flat_index). Used for metric agreement
(`reports/metric_overlap.json`) and for comparing two runs (`critical-weights-compare`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pyarrow as pa

Key = tuple[str, int]


def keys(table: pa.Table) -> list[Key]:
    """(parameter, flat_index) of each row, in ranked order."""
    return list(zip(table["parameter"].to_pylist(), table["flat_index"].to_pylist()))


def jaccard(a: Sequence[Key], b: Sequence[Key]) -> float:
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def spearman_shared(a: Sequence[Key], b: Sequence[Key]) -> float | None:
    """Spearman correlation of the positions of the weights both lists hold; None if < 2 shared."""
    pos_b = {k: i for i, k in enumerate(b)}
    shared = [(i, pos_b[k]) for i, k in enumerate(a) if k in pos_b]
    if len(shared) < 2:
        return None
    ra = np.argsort(np.argsort([s[0] for s in shared])).astype(np.float64)
    rb = np.argsort(np.argsort([s[1] for s in shared])).astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _by_tensor(ks: Sequence[Key]) -> dict[str, list[Key]]:
    groups: dict[str, list[Key]] = {}
    for k in ks:
        groups.setdefault(k[0], []).append(k)
    return groups


def agreement(a: pa.Table, b: pa.Table) -> dict[str, Any]:
    """Overall and per-tensor Jaccard and Spearman of two ranked tables.

    Overall, each table is ordered by its own score (descending); per tensor, by its rows' order.
    """
    ka, kb = keys(sort_by_score(a)), keys(sort_by_score(b))
    ga, gb = _by_tensor(ka), _by_tensor(kb)
    per_tensor = {}
    for name in sorted(set(ga) | set(gb)):
        ta, tb = ga.get(name, []), gb.get(name, [])
        per_tensor[name] = {"jaccard": jaccard(ta, tb), "spearman": spearman_shared(ta, tb),
                            "n_a": len(ta), "n_b": len(tb), "n_shared": len(set(ta) & set(tb))}
    return {"jaccard": jaccard(ka, kb), "spearman": spearman_shared(ka, kb),
            "n_a": len(ka), "n_b": len(kb), "n_shared": len(set(ka) & set(kb)), "per_tensor": per_tensor}


def metric_overlap(ranked_by_metric: dict[str, pa.Table]) -> dict[str, Any]:
    """Agreement for every pair of metrics, keyed "a vs b"."""
    return {f"{a} vs {b}": agreement(ranked_by_metric[a], ranked_by_metric[b])
            for a, b in combinations(ranked_by_metric, 2)}


def sort_by_score(table: pa.Table) -> pa.Table:
    """Rows by score descending, then parameter and flat index: one order for any table."""
    return table.sort_by([("score", "descending"), ("parameter", "ascending"), ("flat_index", "ascending")])
