"""What the user gets: the critical weights as CSV, statistics, a manifest and DVC metrics."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import unicodedata
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from critical_weights import __version__
from critical_weights.artifacts import shards
from critical_weights.artifacts.prepared_texts import read_prepared_meta
from critical_weights.artifacts.ranked_file import read_ranked
from critical_weights.artifacts.sums import SumsWriter
from critical_weights.config.params import RankParams
from critical_weights.core.outputs import atomic_path, csv_text, write_json, write_text
from critical_weights.ranking.overlap import metric_overlap
from critical_weights.ranking.topk import Place, rank_every_metric
from critical_weights.reports.experts import expert_importance

CSV_COLUMNS = ("global_rank", "group_rank", "parameter", "block", "component", "expert", "row", "col", "flat_index",
               "score", "weight", "gradient", "metric", "token_id", "token")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
CRITICAL_MASK = "critical_mask.safetensors"
VERSIONED = ("torch", "transformers", "dvc", "numpy", "pyarrow", "pandas", "matplotlib", "gguf", "tokenizers")


def escaped(token: str | None) -> str | None:
    """A token on one line: backslash, newline, carriage return and tab as \\\\, \\n, \\r, \\t, any
    other control or line-separator character as \\uXXXX; every other character as it is."""
    if token is None:
        return None
    return "".join(_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c)
                   for c in token)


def critical_csv(ranked: pa.Table, places: dict[str, Place]) -> str:
    """One row per critical weight, with exactly CSV_COLUMNS, best first over the whole set
    (score descending, then flat index, then parameter order: the ranking's own order, so
    `global_rank` 1 is the global top weight); `group_rank` is its rank within its rank.mode
    group. `places` gives each parameter's (block, component), in model order. `token_id` is
    the row of an embedding or output-head weight, the token it belongs to."""
    order = {name: i for i, name in enumerate(places)}
    rows = sorted(ranked.to_pylist(), key=lambda r: (-r["score"], r["flat_index"], order[r["parameter"]]))
    out = []
    for i, r in enumerate(rows, start=1):
        block, component = places[r["parameter"]]
        row = {**r, "global_rank": i, "group_rank": r["rank"], "block": block, "component": component,
               "token_id": r["row"] if r["token"] is not None else None, "token": escaped(r["token"])}
        out.append([row[c] for c in CSV_COLUMNS])
    return csv_text(CSV_COLUMNS, out)


def parameter_stats(stats: pa.Table) -> dict[str, Any]:
    """Per parameter: shape, block, component and, per metric, the exact statistics."""
    out: dict[str, Any] = {}
    for r in stats.drop_columns(["hist", "grid", "grid_rows", "grid_cols", "expert_sum", "expert_max"]).to_pylist():
        entry = out.setdefault(r["parameter"], {
            "index": r["param_index"], "shape": r["shape"], "n_weights": r["count"],
            "block": r["block"], "component": r["component"], "layout": r["layout"],
            "n_experts": r["n_experts"], "metrics": {},
        })
        entry["metrics"][r["metric"]] = {k: r[k] for k in ("count", "sum", "mean", "std", "min", "max", "zeros", "negatives")}
    return out


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "critical_weights": __version__}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def concentration(ranked: pa.Table) -> dict[str, Any]:
    """Per tensor, how concentrated its critical weights are in a few columns or rows.

    `top_col_share` is the share of the tensor's critical weights in its most frequent input
    column (the super-weight signature is one column holding most of them).
    """
    out = {}
    for name in dict.fromkeys(ranked["parameter"].to_pylist()):
        part = ranked.filter(pc.equal(ranked["parameter"], name))
        n = part.num_rows
        out[name] = {}
        for axis in ("col", "row"):
            counts = pc.value_counts(part[axis]).to_pylist()
            best = max(counts, key=lambda c: (c["counts"], -c["values"]))
            out[name][f"top_{axis}"] = best["values"]
            out[name][f"top_{axis}_share"] = best["counts"] / n
            out[name][f"distinct_{axis}s"] = len(counts)
    return out


def critical_summary(ranked: pa.Table, metric_stats: pa.Table, rank: dict[str, Any]) -> dict[str, Any]:
    """The critical set against every score of the ranked metric.

    `share_of_total_score` is the critical scores' sum over the sum of every score of every
    scored weight: how much of the total sensitivity the critical set holds. `min_score` is
    the lowest critical score; outside `global` mode each group has its own cut-off."""
    total_sum = sum(metric_stats["sum"].to_pylist())
    scores = ranked["score"].to_numpy().astype("float64")  # (n_critical,)
    return {
        "metric": rank["metric"], "mode": rank["mode"], "k": rank["k"], "n_critical": ranked.num_rows,
        "min_score": float(scores.min()) if len(scores) else None,
        "mean_score_all_weights": total_sum / max(1, sum(metric_stats["count"].to_pylist())),
        "share_of_total_score": float(scores.sum() / total_sum) if total_sum else None,
    }


def critical_mask(path: Path, ranked: pa.Table, stats: pa.Table, meta: dict[str, Any], rank: dict[str, Any]) -> None:
    """critical_mask.safetensors: the critical set as a mask, keyed by the model's own parameter
    names, one bit per weight of the stored shape (1 = critical), packed along the last axis in
    little bit order as masks.safetensors is, (..., ceil(last / 8)) uint8. Only tensors that hold
    a critical weight are in it; every other tensor's mask would be all 0. Set bit by bit from
    the flat indices, so no unpacked mask is ever held (an 8B embedding's is 65 MB packed)."""
    shapes = {r["parameter"]: tuple(r["shape"]) for r in stats.select(["parameter", "shape"]).to_pylist()}
    flat = ranked["flat_index"].to_numpy().astype(np.int64)
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(ranked["parameter"].to_pylist()):
        rows_of.setdefault(name, []).append(i)
    held = [name for name in shapes if name in rows_of]  # parameter order
    packed = {n: (*shapes[n][:-1], -(-shapes[n][-1] // 8)) if len(shapes[n]) else (1,) for n in held}
    model = meta.get("model", {})
    header = {"format": "critical-weights/critical-mask/1", "metric": str(rank["metric"]), "mode": str(rank["mode"]),
              "k": str(rank["k"]), "n_critical": str(ranked.num_rows),
              "bits": "1 = critical; little bit order along the last axis; tensors without a critical weight left out",
              "shapes": json.dumps({n: list(shapes[n]) for n in held}, sort_keys=True, separators=(",", ":")),
              "text_sha256": str(meta.get("text_sha256")), "model": str(model.get("name"))}
    writer = SumsWriter(path, packed, header, dtype="U8")
    try:
        for name in held:
            last = shapes[name][-1] if shapes[name] else 1
            at = flat[rows_of[name]]
            row, col = np.divmod(at, last)
            bits = np.zeros(math.prod(packed[name]), dtype=np.uint8)
            np.bitwise_or.at(bits, row * packed[name][-1] + col // 8, (1 << (col % 8)).astype(np.uint8))
            writer.write(name, bits.reshape(packed[name]))
    finally:
        writer.close()


def run_export(sensitivity: Path, ranked_dir: Path, prepared: Path, reports: Path) -> None:
    """Write critical_weights.csv, critical_mask.safetensors, sensitivity_stats.json,
    metric_overlap.json, manifest.json and metrics.json."""
    meta = shards.read_meta(sensitivity)
    stats = shards.read_stats(sensitivity)
    ranked, rank_info = read_ranked(ranked_dir)
    metric = rank_info["rank"]["metric"]
    csv_text = critical_csv(ranked, shards.places(stats))
    write_text(reports / "critical_weights.csv", csv_text)
    with atomic_path(reports / CRITICAL_MASK) as tmp:
        critical_mask(tmp, ranked, stats.filter(pc.equal(stats["metric"], metric)), meta, rank_info["rank"])

    metric_stats = stats.filter(pc.equal(stats["metric"], metric))
    totals = {
        "n_tensors": meta["n_parameters"], "n_weights": meta["n_weights"],
        "n_texts": meta["n_sequences"], "n_tokens": meta["n_tokens"],
        "loss_prepared": meta["avg_loss"], "perplexity_prepared": meta["perplexity"],
    }
    write_json(reports / "sensitivity_stats.json", {
        "totals": totals, "metrics": meta["metrics"], "ranked_metric": metric,
        "critical_set": critical_summary(ranked, metric_stats, rank_info["rank"]),
        "parameters": parameter_stats(stats), "concentration": concentration(ranked),
        "wanda_skipped": meta.get("wanda_skipped", {}),
        "experts": {"metric": metric, "layers": expert_importance(meta, stats, ranked, metric)},
    })
    rank_params = RankParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in rank_info["rank"].items()})
    write_json(reports / "metric_overlap.json", {
        "rank": rank_info["rank"], "metrics": meta["metrics"],
        "pairs": metric_overlap(rank_every_metric(sensitivity, rank_params)),
    })
    prep_meta = read_prepared_meta(prepared)
    write_json(reports / "manifest.json", {
        "params": {**meta["params"], "texts": json.loads(prep_meta["params"])["texts"], "rank": rank_info["rank"]},
        "model": meta["model"],
        "texts": {"source": prep_meta["source"], "n_available": int(prep_meta["n_available"]),
                  "n_texts": int(prep_meta["n_texts"]), "token_sha256": prep_meta["text_sha256"]},
        "critical_weights_csv_sha256": hashlib.sha256(csv_text.encode()).hexdigest(),
        "versions": versions(),
    })
    write_json(reports / "metrics.json", {
        **totals, "n_critical": ranked.num_rows, "max_score": float(pc.max(metric_stats["max"]).as_py()),
    })
