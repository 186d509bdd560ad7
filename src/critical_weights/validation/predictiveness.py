"""How well each computed metric predicts the loss change it claims to rank.

Two tests, both by zeroing weights and measuring the loss on the primary texts:
- **single weights**: `validate.single_weights` weights drawn with `seed` from the
  candidates of every computed metric (equal shares per metric, at global ranks drawn with
  probability 1/rank, so the sample spans the measurable top and the long tail), zeroed one
  at a time. Per metric, the Spearman correlation between its score and the measured loss
  increase, over the sampled weights whose score it knows (every metric knows its own
  candidates; `grad_x_weight`, `gradient` and `magnitude` follow from the weight and its
  gradient, which every candidate row holds).
- **top-k**: each metric's own global top-k zeroed, for every k in `validate.k_values`: the
  metric whose top-k hurts most finds the critical weights best. For grad_x_weight (first
  order) and taylor2 / hutchinson (second order), whose scores are predicted loss changes,
  `predicted` is the sum of the top-k scores, to set beside the measured change.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from critical_weights.artifacts import shards
from critical_weights.config.params import RankParams
from critical_weights.core.streams import STREAM_SAMPLE
from critical_weights.ranking import topk
from critical_weights.validation.damage import Context, perturb_and_measure
from critical_weights.validation.selection import group

log = logging.getLogger(__name__)

# metrics whose score is itself a predicted loss change of zeroing the weight (up to sign)
PREDICTS_LOSS_CHANGE = ("grad_x_weight", "taylor2", "hutchinson")
# metrics whose score follows from the weight w and its gradient g alone (float32, as scored)
_FROM_W_G = {
    "grad_x_weight": lambda w, g: abs(np.float32(w) * np.float32(g)),
    "gradient": lambda w, g: abs(np.float32(g)),
    "magnitude": lambda w, g: abs(np.float32(w)),
}


def candidates_by_metric(sensitivity: Path, rank: RankParams) -> dict[str, pa.Table]:
    """Every candidate of every computed metric, globally ranked (within include/exclude)."""
    keep = shards.read_meta(sensitivity)["keep"]
    return topk.rank_every_metric(sensitivity, replace(rank, mode="global", k=keep))


def sample(tables: dict[str, pa.Table], n: int, seed: int) -> list[dict[str, Any]]:
    """About `n` distinct weights, an equal share from each metric's ranking, ranks drawn
    with probability proportional to 1/rank, in metric then rank order."""
    rng = np.random.default_rng([seed, STREAM_SAMPLE])
    share = -(-n // max(1, len(tables)))  # ceil
    chosen: dict[tuple[str, int], dict[str, Any]] = {}
    for metric, table in tables.items():
        m = min(share, table.num_rows)
        p = 1.0 / np.arange(1, table.num_rows + 1)
        for pos in np.sort(rng.choice(table.num_rows, size=m, replace=False, p=p / p.sum())):
            r = table.slice(int(pos), 1).to_pylist()[0]
            chosen.setdefault((r["parameter"], r["flat_index"]), {
                "parameter": r["parameter"], "flat_index": r["flat_index"], "row": r["row"], "col": r["col"],
                "weight": r["weight"], "gradient": r["gradient"], "drawn_from": metric, "rank_drawn": int(pos) + 1})
    return list(chosen.values())[:n]


def scores_of(weights: list[dict[str, Any]], tables: dict[str, pa.Table]) -> dict[str, list[float | None]]:
    """Per metric, the score of each weight (None where the metric does not know it)."""
    out = {}
    for metric, table in tables.items():
        known = dict(zip(zip(table["parameter"].to_pylist(), table["flat_index"].to_pylist()), table["score"].to_pylist()))
        out[metric] = [known.get((w["parameter"], w["flat_index"]),
                                 float(_FROM_W_G[metric](w["weight"], w["gradient"])) if metric in _FROM_W_G else None)
                       for w in weights]
    return out


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (ties averaged); None with fewer than 3 pairs or a constant side."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def single_weights(ctx: Context, tables: dict[str, pa.Table], order: list[str]) -> dict[str, Any]:
    """Zero each sampled weight alone; Spearman of each metric's score against the measured increase."""
    primary = ctx.sets.primary
    weights = sample(tables, ctx.vp.single_weights, ctx.seed)
    for i, w in enumerate(weights):
        sel = group([w["parameter"]], np.array([w["flat_index"]], np.int64), order)
        rec = perturb_and_measure(ctx, sel, "zero", (1000 + i, 0, 0), [primary])
        w["loss_increase"] = rec[primary]["loss_increase"]
    scores = scores_of(weights, tables)
    for i, w in enumerate(weights):
        w["scores"] = {m: scores[m][i] for m in tables}
    per_metric = {}
    for m in tables:
        pairs = [(s, w["loss_increase"]) for s, w in zip(scores[m], weights) if s is not None and w["loss_increase"] is not None]
        per_metric[m] = {"spearman": spearman([p[0] for p in pairs], [p[1] for p in pairs]), "n_weights": len(pairs)}
    return {"text_set": primary, "n_weights": len(weights), "metrics": per_metric, "weights": weights}


def top_k(ctx: Context, tables: dict[str, pa.Table], order: list[str], known: dict[str, dict[int, float | None]]) -> dict[str, Any]:
    """Each metric's global top-k zeroed: measured and predicted loss change per k.

    `known[metric][k]` reuses an increase the damage measurement already has."""
    primary = ctx.sets.primary
    out: dict[str, Any] = {}
    for mi, (metric, table) in enumerate(tables.items()):
        out[metric] = {}
        for k in ctx.vp.k_values:
            head = table.slice(0, k)
            inc = known.get(metric, {}).get(k, "unknown")
            if inc == "unknown":
                sel = group(head["parameter"].to_pylist(), head["flat_index"].to_numpy(), order)
                inc = perturb_and_measure(ctx, sel, "zero", (2000 + mi, k, 0), [primary])[primary]["loss_increase"]
            out[metric][f"k{k}"] = {"loss_increase": inc}
            if metric in PREDICTS_LOSS_CHANGE:
                out[metric][f"k{k}"]["predicted"] = float(np.sum(head["score"].to_numpy(), dtype=np.float64))
    return {"text_set": primary, "metrics": out}
