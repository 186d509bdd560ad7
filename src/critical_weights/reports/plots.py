"""Plots of the sensitivity statistics, and the tables behind DVC's own `plots:`.

Every figure function returns a Figure built with `fig, ax = plt.subplots()`; `run_plot`
saves them. All data come from the exact statistics in the shards, never from a sample.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from critical_weights.artifacts import shards  # noqa: E402
from critical_weights.artifacts.ranked_file import read_ranked  # noqa: E402
from critical_weights.config.params import PlotParams  # noqa: E402
from critical_weights.core.errors import ParamsError  # noqa: E402
from critical_weights.core.outputs import atomic_path, csv_text, write_text  # noqa: E402
from critical_weights.reports.figures import save_png  # noqa: E402
from critical_weights.reports import experts  # noqa: E402
from critical_weights.reports.experts import expert_importance  # noqa: E402


def _edges(meta: dict) -> np.ndarray:
    h = meta["hist_log10_edges"]
    n = (h["high"] - h["low"]) * h["per_decade"]
    return np.linspace(h["low"], h["high"], n + 1)


def histogram(stats: pa.Table) -> tuple[np.ndarray, int, int]:
    """Counts of positive scores per log10 bin, summed over parameters; zeros; negatives."""
    counts = np.sum(np.array(stats["hist"].to_pylist(), dtype=np.int64), axis=0)
    return counts, int(pc.sum(stats["zeros"]).as_py()), int(pc.sum(stats["negatives"]).as_py())


def distribution_figure(edges: np.ndarray, counts: np.ndarray, zeros: int, negatives: int,
                        cutoffs: np.ndarray, metric: str, mode: str, k: int) -> Figure:
    """Exact histogram of every score on a log10 axis, with the critical cut-off: one line in
    global mode, else a tick for each group's own cut-off (its k-th score)."""
    fig, ax = plt.subplots(figsize=(9, 4.8))
    used = np.flatnonzero(counts)
    lo, hi = (used.min(), used.max() + 1) if used.size else (0, len(counts))
    ax.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True, alpha=0.75, color="tab:blue", label="weights per bin")
    ax.set_yscale("log")
    ax.set_xlabel(f"log10({metric} score)")
    ax.set_ylabel("number of weights (log scale)")
    total = int(counts.sum()) + zeros + negatives
    ax.set_title(f"Distribution of all {total:,} {metric} scores (exact histogram)")
    positive = cutoffs[cutoffs > 0]
    if mode == "global" and positive.size:
        ax.axvline(np.log10(positive.min()), color="tab:red", linestyle="--",
                   label=f"global top-{k} cut-off: {positive.min():.3g}")
    elif positive.size:
        ax.plot(np.log10(positive), np.zeros_like(positive), "|", color="tab:red", markersize=14,
                transform=ax.get_xaxis_transform(), label=f"cut-off of each of {positive.size} groups ({mode} top-{k})")
    notes = [f"zero scores: {zeros:,}"] + ([f"negative scores: {negatives:,}"] if negatives else [])
    ax.text(0.01, 0.97, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)  # below: covers no bar
    fig.tight_layout()
    return fig


def layer_table(stats: pa.Table) -> list[dict]:
    """Per parameter, in model order: block, component (as the model names them), max and mean score."""
    rows = []
    for r in stats.select(["parameter", "block", "component", "max", "sum", "count"]).to_pylist():
        rows.append({"parameter": r["parameter"], "block": r["block"], "component": r["component"],
                     "max": r["max"], "mean": r["sum"] / r["count"] if r["count"] else 0.0})
    return rows


def _components(rows: list[dict]) -> list[str]:
    """The components the model has inside its blocks, in the order its parameters come."""
    return list(dict.fromkeys(r["component"] for r in rows if r["block"] is not None))


def layer_comparison_csv(rows: list[dict], metric: str) -> str:
    """Long format for DVC's plots: one line per tensor inside a block, `block, component,
    parameter, metric, max, mean`, blocks ascending, model order within a block."""
    inside = sorted((r for r in rows if r["block"] is not None), key=lambda r: r["block"])
    return csv_text(["block", "component", "parameter", "metric", "max", "mean"],
                    [[r["block"], r["component"], r["parameter"], metric, r["max"], r["mean"]] for r in inside])


LAYER_PANEL_COLS = 4  # small multiples per row in layer_comparison.png


def layer_comparison_size(n_components: int) -> tuple[float, float]:
    """Figure size (inches) of layer_comparison.png: 3.2 x 2.6 per panel, room for the legend."""
    cols = min(LAYER_PANEL_COLS, max(1, n_components))
    rows = -(-max(1, n_components) // cols)
    return 3.2 * cols + 0.6, 2.6 * rows + 1.0


def layer_comparison_figure(rows: list[dict], metric: str) -> Figure:
    """Small multiples: one panel per component, its max and mean score per block, on one shared
    log axis so panels compare; the block of each panel's largest score is marked, and the
    tensors outside blocks (embedding, head) are dashed lines in every panel."""
    comps = _components(rows)
    outside = [r for r in rows if r["block"] is None]
    cols = min(LAYER_PANEL_COLS, max(1, len(comps)))
    n_rows = -(-max(1, len(comps)) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=layer_comparison_size(len(comps)), sharex=True, sharey=True,
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, comp in zip(axes.flat, comps):
        pts = sorted((r["block"], r["max"], r["mean"]) for r in rows if r["component"] == comp and r["block"] is not None)
        blocks = [b for b, _, _ in pts]
        ax.plot(blocks, [m for _, m, _ in pts], marker="o", ms=2.5, lw=1.2, color="tab:blue", label="max")
        ax.plot(blocks, [m for _, _, m in pts], marker="o", ms=2.5, lw=1.2, color="tab:orange", label="mean")
        for j, r in enumerate(outside):
            for stat, style in (("max", "--"), ("mean", ":")):
                ax.axhline(r[stat], color=cmap((2 + j) % 10), linestyle=style, linewidth=1.0,
                           label=f"{r['component']} {stat} (not in a block)")
        peak = max(pts, key=lambda p: p[1])
        ax.annotate(f"block {peak[0]}", (peak[0], peak[1]), xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7, color="tab:blue")
        ax.set_title(comp, fontsize=9)
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(comps):]:
        ax.set_visible(False)
    for i, ax in enumerate(axes.flat[: len(comps)]):
        if i + cols >= len(comps):  # nothing below it: the panel carries the block axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("transformer block", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{metric} score", fontsize=8)
    _raise_top(axes.flat[: len(comps)])
    fig.suptitle(f"{metric} per transformer block, one panel per component (max and mean of each tensor)", fontsize=10)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))
    return fig


def _raise_top(axes) -> None:
    """Headroom above the largest point on the shared log axis, for the peak labels."""
    axes = list(axes)
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(lo, hi * (hi / lo) ** 0.12)


def grid_edges(n: int, cells: int) -> np.ndarray:
    """Real index edges of the pooled cells: index i falls in cell i * cells // n (as scoring
    pools), so cell j covers [ceil(j n / cells), ceil((j + 1) n / cells))."""
    return -(-np.arange(cells + 1) * n // cells)


def heatmap_figure(rows: list[dict], stat: str, metric: str, tensor: dict) -> Figure:
    """Left: block x component heatmap of log10 score. Right: one tensor's max-pooled grid,
    drawn in its real row and column coordinates."""
    comps = _components(rows)
    blocks = sorted({r["block"] for r in rows if r["block"] is not None})
    cell = np.full((len(blocks), len(comps)), np.nan)
    for r in rows:
        if r["block"] is not None and r[stat] > 0:
            cell[blocks.index(r["block"]), comps.index(r["component"])] = np.log10(r[stat])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, max(5, 0.22 * len(blocks) + 2)),
                                  gridspec_kw={"width_ratios": [1, 1.2]})
    im = ax.imshow(cell, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(comps)), comps, rotation=90, fontsize=8)  # upright names would collide
    step = max(1, len(blocks) // 16)
    ax.set_yticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
    ax.set_xlabel("component")
    ax.set_ylabel("transformer block")
    ax.set_title(f"log10 {stat} {metric} per block and component")
    fig.colorbar(im, ax=ax, label=f"log10 {stat} score")
    grid = np.array(tensor["grid"], dtype=np.float64).reshape(tensor["grid_rows"], tensor["grid_cols"])
    with np.errstate(divide="ignore"):
        shown = np.where(grid > 0, np.log10(np.where(grid > 0, grid, 1)), np.nan)
    rows_e, cols_e = grid_edges(tensor["n_rows"], tensor["grid_rows"]), grid_edges(tensor["n_cols"], tensor["grid_cols"])
    im2 = ax2.pcolormesh(cols_e, rows_e, shown, cmap="magma", shading="flat")
    ax2.set_xlim(0, tensor["n_cols"])
    ax2.set_ylim(tensor["n_rows"], 0)  # row 0 at the top, as a matrix is read
    ax2.set_title(f"{tensor['parameter']}\nmax over cells of about {rows_e[1]}x{cols_e[1]} weights", fontsize=10)
    ax2.set_xlabel("input column (col)")
    ax2.set_ylabel("output row (row)")
    fig.colorbar(im2, ax=ax2, label=f"log10 max {metric} score in the cell")
    fig.tight_layout()
    return fig


def expert_figure(layers: list[dict], metric: str) -> Figure:
    """Mixture-of-Experts layers x experts: log10 sum of each expert's scores, its share of the
    critical set, and how often the router picked it (share of tokens)."""
    panels = (("sum", f"log10 sum of {metric} scores", "viridis"),
              ("critical_share", "share of the critical weights", "magma"),
              ("router_share", "router picks (share of tokens)", "cividis"))
    n_experts = max(layer["n_experts"] for layer in layers)
    fig, axes = plt.subplots(1, 3, figsize=(15, max(4, 0.3 * len(layers) + 2)))
    for ax, (key, title, cmap) in zip(axes, panels):
        cell = np.full((len(layers), n_experts), np.nan)
        for i, layer in enumerate(layers):
            for e in layer["per_expert"]:
                v = e[key]
                cell[i, e["expert"]] = (np.log10(v) if v > 0 else np.nan) if key == "sum" else v
        im = ax.imshow(cell, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("expert")
        ax.set_xticks(range(0, n_experts, max(1, n_experts // 16)))
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(layer["block"]) for layer in layers[::step]])
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("transformer block")
    fig.suptitle(f"Expert importance per Mixture-of-Experts layer ({metric})")
    fig.tight_layout()
    return fig


def write_experts(out: Path, layers: list[dict], metric: str, dpi: int) -> None:
    """The folder `out`, atomically: expert_importance.csv (long format, one line per layer and
    expert; only the header for a model without Mixture-of-Experts layers) and, for MoE
    models, expert_heatmap.png."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "expert_importance.csv").write_text(csv_text(list(experts.CSV_HEADER), experts.importance_rows(layers, metric)),
                                                   encoding="utf-8")
        if layers:
            fig = expert_figure(layers, metric)
            fig.savefig(tmp / "expert_heatmap.png", dpi=dpi, metadata={"Software": None}, format="png")
            plt.close(fig)


def heatmap_tensor(stats: pa.Table, name: str) -> dict:
    """The stats row of the tensor `plot.heatmap_tensor` names (`top`: highest max score)."""
    table = stats.to_pylist()
    if name == "top":
        return max(table, key=lambda r: (r["max"], -r["param_index"]))
    for r in table:
        if r["parameter"] == name:
            return r
    close = difflib.get_close_matches(name, [r["parameter"] for r in table], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ParamsError([f"plot.heatmap_tensor: {name!r} is not a scored parameter{hint}; use top or a parameter "
                       "name from critical_weights.csv"])


def overlap_figure(overlap: dict) -> Figure:
    """How far the critical sets of every pair of metrics agree. Left (3 or more metrics): the
    overall Jaccard index of each pair. Right: per pair, the Jaccard index of each tensor's
    critical sets (one dot per tensor), with the overall index as a diamond and the Spearman
    correlation of shared ranks in the label, so two metrics show where they agree, not one number."""
    metrics, pairs, rank = overlap["metrics"], overlap["pairs"], overlap["rank"]
    names = list(pairs)
    matrix = len(metrics) >= 3
    fig, axes = plt.subplots(1, 2 if matrix else 1, figsize=(12 if matrix else 8, max(4.0, 0.45 * len(names) + 2)),
                             squeeze=False, gridspec_kw={"width_ratios": [1, 1.4]} if matrix else None)
    if matrix:
        ax = axes[0][0]
        jac = np.full((len(metrics), len(metrics)), np.nan)
        for i, a in enumerate(metrics):
            for j, b in enumerate(metrics):
                pair = pairs.get(f"{a} vs {b}") or pairs.get(f"{b} vs {a}")
                if i > j and pair is not None:
                    jac[i, j] = pair["jaccard"]
                    ax.text(j, i, f"{pair['jaccard']:.2f}", ha="center", va="center", fontsize=8)
        im = ax.imshow(jac, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right")
        ax.set_yticks(range(len(metrics)), metrics)
        ax.set_title("overall Jaccard index of the critical sets", fontsize=10)
        fig.colorbar(im, ax=ax, label="Jaccard index")
    ax = axes[0][-1]
    rng = np.random.default_rng(0)  # jitter only, fixed: the figure is deterministic
    for y, name in enumerate(names):
        per = [t["jaccard"] for t in pairs[name]["per_tensor"].values()]
        ax.scatter(per, y + rng.uniform(-0.25, 0.25, len(per)), s=8, alpha=0.5, color="tab:blue",
                   label="one tensor" if y == 0 else None)
        ax.scatter([pairs[name]["jaccard"]], [y], marker="D", s=60, color="tab:red", label="overall" if y == 0 else None)
    rho = [pairs[n]["spearman"] for n in names]
    ax.set_yticks(range(len(names)), [f"{n}\n(ρ {'n/a' if r is None else f'{r:.2f}'})" for n, r in zip(names, rho)], fontsize=8)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("Jaccard index of the critical sets (1 = the same weights)")
    ax.set_ylabel("metric pair (ρ: Spearman of shared ranks)", fontsize=9)
    ax.set_title(f"Agreement per tensor ({rank['mode']}, k={rank['k']})", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    if names:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.set_title(f"Only one metric ({', '.join(metrics)}): no pair to compare", fontsize=10)
    fig.tight_layout()
    return fig


def run_plot(sensitivity: Path, ranked_dir: Path, overlap_file: Path, out: Path, params: PlotParams) -> None:
    """Write the PNGs and the CSVs behind DVC's `plots:` into `out`, each atomically."""
    meta = shards.read_meta(sensitivity)
    stats = shards.read_stats(sensitivity)
    ranked, info = read_ranked(ranked_dir)
    metric, mode = info["rank"]["metric"], info["rank"]["mode"]
    stats = stats.filter(pc.equal(stats["metric"], metric))
    edges = _edges(meta)
    counts, zeros, negatives = histogram(stats)
    cutoffs = ranked.group_by("group").aggregate([("score", "min")])["score_min"].to_numpy() \
        if ranked.num_rows else np.empty(0)  # (groups,) each group's k-th score
    rows = layer_table(stats)
    figures = {
        "sensitivity_distribution.png": distribution_figure(edges, counts, zeros, negatives, cutoffs.astype(np.float64),
                                                            metric, mode, info["rank"]["k"]),
        "layer_comparison.png": layer_comparison_figure(rows, metric),
        "sensitivity_heatmap.png": heatmap_figure(rows, params.heatmap_stat, metric,
                                                  heatmap_tensor(stats, params.heatmap_tensor)),
        "metric_overlap.png": overlap_figure(json.loads(overlap_file.read_text(encoding="utf-8"))),
    }
    centers = (edges[:-1] + edges[1:]) / 2
    for name, fig in figures.items():
        save_png(fig, out / name, params.dpi)
    write_text(out / "layer_comparison.csv", layer_comparison_csv(rows, metric))
    write_experts(out / "experts", expert_importance(meta, stats, ranked, metric), metric, params.dpi)
    write_text(out / "score_histogram.csv",
               csv_text(["log10_score", "count"], [[float(round(c, 4)), int(n)] for c, n in zip(centers, counts) if n]))
