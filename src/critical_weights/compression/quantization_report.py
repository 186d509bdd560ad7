"""What `quantize` writes: the full report, its DVC-metrics headline, the long table behind
the DVC plot and the figure of perplexity against the share of weights kept.

The recovered share of a protected set is (ppl_rtn - ppl_kept) / (ppl_rtn - ppl_dense): 1 when
keeping the set undoes all of RTN's damage, 0 when it undoes none, below 0 when it hurts. It is
null where RTN barely hurts (its loss within MIN_DAMAGE nats of the dense model's), since a
ratio of two small differences says nothing, and where RTN's loss is past ln V, where a loss
no longer orders damage; the report says which for that width.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from critical_weights.compression.measure import LABELS, TextSet  # noqa: E402
from critical_weights.compression.report import (baseline_of, headline_baselines, ln_vocab_of,  # noqa: E402
                                                 mark_saturated, protocol)
from critical_weights.config.params import Params  # noqa: E402
from critical_weights.core.outputs import csv_text  # noqa: E402

MIN_DAMAGE = 0.01  # nats: below this RTN's damage, no recovered share is computed
PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 40, not 4 x 10^1, on the log axes
TABLE_COLUMNS = ["bits", "protect", "metric", "series", "share", "n_kept", "loss", "perplexity", "loss_increase",
                 "recovered", "top1_agreement", "saturated"]


def recovered(ppl_rtn: float | None, ppl: float | None, ppl_dense: float) -> float | None:
    """The share of RTN's perplexity damage that keeping a set undoes (module docstring)."""
    if ppl_rtn is None or ppl is None:
        return None
    return (ppl_rtn - ppl) / (ppl_rtn - ppl_dense)


def build_report(params: Params, meta: dict[str, Any], tensors: list, n_weights: int, remainders: list[str],
                 texts: list[TextSet], baselines: list[float], sets: list[str], channel_sets: list[str],
                 no_activation: str | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the stage measured, with the recovered shares (on every text set) and the protocol."""
    qp = params.quantize
    ln_vocab = ln_vocab_of(meta)
    dense = math.exp(baselines[0])
    rtn = {r["bits"]: r for r in rows if r["protect"] == "none"}
    harmless = {}
    for bits, r in rtn.items():
        if r["loss_increase"] is not None and r["loss_increase"] < MIN_DAMAGE:
            harmless[str(bits)] = (f"RTN at {bits} bits raises the loss by only {r['loss_increase']:.4f} nats "
                                   f"(under {MIN_DAMAGE}): no recovered share is computed")
        elif not r["finite"] or (ln_vocab is not None and r["loss"] > ln_vocab):
            harmless[str(bits)] = (f"RTN at {bits} bits is past ln V (a uniform guess over the vocabulary), where a "
                                   "loss no longer orders damage: no recovered share is computed")
    mark_saturated(rows, texts, ln_vocab)
    for r in rows:
        r["series"] = f"int{r['bits']} {r['protect']}"
        r["recovered"] = (None if r["protect"] == "none" or str(r["bits"]) in harmless
                          else recovered(rtn[r["bits"]]["perplexity"], r["perplexity"], dense))
        for t, base in zip(texts[1:], baselines[1:]):
            plain, name = rtn[r["bits"]], t.name
            hurts = (plain[f"{name}_loss_increase"] is not None and plain[f"{name}_loss_increase"] >= MIN_DAMAGE
                     and not plain[f"{name}_saturated"])
            r[f"{name}_recovered"] = (recovered(plain[f"{name}_perplexity"], r[f"{name}_perplexity"], math.exp(base))
                                      if r["protect"] != "none" and hurts else None)
    return {
        "protocol": protocol(texts),
        "baseline": baseline_of(texts, baselines, ln_vocab),
        "quantized": {
            "tensors": [t.name for t in tensors], "n_tensors": len(tensors), "n_weights": n_weights,
            "which": ("compress.include: " + ", ".join(params.compress.include)) if params.compress.include
            else "every weight tensor of ndim >= 2 inside the blocks (not the embedding, not the head)",
            "smaller_last_group": {"n_tensors": len(remainders), "tensors": remainders,
                                   "why": f"the input size is not a multiple of group_size {qp.group_size}: "
                                          "the last group of each row holds the remainder"},
        },
        "sets": sets,
        "channel_sets": channel_sets,
        "notes": {
            "rtn": ("round to nearest (half to even) in groups of group_size consecutive inputs of a row, each "
                    "group on its own min-max grid, as AWQ's pseudo_quantize_tensor; "
                    + ("symmetric: scale max|w| / (2^(b-1) - 1)" if qp.symmetric
                       else "asymmetric: scale (max - min) / (2^b - 1) and an integer zero point")),
            "kept": ("kept weights are written back at their original values after RTN; each group's grid is set "
                     "by all of its weights, the kept ones included, so keeping changes no other weight"),
            "weights": "each set's global top share of every quantised weight; ties by (tensor, row, col) order",
            "channels": ("per tensor, and per expert for 3-D expert tensors, the top share of input channels by "
                         "column sum of the set's scores (activation: the input's L2 norm, AWQ's own choice; "
                         "random: uniform scores); every weight of a chosen channel kept"),
            "random": "uniform scores drawn with seed, one stream per tensor (the same draw as compress)",
            "recovered": "(ppl_rtn - ppl_kept) / (ppl_rtn - ppl_dense): 1 undoes all of RTN's damage, 0 none",
            **({"activation": no_activation} if no_activation else {}),
        },
        "unrecovered": harmless,
        "settings": {"bits": list(qp.bits), "group_size": qp.group_size, "symmetric": qp.symmetric,
                     "keep": list(qp.keep), "channels": qp.channels, "seed": params.seed},
        "table": rows,
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """DVC metrics: the dense perplexity, then per width RTN's perplexity and each set's
    recovered share at the largest kept share and with its channels kept."""
    out = headline_baselines(report)
    top = max(report["settings"]["keep"])
    for r in report["table"]:
        b = f"int{r['bits']}"
        if r["protect"] == "none":
            out[f"{b}_rtn_ppl"] = r["perplexity"]
        elif r["recovered"] is not None and (r["protect"] == "channels" or r["share"] == top):
            out[f"{b}_{'channels_' if r['protect'] == 'channels' else ''}{r['metric']}_recovered"] = r["recovered"]
    return out


def table_csv(report: dict[str, Any]) -> str:
    """Long format, one row per protected set (RTN alone is in the headline), in the order measured."""
    columns = TABLE_COLUMNS + [f"{b['texts']}_{c}" for b in report["protocol"]["beside"]
                               for c in ("perplexity", "recovered", "saturated")]
    return csv_text(columns, [[r[c] for c in columns] for r in report["table"] if r["protect"] != "none"])


def figure(report: dict[str, Any]) -> Figure:
    """Per width: perplexity against the share of weights kept, one line per set (log axes), and
    beside it the channel-wise sets; the dense model and RTN alone as lines."""
    table = report["table"]
    widths = list(dict.fromkeys(r["bits"] for r in table))
    channels = bool(report["channel_sets"])
    cols = 2 if channels else 1
    fig, axes = plt.subplots(len(widths), cols, figsize=(5.2 * cols + 1.6, 3.9 * len(widths) + 0.7),
                             squeeze=False, sharey="row", gridspec_kw={"width_ratios": [3, 2][:cols]})
    names = list(dict.fromkeys([*report["sets"], *report["channel_sets"]]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(names)}
    dense = report["baseline"]["perplexity"]
    for row, bits in zip(axes, widths):
        rtn = next(r["perplexity"] for r in table if r["bits"] == bits and r["protect"] == "none")
        left = row[0]
        for metric in report["sets"]:
            pts = [(r["share"], r["perplexity"]) for r in table if r["bits"] == bits and r["protect"] == "weights"
                   and r["metric"] == metric and r["perplexity"] is not None]
            left.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", ms=3.5, color=colours[metric],
                      label=metric)
        left.set_xscale("log")
        left.xaxis.set_major_formatter(PLAIN)
        left.set_xlabel("weights kept at their original values (% of all quantised, log scale)")
        left.set_title(f"{bits}-bit RTN: each set's top weights kept", fontsize=10)
        if channels:
            right = row[1]
            picked = [r for r in table if r["bits"] == bits and r["protect"] == "channels" and r["perplexity"] is not None]
            right.scatter(range(len(picked)), [r["perplexity"] for r in picked], s=28,
                          color=[colours[r["metric"]] for r in picked], zorder=3)
            right.set_xticks(range(len(picked)), [r["metric"] for r in picked], rotation=40, ha="right", fontsize=8)
            right.set_xlim(-0.6, len(picked) - 0.4)
            share = report["settings"]["channels"]
            right.set_title(f"{bits}-bit RTN: top {100 * share:g}% input channels kept", fontsize=10)
        for ax in row:
            ax.axhline(dense, color="black", linestyle="--", linewidth=1.0, label=f"dense model ({dense:.1f})")
            if rtn is not None:
                ax.axhline(rtn, color="firebrick", linestyle=":", linewidth=1.2, label="RTN alone, at that width")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(PLAIN)
            low, high = ax.get_ylim()
            ax.yaxis.set_minor_formatter(PLAIN if high / low < 10 else NullFormatter())  # label minors within a decade
            ax.grid(True, which="major", alpha=0.3)
        texts = LABELS[report["protocol"]["texts"]]
        left.set_ylabel(f"perplexity, {texts} (log scale)")
    fig.suptitle("Round-to-nearest, with each metric's critical weights kept", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    per_line = 6 if channels else 3
    fig.legend(handles, labels, loc="lower center", ncol=min(per_line, len(labels)), fontsize=8, frameon=False)
    lines = -(-len(labels) // per_line)
    fig.tight_layout(rect=(0, (0.25 + 0.2 * lines) / fig.get_figheight(), 1, 1))
    return fig
