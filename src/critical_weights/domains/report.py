"""What `domains` writes: the report, its DVC-metrics headline, every group's critical set as
CSV, the long tables behind the `dvc plots` heatmaps, and three figures: the overlap matrix,
the damage matrix, and where each group's specific weights sit (block x component)."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from critical_weights.config.params import Params  # noqa: E402
from critical_weights.core.outputs import csv_text, write_json, write_text  # noqa: E402
from critical_weights.domains.groups import WHOLE, Group, summary  # noqa: E402
from critical_weights.domains.sets import Critical, shares  # noqa: E402
from critical_weights.reports.figures import save_png  # noqa: E402
from critical_weights.sensitivity.loss import predicted_tokens  # noqa: E402

CRITICAL_COLUMNS = ["group", "global_rank", "parameter", "block", "component", "expert", "row", "col", "flat_index",
                    "score", "weight", "gradient", "specific", "specificity", "specificity_bounded"]
OVERLAP_COLUMNS = ["panel", "row", "column", "value"]
DAMAGE_COLUMNS = ["panel", "row", "column", "value", "loss", "top1_agreement", "saturated"]
DEFINITIONS = {
    "groups": "texts grouped by domains.field; per group, n_in_sample texts (its gradient) and n_heldout held out, "
              "drawn with seed",
    "critical_top": "each group's global top-N (domains.top_n) by rank.metric, from the group's own gradient",
    "critical_per_tensor": "each group's top domains.per_tensor_k of each tensor by rank.metric",
    "whole": "every group's in-sample texts together: its gradient is the token-weighted sum of the group gradients "
             "(no pass of its own)",
    "jaccard": "|A and B| / |A or B| of two groups' sets of weights",
    "spearman_tensor_sums": "Spearman's rank correlation, over the tensors, of each tensor's summed score: do two "
                            "groups agree on which tensors matter",
    "specific": "a weight in the group's top-N and in no other group's top-N",
    "shared": "a weight in every group's top-N",
    "specificity": "the group's score over the largest other group's score at the weight; where the weight is outside "
                   "another group's kept candidates, that group's lowest kept score in the tensor stands in for it "
                   "(an upper bound on it), and the specificity is a lower bound (specificity_bounded)",
    "damage": "loss increase on the column group's texts after zeroing the row group's top-N (validate's loss code)",
    "dominance_row": "per row g, D[g,g] / mean over h != g of D[g,h]; mean and sample std over groups",
    "dominance_column": "per column h, D[h,h] / mean over g != h of D[g,h]; mean and sample std over groups",
    "controls": "random sets of N weights spread over the tensors as the groups' top-N sets are together (each "
                "tensor's share of their union, largest-remainder rounding), none of their weights, measured on every "
                "group's held-out texts",
    "own_vs_random": "per group, D[g,g] held-out against the controls' increases on g's held-out texts, as validate "
                     "compares a critical set with its random_k draws: a ratio only where the controls stand out of "
                     "float noise (else null with the reason), and the z-score; mean_ratio and mean_z are their means "
                     "over the groups where they are defined",
}


def not_run(reason: str) -> dict[str, Any]:
    return {"run": False, "reason": reason}


def _mean_jaccard(overlap: list[dict[str, Any]], names: list[str]) -> float | None:
    pairs = [r["jaccard_top"] for r in overlap if r["a"] in names and r["b"] in names and r["a"] < r["b"]]
    return float(np.mean(pairs)) if pairs else None


def build(params: Params, identity: dict[str, Any], shown: list[Group], left_out: dict[str, str],
          critical: list[Critical], whole: Critical | None, no_whole: str | None, overlap: list[dict[str, Any]],
          specific: dict[str, Any], shared: list[dict[str, Any]], matrix: dict[str, Any]) -> dict[str, Any]:
    """Everything the stage measured, with its definitions."""
    dp = params.domains
    names = [g.name for g in shown]
    ln_v = matrix["ln_vocab"]
    for texts in ("heldout", "in_sample"):
        matrix[texts]["saturated"] = [[loss is None or (ln_v is not None and loss > ln_v) for loss in row]
                                      for row in matrix[texts]["loss"]]
    return {
        "run": True,
        "settings": {"field": dp.field, "source": dp.source, "n_in_sample": dp.n_in_sample, "n_heldout": dp.n_heldout,
                     "top_n": dp.top_n, "random_draws": dp.random_draws, "metric": params.rank.metric,
                     "per_tensor_k": dp.per_tensor_k, "seed": params.seed, "max_length": params.texts.max_length},
        "model": identity,
        "groups": {**summary(shown, left_out),
                   "tokens": {g.name: {"in_sample": predicted_tokens(g.in_sample), "heldout": predicted_tokens(g.heldout)}
                              for g in shown}},
        "critical": {c.name: {"top": {"n": c.top.num_rows, **shares(c.top.to_pylist())},
                              "per_tensor": {"n": c.per_tensor.num_rows, **shares(c.per_tensor.to_pylist())}}
                     for c in [*critical, *([whole] if whole is not None else [])]},
        "overlap": {"pairs": overlap, "mean_pairwise_jaccard_top": _mean_jaccard(overlap, names),
                    "vs_whole": ({r["a"]: r["jaccard_top"] for r in overlap if r["b"] == WHOLE} if whole is not None
                                 else {"reason": no_whole})},
        "specific": specific,
        "shared": {"n": len(shared), "weights": shared},
        "damage": {"groups": names, **matrix},
        "definitions": DEFINITIONS,
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """DVC metrics: the number of groups, the mean pairwise Jaccard, how diagonal the damage
    matrix is (held-out and in-sample), and each group's own damage over the random controls'."""
    if not report["run"]:
        return {"n_groups": 0}
    d = report["damage"]
    return {
        "n_groups": len(report["groups"]["shown"]),
        "mean_pairwise_jaccard": report["overlap"]["mean_pairwise_jaccard_top"],
        "damage_diagonal_dominance_heldout": d["heldout"]["dominance"]["row"]["mean"],
        "damage_diagonal_dominance_heldout_std": d["heldout"]["dominance"]["row"]["std"],
        "damage_diagonal_dominance_in_sample": d["in_sample"]["dominance"]["row"]["mean"],
        "damage_own_over_random": d["own_vs_random"]["mean_ratio"],
        "damage_own_z_mean": d["own_vs_random"]["mean_z"],
        "n_shared_by_all_groups": report["shared"]["n"],
    }


def critical_csv(report: dict[str, Any], critical: list[Critical]) -> str:
    """Every group's top-N, best first within each group, with its specificity."""
    rows = []
    for c in critical:
        spec = {(r["parameter"], r["flat_index"]): r for r in report["specific"][c.name]["weights"]}
        for i, r in enumerate(c.top.to_pylist(), start=1):
            s = spec.get((r["parameter"], r["flat_index"]))
            rows.append([c.name, i, r["parameter"], r["block"], r["component"], r["expert"], r["row"], r["col"],
                         r["flat_index"], r["score"], r["weight"], r["gradient"], s is not None,
                         s["specificity"] if s else None, s["bounded"] if s else None])
    return csv_text(CRITICAL_COLUMNS, rows)


def _labels(report: dict[str, Any]) -> list[str]:
    return report["damage"]["groups"]


def _with_whole(report: dict[str, Any]) -> list[str]:
    return [*_labels(report), *([WHOLE] if "reason" not in report["overlap"]["vs_whole"] else [])]


def overlap_csv(report: dict[str, Any]) -> str:
    names = _with_whole(report)
    pairs = {(r["a"], r["b"]): r for r in report["overlap"]["pairs"]}
    rows = []
    for panel, key in (("jaccard top-N", "jaccard_top"), ("jaccard per-tensor top-k", "jaccard_per_tensor"),
                       ("spearman tensor sums", "spearman_tensor_sums")):
        for a in names:
            for b in names:
                rows.append([panel, a, b, 1.0 if a == b else pairs[(a, b)][key]])
    return csv_text(OVERLAP_COLUMNS, rows)


def damage_csv(report: dict[str, Any]) -> str:
    names, d = _labels(report), report["damage"]
    rows = []
    for texts, panel in (("heldout", "held-out"), ("in_sample", "in-sample")):
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                rows.append([panel, a, b, d[texts]["loss_increase"][i][j], d[texts]["loss"][i][j],
                             d[texts]["top1_agreement"][i][j], d[texts]["saturated"][i][j]])
    return csv_text(DAMAGE_COLUMNS, rows)


def _heatmap(ax: Any, values: np.ndarray, labels_y: list[str], labels_x: list[str], fmt: str, cmap: str,
             marks: np.ndarray | None = None, **scale: Any) -> Any:
    im = ax.imshow(values, cmap=cmap, interpolation="nearest", aspect="auto", **scale)
    top = np.nanmax(values) if np.isfinite(values).any() else 1.0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "n/a" if not np.isfinite(v) else format(v, fmt) + ("*" if marks is not None and marks[i, j] else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="white" if np.isfinite(v) and v > 0.6 * top else "black")
    ax.set_xticks(range(len(labels_x)), labels_x, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels_y)), labels_y, fontsize=8)
    return im


def overlap_figure(report: dict[str, Any]) -> Figure:
    """Jaccard of every pair of groups' top-N sets (and each against the whole), and the
    Spearman correlation of their per-tensor score sums."""
    names = _with_whole(report)
    pairs = {(r["a"], r["b"]): r for r in report["overlap"]["pairs"]}
    n = report["settings"]["top_n"]
    fig, axes = plt.subplots(1, 2, figsize=(4.2 + 1.1 * len(names), 0.55 * len(names) + 2.4))
    for ax, key, title, scale in ((axes[0], "jaccard_top", f"Jaccard of the top-{n} sets", {"vmin": 0, "vmax": 1}),
                                  (axes[1], "spearman_tensor_sums", "Spearman of per-tensor score sums",
                                   {"vmin": -1, "vmax": 1})):
        m = np.array([[1.0 if a == b else (pairs[(a, b)][key] if pairs[(a, b)][key] is not None else np.nan)
                       for b in names] for a in names])
        im = _heatmap(ax, m, names, names, ".2f", "Blues" if key == "jaccard_top" else "RdBu", **scale)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Do the groups' critical weights ({report['settings']['metric']}) agree?", fontsize=11)
    fig.tight_layout()
    return fig


def damage_figure(report: dict[str, Any]) -> Figure:
    """Loss increase on each group's texts (columns) after zeroing each group's top-N (rows),
    held-out and in-sample, with the random controls' mean beside the title; * marks a loss
    past ln V."""
    names, d = _labels(report), report["damage"]
    n = report["settings"]["top_n"]
    fig, axes = plt.subplots(1, 2, figsize=(4.5 + 1.6 * len(names), 0.55 * len(names) + 2.8))
    top = max((v for t in ("heldout", "in_sample") for row in d[t]["loss_increase"] for v in row if v is not None),
              default=1.0)
    for ax, texts, label in ((axes[0], "heldout", "held-out"), (axes[1], "in_sample", "in-sample")):
        m = np.array([[np.nan if v is None else v for v in row] for row in d[texts]["loss_increase"]])
        im = _heatmap(ax, m, names, names, ".2f", "Reds", np.array(d[texts]["saturated"]), vmin=0, vmax=top)
        dom = d[texts]["dominance"]["row"]
        spread = f" ± {dom['std']:.2f}" if dom["std"] is not None else ""
        ax.set_title(f"{label} texts: diagonal dominance {dom['mean']:.2f}{spread}" if dom["mean"] is not None
                     else f"{label} texts", fontsize=9)
        ax.set_xlabel("texts measured (group)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="loss increase (nats)")
    axes[0].set_ylabel(f"top-{n} zeroed (group)", fontsize=9)
    controls = d["controls"]
    means = [m for m in controls["mean"] if m is not None]
    control = f"{np.mean(means):.3f} nats on average" if means else "a loss that is not finite"
    fig.suptitle(f"Cross-group damage; {controls['draws']} random sets of {controls['n_weights']} weights raise the "
                 f"held-out loss by {control} (* past ln V)", fontsize=9)
    fig.tight_layout()
    return fig


def specific_figure(report: dict[str, Any], n_blocks: int) -> Figure:
    """Per group, where its specific weights sit: a block x component map of their count."""
    names = _labels(report)
    spec = report["specific"]
    components = sorted({r["component"] for s in spec.values() for r in s["weights"]})
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 2.4, (0.22 * max(len(components), 3) + 1.6) * rows),
                             squeeze=False, sharey=True, layout="constrained")
    blocks = ["out", *map(str, range(n_blocks))]
    top = max((sum(1 for r in s["weights"] if r["component"] == c and (r["block"] if r["block"] is not None else -1) == b)
               for s in spec.values() for c in components for b in range(-1, n_blocks)), default=1)
    for ax, name in zip(axes.flat, names):
        m = np.zeros((max(len(components), 1), n_blocks + 1))
        for r in spec[name]["weights"]:
            m[components.index(r["component"]), (r["block"] + 1) if r["block"] is not None else 0] += 1
        im = ax.imshow(m, cmap="Purples", aspect="auto", interpolation="nearest", vmin=0, vmax=max(top, 1))
        step = max(1, (n_blocks + 1) // 8)
        ax.set_xticks(range(0, n_blocks + 1, step), blocks[::step], fontsize=7)
        ax.set_yticks(range(len(components)), components, fontsize=7)
        ax.tick_params(axis="y", labelleft=ax.get_subplotspec().is_first_col())
        ax.set_title(f"{name}: {spec[name]['n']} specific weights", fontsize=9)
        ax.set_xlabel("block (out = outside the blocks)", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, pad=0.02, label="specific weights")
    fig.suptitle("Where each group's specific weights sit (in its top-N, in no other group's)", fontsize=10)
    return fig


def write(out: Any, report: dict[str, Any], critical: list[Critical]) -> None:
    """Every output file; with no grouped run, each says why."""
    write_json(out.report, report)
    write_json(out.metrics, headline(report))
    if not report["run"]:
        write_text(out.critical, csv_text(CRITICAL_COLUMNS, []))
        write_text(out.overlap_table, csv_text(OVERLAP_COLUMNS, []))
        write_text(out.damage_table, csv_text(DAMAGE_COLUMNS, []))
        for path in (out.overlap_plot, out.damage_plot, out.specific_plot):
            fig, ax = plt.subplots(figsize=(6, 1.2))
            ax.axis("off")
            ax.text(0.5, 0.5, f"No grouped run: {report['reason']}", ha="center", va="center", fontsize=10)
            save_png(fig, path)
        return
    write_text(out.critical, critical_csv(report, critical))
    write_text(out.overlap_table, overlap_csv(report))
    write_text(out.damage_table, damage_csv(report))
    save_png(overlap_figure(report), out.overlap_plot)
    save_png(damage_figure(report), out.damage_plot)
    blocks = report["model"].get("n_blocks") or 1 + max((r["block"] for c in critical for r in c.top.to_pylist()
                                                            if r["block"] is not None), default=0)
    save_png(specific_figure(report, blocks), out.specific_plot)
