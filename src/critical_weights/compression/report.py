"""What `compress` writes: the full report, its DVC-metrics headline, the long table behind
the DVC plot and the perplexity-against-sparsity figure."""

from __future__ import annotations

import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from critical_weights.config.params import Params  # noqa: E402
from critical_weights.core.outputs import csv_text  # noqa: E402
from critical_weights.sensitivity.loss import predicted_tokens  # noqa: E402

TABLE_COLUMNS = ["metric", "series", "structure", "group", "sparsity", "sparsity_reached", "loss", "perplexity",
                 "loss_increase", "top1_agreement", "saturated"]


def json_text(value: Any) -> str:
    """A value as compact, key-sorted JSON (for safetensors' string-only metadata)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def protocol(params: Params, which: str, ids: list[list[int]]) -> dict[str, Any]:
    """How every perplexity of the compression stages is measured."""
    return {"texts": which, "source": params.texts.source, "n_texts": len(ids), "n_tokens": predicted_tokens(ids),
            "context": params.texts.max_length, "windows": False, "stride": None,
            "loss": "mean next-token cross-entropy over every predicted token (validate's own loss code)"}


def ln_vocab_of(meta: dict[str, Any]) -> float | None:
    """ln V of the model's vocabulary: past it a loss is worse than a uniform guess."""
    vocab = meta.get("model", {}).get("vocab_size")
    return math.log(vocab) if vocab else None


def build_report(params: Params, meta: dict[str, Any], tensors: list, n_weights: int, already_zero: int, which: str,
                 ids: list[list[int]], baseline: float, sets: list[str], rows: list[dict[str, Any]],
                 export: tuple | None) -> dict[str, Any]:
    """Everything the stage measured, with the protocol every perplexity was measured under."""
    ln_vocab = ln_vocab_of(meta)
    for r in rows:
        r["saturated"] = not r["finite"] or (ln_vocab is not None and r["loss"] > ln_vocab)
        r["series"] = f"{r['structure']} {r['group']}" if r["structure"] == "unstructured" else r["structure"]
    exported = None
    if export is not None:
        metric, structure, group, sparsity = export
        hit = next(r for r in rows if (r["metric"], r["structure"], r["group"], r["sparsity"]) == export)
        exported = {"file": "masks.safetensors", "metric": metric, "structure": structure, "group": group,
                    "sparsity": sparsity, "loss": hit["loss"], "perplexity": hit["perplexity"],
                    "top1_agreement": hit["top1_agreement"]}
    return {
        "protocol": protocol(params, which, ids),
        "baseline": {"loss": baseline, "perplexity": math.exp(baseline), "ln_vocab": ln_vocab},
        "pruned": {
            "tensors": [t.name for t in tensors], "n_tensors": len(tensors), "n_weights": n_weights,
            "already_zero": already_zero,
            "which": ("compress.include: " + ", ".join(params.compress.include)) if params.compress.include
            else "every weight tensor of ndim >= 2 inside the blocks (not the embedding, not the head)",
            "counting": "a weight already zero counts as pruned when its mask chooses it; sparsity_reached is the "
                        "share of the pruned tensors' weights that are zero afterwards, those already zero included",
        },
        "sets": sets,
        "notes": {
            "wanda": "activations from one pass of the dense model over the prepared texts (the sensitivity "
                     "stage's sums of x^2), not the paper's block-by-block pass through the pruned model",
            "random": "uniform scores drawn with seed, one stream per tensor",
            "magnitude": "|w|, compared within the same group as every other set",
            "ties": "lowest score pruned first; equal scores in (row, col) order, row the output unit",
        },
        "settings": {"sparsities": list(params.compress.sparsities), "structures": list(params.compress.structures),
                     "groups": list(params.compress.groups), "mask_sparsity": params.compress.mask_sparsity,
                     "seed": params.seed, "rank_metric": params.rank.metric},
        "table": rows,
        "exported_masks": exported,
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """DVC metrics: the baseline, then per set the perplexity at 50% per row and at 2:4."""
    out: dict[str, Any] = {"loss_heldout" if report["protocol"]["texts"] == "heldout" else "loss_in_sample":
                           report["baseline"]["loss"], "perplexity_baseline": report["baseline"]["perplexity"]}
    for r in report["table"]:
        key = None
        if r["structure"] == "unstructured" and r["group"] == "per_row" and r["sparsity"] == 0.5:
            key = f"{r['metric']}_ppl_50_per_row"
        elif r["structure"] == "2:4":
            key = f"{r['metric']}_ppl_2_4"
        if key is not None and key not in out:
            out[key] = r["perplexity"]
    return out


def table_csv(report: dict[str, Any]) -> str:
    """Long format, one row per set and mask, in the order measured."""
    return csv_text(TABLE_COLUMNS, [[r[c] for c in TABLE_COLUMNS] for r in report["table"]])


def figure(report: dict[str, Any]) -> Figure:
    """Perplexity against sparsity, one line per set and one panel per comparison group, on a log
    axis; N:M beside them; the dense model and a uniform guess over the vocabulary as lines."""
    table = report["table"]
    groups = list(dict.fromkeys(r["group"] for r in table if r["structure"] == "unstructured"))
    nm = list(dict.fromkeys(r["structure"] for r in table if r["structure"] != "unstructured"))
    panels = [("unstructured", g) for g in groups] + ([("N:M", None)] if nm else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 0.6, 4.4), sharey=True, squeeze=False)
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(report["sets"])}
    base, ln_v = report["baseline"]["perplexity"], report["baseline"]["ln_vocab"]
    for ax, (kind, group) in zip(axes[0], panels):
        for metric in report["sets"]:
            if kind == "unstructured":
                pts = [(r["sparsity"], r["perplexity"]) for r in table if r["metric"] == metric
                       and r["structure"] == "unstructured" and r["group"] == group and r["perplexity"] is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3.5, color=colours[metric], label=metric)
            else:
                pts = [(nm.index(r["structure"]), r["perplexity"]) for r in table if r["metric"] == metric
                       and r["structure"] in nm and r["perplexity"] is not None]
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4.5, linestyle="none", color=colours[metric])
        ax.axhline(base, color="black", linestyle="--", linewidth=1.0, label=f"dense model ({base:.1f})")
        if ln_v is not None:
            ax.axhline(math.exp(ln_v), color="grey", linestyle=":", linewidth=1.0, label="uniform guess (perplexity V)")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        if kind == "unstructured":
            ax.set_xlabel("sparsity (share of the pruned tensors' weights)")
            ax.set_title(f"unstructured, {group.replace('_', ' ')}", fontsize=10)
        else:
            ax.set_xticks(range(len(nm)), nm)
            ax.set_xlim(-0.5, len(nm) - 0.5)
            ax.set_xlabel("structure (N of every M inputs pruned)")
            ax.set_title("N:M, per row", fontsize=10)
    texts = {"heldout": "held-out", "in_sample": "in-sample"}[report["protocol"]["texts"]]
    axes[0][0].set_ylabel(f"perplexity, {texts} texts (log scale)")
    fig.suptitle("Pruning every weight tensor of the blocks, by each metric", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig
