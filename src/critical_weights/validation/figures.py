"""Figures of the validation report: the damage curve and the metric-predictiveness scatter.

Each function takes the report (validation_report.json as a dict) and returns a Figure;
`plots.save_png` writes it. A loss that is NaN or infinite is never drawn as a value: it is
a labelled "NaN" mark on the k axis.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

from critical_weights.validation.selection import EXPORTED  # noqa: E402

STYLES = {
    "critical": {"color": "tab:red", "marker": "o", "linestyle": "-", "label": "critical (global top-k)"},
    "random_k": {"color": "tab:gray", "marker": "s", "linestyle": "--", "label": "random_k mean ± sd over draws"},
    "bottom_k": {"color": "tab:blue", "marker": "^", "linestyle": ":", "label": "bottom_k (least sensitive)"},
    "in_sample": {"color": "salmon", "marker": "o", "linestyle": "-.", "label": "critical, in-sample texts"},
}


def _title(kind: str, settings: dict[str, Any]) -> str:
    return {
        "zero": "zero: w -> 0",
        "sign_flip": "sign_flip: w -> -w",
        "gauss_noise": f"gauss_noise: w + N(0, ({settings['noise_sigma']:g} |w|)^2)",
        "bit_flip": f"bit_flip: bit {settings['bit_index']} ({settings['bit']}) XORed",
    }[kind]


def _series(per_k: list[tuple[int, dict[str, Any]]], cond: str, primary: str, base: float) -> tuple[list, list, list]:
    """k, loss (NaN where not finite) and spread of one set."""
    ks, ys, err = [], [], []
    for k, e in per_k:
        if cond == "in_sample":
            ys.append(e["critical"]["in_sample"]["loss"])
            err.append(0.0)
        elif cond == "random_k":
            mean = e["random_k"]["mean_increase"]
            ys.append(None if mean is None else base + mean)
            err.append(e["random_k"]["std_increase"] or 0.0)
        else:
            ys.append(e[cond][primary]["loss"])
            err.append(0.0)
        ks.append(k)
    return ks, [np.nan if y is None else y for y in ys], err


def _panel(ax: Any, by_set: dict[str, Any], report: dict[str, Any]) -> None:
    primary = report["texts"]["primary"]
    base = report["texts"][primary]["loss"]
    per_k = sorted((int(n[1:]), e) for n, e in by_set.items() if n != EXPORTED)
    conds = [c for c in ("critical", "random_k", "bottom_k") if c in per_k[0][1]]
    if primary == "heldout":
        conds.append("in_sample")
        ax.axhline(report["texts"]["in_sample"]["loss"], color="salmon", linewidth=0.8, linestyle=":", zorder=1,
                   label=f"unperturbed, in-sample: {report['texts']['in_sample']['loss']:.4f}")
    ax.axhline(base, color="black", linewidth=0.8, linestyle="-.", zorder=1, label=f"unperturbed, {primary}: {base:.4f}")
    ln_v = report["texts"].get("ln_vocab")
    if ln_v is not None:  # above it a loss is worse than a uniform guess: saturated, it no longer orders damage
        ax.axhline(ln_v, color="tab:purple", linewidth=0.8, linestyle="--", zorder=1, label=f"ln V = {ln_v:.2f}: saturated above")
    for i, cond in enumerate(conds):
        ks, ys, err = _series(per_k, cond, primary, base)
        ax.errorbar(ks, ys, yerr=err if any(err) else None, capsize=3, zorder=3, **STYLES[cond])  # over the lines
        for k, y in zip(ks, ys):
            if np.isnan(y):  # on the k axis, never at a loss-like height
                ax.annotate("NaN", (k, 0.02 + 0.06 * i), xycoords=("data", "axes fraction"), ha="center",
                            color=STYLES[cond]["color"], fontsize=8, fontweight="bold")
    ax.set_xscale("log")
    ks = [k for k, _ in per_k]
    ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k, weights perturbed (log scale)")
    ax.set_ylabel("mean token loss (nats)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)  # below: covers no point
    if EXPORTED in by_set:
        e = by_set[EXPORTED]
        crit = e["critical"][primary]["loss_increase"]
        rnd = e.get("random_k", {})
        text = (f"exported set ({e['n_weights']:,} weights in {e['n_tensors']} tensors): "
                f"{'NaN' if crit is None else f'{crit:+.4g}'} nats")
        if rnd.get("mean_increase") is not None:
            text += f"\nrandom_k, same counts: {rnd['mean_increase']:+.3g} ± {rnd['std_increase'] or 0:.2g} nats"
        ax.text(0.0, 1.01, text, transform=ax.transAxes, ha="left", va="bottom", fontsize=7)  # above the axes


def damage_figure(report: dict[str, Any]) -> Figure:
    """Loss against k (log x), critical vs controls, one panel per perturbation."""
    settings = report["settings"]
    kinds = settings["perturbations"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 6.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        _panel(ax, report["damage"][kind], report)
        ax.set_title(_title(kind, settings), fontsize=10, pad=24)  # room for the exported set's line
    primary = report["texts"]["primary"]
    t = report["texts"][primary]
    fig.suptitle(f"Damage from perturbing the global top-k by {report['critical_set']['metric']} vs controls\n"
                 f"({report['model']['name']}, {primary} texts: {t['n_texts']} texts, {t['n_tokens']:,} predicted tokens)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _symlog_y(ax: Any, floor: float) -> None:
    """A symlog y axis whose linear part is the noise floor: ticks at 0 and at the decades past
    the floor only (the decades inside it would print on top of each other), and a margin so
    no point sits on the frame."""
    ax.set_yscale("symlog", linthresh=floor)
    lo, hi = ax.get_ylim()
    first = math.ceil(math.log10(floor)) + 1  # the first decade clear of the linear part
    ticks = [0.0]
    for sign, edge in ((1.0, hi), (-1.0, -lo)):
        if edge > 10.0 ** first:
            decades = list(range(first, math.floor(math.log10(edge)) + 1))
            step = max(1, math.ceil(len(decades) / 5))  # at most 5 labels on each side
            ticks += [sign * 10.0 ** d for d in decades[::-1][::step]]
    ax.yaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.yaxis.set_minor_locator(NullLocator())
    t = ax.transScale.transform  # the margin: 6% of the height in the axis' own scale
    (_, a), (_, b) = t([(1, lo), (1, hi)])
    pad = 0.06 * (b - a)
    inv = ax.transScale.inverted().transform
    ax.set_ylim(inv([(1, a - pad)])[0][1], inv([(1, b + pad)])[0][1])


def _top_k_panel(ax: Any, top: dict[str, Any], floor: float) -> None:
    """Each metric's own top-k zeroed: measured loss increase against k."""
    for i, (metric, per_k) in enumerate(top["metrics"].items()):
        ks = sorted(int(k[1:]) for k in per_k)
        ys = [per_k[f"k{k}"]["loss_increase"] for k in ks]
        ax.plot(ks, [np.nan if y is None else y for y in ys], marker="o", color=plt.get_cmap("tab10")(i % 10), label=metric)
        for k, y in zip(ks, ys):
            if y is None:
                ax.annotate("NaN", (k, 0.02 + 0.06 * i), xycoords=("data", "axes fraction"), ha="center",
                            color=plt.get_cmap("tab10")(i % 10), fontsize=8, fontweight="bold")
    ax.set_xscale("log")
    all_k = sorted({int(k[1:]) for per_k in top["metrics"].values() for k in per_k})
    if all_k:
        ax.set_xlim(all_k[0] / 1.6, all_k[-1] * 1.6)  # no point on the frame
        ax.set_xticks(all_k, [str(k) for k in all_k])
        ax.xaxis.set_minor_locator(NullLocator())
    _symlog_y(ax, floor)
    ax.set_xlabel("k, the metric's own global top-k zeroed (log scale)")
    ax.set_ylabel(f"loss increase on {top['text_set']} texts (nats, symlog)")
    ax.set_title("Which metric finds the most damaging weights?", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _scatter_panel(ax: Any, single: dict[str, Any], metric: str, floor: float) -> None:
    """One metric's score against the measured loss increase of zeroing each sampled weight."""
    pts = [(w["scores"][metric], w["loss_increase"]) for w in single["weights"]
           if w["scores"][metric] is not None and w["loss_increase"] is not None]
    x = np.array([p[0] for p in pts], dtype=np.float64)
    y = np.array([p[1] for p in pts], dtype=np.float64)
    ax.scatter(x, y, s=18, color="tab:purple")
    if len(x) and (x > 0).all():
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow span would print overlapping minor labels
        if x.max() / x.min() < 100:  # under two decades: label 1, 2, 5 of each decade, or one tick shows
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlim(x.min() / 1.4, x.max() * 1.4)
    _symlog_y(ax, floor)
    rho = single["metrics"][metric]["spearman"]
    ax.set_title(f"{metric}: Spearman {'n/a' if rho is None else f'{rho:.2f}'} (n={len(pts)})", fontsize=10)
    ax.set_xlabel(f"{metric} score")
    ax.set_ylabel("loss increase, one weight zeroed (nats, symlog)")
    ax.grid(True, alpha=0.3)


def predictiveness_figure(report: dict[str, Any]) -> Figure:
    """Left: each metric's top-k zeroed. Then, per metric, score against the measured loss
    increase of zeroing each sampled weight alone (when validate.single_weights > 0)."""
    pred, floor = report["predictiveness"], report["settings"]["noise_floor_nats"]
    single = pred["single_weights"]
    metrics = list(single["metrics"]) if single else []
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5.2 * (1 + len(metrics)), 4.6), squeeze=False)
    _top_k_panel(axes[0][0], pred["top_k"], floor)
    for ax, m in zip(axes[0][1:], metrics):
        _scatter_panel(ax, single, m, floor)
    fig.suptitle(f"Does a metric's score predict the measured loss change? ({report['model']['name']})", fontsize=10)
    fig.tight_layout()
    return fig
