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
from matplotlib.lines import Line2D  # noqa: E402

from critical_weights.compression.experts import Layer  # noqa: E402
from critical_weights.compression.experts import summary as experts_summary  # noqa: E402
from critical_weights.compression.measure import LABELS, TextSet  # noqa: E402
from critical_weights.config.params import Params  # noqa: E402
from critical_weights.core.outputs import csv_text  # noqa: E402

TABLE_COLUMNS = ["metric", "series", "structure", "group", "sparsity", "sparsity_reached", "loss", "perplexity",
                 "loss_increase", "top1_agreement", "saturated"]
BESIDE_COLUMNS = ["loss", "perplexity", "top1_agreement", "saturated"]  # of each text set beside, under its name


def json_text(value: Any) -> str:
    """A value as compact, key-sorted JSON (for safetensors' string-only metadata)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def protocol(texts: list[TextSet]) -> dict[str, Any]:
    """How every perplexity of the compression stages is measured: the primary text set's
    protocol, with the sets measured beside it."""
    return {**texts[0].protocol, "beside": [t.protocol for t in texts[1:]]}


def baseline_of(texts: list[TextSet], baselines: list[float], ln_vocab: float | None) -> dict[str, Any]:
    """The unchanged model's loss and perplexity on every text set, and ln V."""
    out: dict[str, Any] = {"loss": baselines[0], "perplexity": math.exp(baselines[0]), "ln_vocab": ln_vocab}
    for t, loss in zip(texts[1:], baselines[1:]):
        out.update({f"{t.name}_loss": loss, f"{t.name}_perplexity": math.exp(loss)})
    return out


def mark_saturated(rows: list[dict[str, Any]], texts: list[TextSet], ln_vocab: float | None) -> None:
    """`saturated` (and `in_sample_saturated`, ...): a loss that is not finite or past ln V."""
    for r in rows:
        for prefix in ["", *(f"{t.name}_" for t in texts[1:])]:
            r[f"{prefix}saturated"] = not r[f"{prefix}finite"] or (ln_vocab is not None and r[f"{prefix}loss"] > ln_vocab)


def headline_baselines(report: dict[str, Any]) -> dict[str, Any]:
    """The DVC-metrics baselines, each named by the texts it was measured on."""
    p, base = report["protocol"], report["baseline"]
    out: dict[str, Any] = {f"loss_{p['texts']}": base["loss"], "perplexity_baseline": base["perplexity"]}
    for beside in p["beside"]:
        out[f"loss_{beside['texts']}"] = base[f"{beside['texts']}_loss"]
    return out


def ln_vocab_of(meta: dict[str, Any]) -> float | None:
    """ln V of the model's vocabulary: past it a loss is worse than a uniform guess."""
    vocab = meta.get("model", {}).get("vocab_size")
    return math.log(vocab) if vocab else None


def build_report(params: Params, meta: dict[str, Any], tensors: list, n_weights: int, already_zero: int,
                 texts: list[TextSet], baselines: list[float], sets: list[str], rows: list[dict[str, Any]],
                 export: tuple | None) -> dict[str, Any]:
    """Everything the stage measured, with the protocol every perplexity was measured under."""
    ln_vocab = ln_vocab_of(meta)
    mark_saturated(rows, texts, ln_vocab)
    for r in rows:
        r["series"] = f"{r['structure']} {r['group']}" if r["structure"] == "unstructured" else r["structure"]
    exported = None
    if export is not None:
        metric, structure, group, sparsity = export
        hit = next(r for r in rows if (r["metric"], r["structure"], r["group"], r["sparsity"]) == export)
        exported = {"file": "masks.safetensors", "metric": metric, "structure": structure, "group": group,
                    "sparsity": sparsity, "loss": hit["loss"], "perplexity": hit["perplexity"],
                    "top1_agreement": hit["top1_agreement"]}
    return {
        "protocol": protocol(texts),
        "baseline": baseline_of(texts, baselines, ln_vocab),
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


def experts_section(params: Params, layers: list[Layer], rows: list[dict[str, Any]],
                    unscored: list[str]) -> dict[str, Any]:
    """Dropping whole experts (critical_weights.compression.experts): what was dropped, the
    losses, and per count least and most against the random draws' mean and spread."""
    if not layers:
        return {"measured": False, "reason": "the model has no Mixture-of-Experts layer"}
    if unscored:
        return {"measured": False, "reason": f"{params.rank.metric} scores no expert tensor of {', '.join(unscored)}, "
                                             "so its experts have no importance to order them by"}
    if not rows:
        return {"measured": False, "reason": "compress.drop_experts is []"}
    return {
        "measured": True,
        "importance": f"per expert, the sum of {params.rank.metric}'s scores over the layer's expert tensors",
        "dropping": "every parameter of the experts module zeroed along the expert axis (weights and biases); the "
                    "router unchanged, so tokens still go to a dropped expert, whose output is zero",
        "layers": [{"block": layer.block, "experts": layer.experts, "importance": [float(x) for x in layer.importance]}
                   for layer in layers],
        "rows": rows,
        "summary": experts_summary(rows),
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """DVC metrics: the baselines, then per set the perplexity at 50% per row and at 2:4; for a
    Mixture-of-Experts model, the loss increase of each expert drop."""
    out = headline_baselines(report)
    for s in report.get("experts", {}).get("summary", []):
        for key in ("least_loss_increase", "most_loss_increase", "random_loss_increase_mean"):
            out[f"drop_{s['n']}_experts_{key}"] = s[key]
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
    columns = TABLE_COLUMNS + [f"{b['texts']}_{c}" for b in report["protocol"]["beside"] for c in BESIDE_COLUMNS]
    return csv_text(columns, [[r[c] for c in columns] for r in report["table"]])


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
    beside = "in_sample_perplexity" if any(b["texts"] == "in_sample" for b in report["protocol"]["beside"]) else None
    for ax, (kind, group) in zip(axes[0], panels):
        for metric in report["sets"]:
            for key, solid in [("perplexity", True), *([(beside, False)] if beside else [])]:
                style = {"color": colours[metric], "alpha": 1.0 if solid else 0.55}
                if kind == "unstructured":
                    pts = [(r["sparsity"], r[key]) for r in table if r["metric"] == metric
                           and r["structure"] == "unstructured" and r["group"] == group and r[key] is not None]
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if solid else None, ms=3.5,
                            linestyle="-" if solid else "--", linewidth=1.4 if solid else 1.0,
                            label=metric if solid else None, **style)
                else:
                    pts = [(nm.index(r["structure"]) + (0 if solid else 0.12), r[key]) for r in table
                           if r["metric"] == metric and r["structure"] in nm and r[key] is not None]
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=4.5, linestyle="none",
                            markerfacecolor=None if solid else "none", **style)
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
    axes[0][0].set_ylabel(f"perplexity, {LABELS[report['protocol']['texts']]} (log scale)")
    fig.suptitle("Pruning every weight tensor of the blocks, by each metric", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if beside:
        handles.append(Line2D([], [], color="grey", linestyle="--", marker="o", markerfacecolor="none", ms=4))
        labels.append("in-sample texts (dashed, hollow)")
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig
