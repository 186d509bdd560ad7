"""Mixture-of-Experts reports: how important each expert of each MoE layer is.

Per layer and expert, from the shards alone (torch-free):
- `sum` and `max`: of the expert's scores by the ranked metric, over every expert tensor of
  the layer (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`, ...);
- `critical`, `critical_share` and `critical_share_in_layer`: how many of the ranked critical
  weights are the expert's, and their share of the whole critical set and of the critical
  weights in the layer's expert tensors;
- `router_picks` and `router_share`: how many real tokens of the texts the router sent to the
  expert, and their share of the tokens (the shares of one layer sum to its top-k).

This is what analyses of "super experts" start from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def layer_scores(meta: dict[str, Any], stats: pa.Table, metric: str) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """Per MoE layer of the shards' meta, in order: its expert tensors, and per expert the sum
    and the max of `metric`'s scores over them ((E,) float64 each)."""
    rows = [r for r in stats.select(["parameter", "metric", "n_experts", "expert_sum", "expert_max"]).to_pylist()
            if r["metric"] == metric and r["n_experts"]]
    out = []
    for layer in meta.get("moe_layers", []):
        path, n = layer["experts"], layer["n_experts"]
        tensors = [r for r in rows if r["parameter"].startswith(path + ".") and r["n_experts"] == n]
        total, top = np.zeros(n), np.full(n, -np.inf)
        for r in tensors:
            if len(r["expert_sum"]) == n:
                total += np.asarray(r["expert_sum"])
                top = np.maximum(top, np.asarray(r["expert_max"]))
        out.append(([r["parameter"] for r in tensors], total, top))
    return out


def expert_importance(meta: dict[str, Any], stats: pa.Table, ranked: pa.Table, metric: str) -> list[dict[str, Any]]:
    """One entry per MoE layer of the model (none for a dense model), in model order."""
    n_critical = ranked.num_rows
    names = ranked["parameter"].to_pylist()
    experts_col = ranked["expert"].to_pylist()
    out = []
    for layer, (tensors, total, top) in zip(meta.get("moe_layers", []), layer_scores(meta, stats, metric)):
        path, n = layer["experts"], layer["n_experts"]
        owned = set(tensors)
        critical = np.zeros(n, dtype=np.int64)
        for name, e in zip(names, experts_col):
            if name in owned and e is not None:
                critical[e] += 1
        in_layer = int(critical.sum())
        picks = layer["router_picks"]
        tokens = layer["tokens"]
        out.append({
            "block": layer["block"], "experts": path, "router": layer["router"], "n_experts": n,
            "tensors": tensors, "tokens": tokens,
            "per_expert": [{
                "expert": e, "sum": float(total[e]), "max": float(top[e]) if tensors else None,
                "critical": int(critical[e]), "critical_share": critical[e] / n_critical if n_critical else 0.0,
                "critical_share_in_layer": critical[e] / in_layer if in_layer else 0.0,
                "router_picks": int(picks[e]), "router_share": picks[e] / tokens if tokens else 0.0,
            } for e in range(n)],
        })
    return out


CSV_HEADER = ("block", "experts", "expert", "metric", "sum", "max", "critical", "critical_share",
              "critical_share_in_layer", "router_picks", "router_share")


def importance_rows(layers: list[dict[str, Any]], metric: str) -> list[list[Any]]:
    """Long-format rows (CSV_HEADER) of `expert_importance`'s result."""
    return [[layer["block"], layer["experts"], e["expert"], metric, e["sum"], e["max"], e["critical"],
             e["critical_share"], e["critical_share_in_layer"], e["router_picks"], e["router_share"]]
            for layer in layers for e in layer["per_expert"]]
