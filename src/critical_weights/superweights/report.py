"""The super-weight report: superweights.json (DVC metrics), the per-block CSV behind the DVC
plot, and the figure (MLP output projection spikes and massive activations by layer)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from critical_weights.config.params import Params  # noqa: E402
from critical_weights.core.outputs import csv_text  # noqa: E402
from critical_weights.model.projections import Projection  # noqa: E402
from critical_weights.superweights.detect import Candidate, ProjectionRecord, Spike  # noqa: E402
from critical_weights.validation.evaluation import loss_record  # noqa: E402

if TYPE_CHECKING:
    import torch

Decode = Callable[[int | None, int | None], str | None]  # (text, position) -> the token there


def spike_json(s: Spike, decode: Decode) -> dict[str, Any]:
    return {"value": s.value, "abs": abs(s.value), "channel": s.channel, "text": s.text,
            "position": s.position, "token": decode(s.text, s.position)}


def candidate_json(c: Candidate, ranks: dict[str, Any], decode: Decode) -> dict[str, Any]:
    p = c.projection
    return {"round": c.round, "parameter": p.parameter, "block": p.block, "component": p.component,
            "expert": c.expert, "row": c.row, "col": c.col, "flat_index": c.flat_index, "layout": p.layout,
            "weight": c.weight, "input_spike": spike_json(c.inp, decode), "output_spike": spike_json(c.out, decode),
            "ranks": ranks}


def record_json(r: ProjectionRecord, threshold: float, decode: Decode) -> dict[str, Any]:
    p = r.projection
    return {"block": p.block, "parameter": p.parameter, "component": p.component, "expert": r.expert,
            "input": spike_json(r.inp, decode), "output": spike_json(r.out, decode),
            "spikes_both_sides": r.spikes(threshold)}


def spike_channels(records: Sequence[ProjectionRecord], threshold: float) -> dict[tuple[str, int | None], tuple[int | None, int | None]]:
    """(parameter, expert) -> (output channel, input channel) of its spikes above threshold."""
    out = {}
    for r in records:
        row = r.out.channel if abs(r.out.value) > threshold else None
        col = r.inp.channel if abs(r.inp.value) > threshold else None
        if row is not None or col is not None:
            out[(r.projection.parameter, r.expert)] = (row, col)
    return out


def top_k_check(top: pa.Table, projections: list[Projection], records: Sequence[ProjectionRecord],
                threshold: float, metric: str) -> dict[str, Any]:
    """Which of the global top-k by rank.metric lie on a spike's output row or input column."""
    by_name = {p.parameter: p for p in projections}
    spikes = spike_channels(records, threshold)
    on, n_proj, n_row, n_col = [], 0, 0, 0
    for r in top.select(["rank", "parameter", "flat_index", "score", "weight"]).to_pylist():
        proj = by_name.get(r["parameter"])
        if proj is None:
            continue
        n_proj += 1
        expert, row, col = proj.coordinates(r["flat_index"])
        s_row, s_col = spikes.get((proj.parameter, expert), (None, None))
        on_row, on_col = row == s_row, col == s_col
        n_row, n_col = n_row + on_row, n_col + on_col
        if on_row or on_col:
            on.append({**r, "block": proj.block, "expert": expert, "row": row, "col": col,
                       "on_spike_row": on_row, "on_spike_col": on_col})
    return {"metric": metric, "k": top.num_rows, "n_in_mlp_output_projections": n_proj,
            "n_on_spike_row": n_row, "n_on_spike_col": n_col, "on_spike_channels": on}


def block_rows(records: Sequence[ProjectionRecord], massive: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per block: the largest |input| and |output| of its MLP output projection(s) over experts,
    and the largest |hidden state| after the block (hidden_states[block + 1])."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        b = r.projection.block
        row = rows.setdefault(b, {"block": b, "mlp_input_max_abs": 0.0, "input_channel": -1,
                                  "mlp_output_max_abs": 0.0, "output_channel": -1})
        if abs(r.inp.value) > row["mlp_input_max_abs"]:
            row["mlp_input_max_abs"], row["input_channel"] = abs(r.inp.value), r.inp.channel
        if abs(r.out.value) > row["mlp_output_max_abs"]:
            row["mlp_output_max_abs"], row["output_channel"] = abs(r.out.value), r.out.channel
    for b, row in rows.items():
        top = massive[b + 1]["top"][0] if b + 1 < len(massive) else None
        row["hidden_max_abs"] = top["abs"] if top else None
        row["hidden_channel"] = top["channel"] if top else None
    return [rows[b] for b in sorted(rows)]


def blocks_csv(rows: list[dict[str, Any]], threshold: float) -> str:
    columns = ["block", "mlp_input_max_abs", "input_channel", "mlp_output_max_abs", "output_channel",
               "hidden_max_abs", "hidden_channel", "threshold"]
    return csv_text(columns, [[r.get(c) for c in columns[:-1]] + [threshold] for r in rows])


def figure(report: dict[str, Any], rows: list[dict[str, Any]]) -> Figure:
    """Left: max |input| and |output| of each block's MLP output projection, the threshold and
    the candidates. Right: the largest |hidden state| and the median per layer. Legends sit
    below the panels, where they cover no point."""
    threshold = report["settings"]["threshold"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.4))
    blocks = [r["block"] for r in rows]
    left.plot(blocks, [max(r["mlp_input_max_abs"], 1e-30) for r in rows], "o-", color="tab:blue", label="max |input|")
    left.plot(blocks, [max(r["mlp_output_max_abs"], 1e-30) for r in rows], "s-", color="tab:red", label="max |output|")
    left.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    by_place: dict[tuple, list[int]] = {}  # (block, expert, col) -> rows, in search order
    for c in report["candidates"]:
        by_place.setdefault((c["block"], c["expert"], c["col"]), []).append(c["row"])
        left.plot(c["block"], c["output_spike"]["abs"], "*", color="black", markersize=9)
    for (b, e, col), found in by_place.items():
        rows_text = "/".join(map(str, found)) if len(found) <= 2 else f"{len(found)} rows"
        top = max(c["output_spike"]["abs"] for c in report["candidates"] if c["block"] == b and c["col"] == col)
        left.annotate(f"({b}, {rows_text}, {col})" + ("" if e is None else f" expert {e}"), (b, top),
                      textcoords="offset points", xytext=(0, 9), fontsize=8, ha="center")
    left.plot([], [], "*", color="black", label="candidate: output spike when found")
    left.set_yscale("log")
    left.set_xlabel("block")
    left.set_ylabel("|activation| (log scale)")
    left.set_title("MLP output projection: largest input and output (unmodified model)", fontsize=10)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    layers = report["massive_activations"]
    xs = [m["layer"] for m in layers]
    right.plot(xs, [max(m["top"][0]["abs"], 1e-30) for m in layers], "o-", color="tab:purple", label="largest |h|")
    right.plot(xs, [max(m["median_abs"], 1e-30) for m in layers], ".--", color="tab:gray", label="median |h|")
    for m in layers:
        right.annotate(str(m["top"][0]["channel"]), (m["layer"], m["top"][0]["abs"]), fontsize=6,
                       textcoords="offset points", xytext=(0, 4), ha="center")
    right.set_yscale("log")
    right.set_xlabel("layer (0 = embeddings; labels: channel of the largest)")
    right.set_ylabel("|hidden state| (log scale)")
    right.set_title("Massive activations: hidden states by layer", fontsize=10)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    n = len(report["candidates"])
    fig.suptitle(f"Super-weight candidates: {n} ({report['model']['name']}, {report['detection']['n_sequences']} "
                 f"sequence(s), {report['detection']['n_tokens']} tokens)", fontsize=11)
    fig.tight_layout()
    return fig


def build_report(params: Params, model: torch.nn.Module, device: torch.device, detect: list[list[int]],
                 measured: list[list[int]], candidates: list[Candidate], ranks: list[dict[str, Any]], records: list[ProjectionRecord],
                 massive: list[dict[str, Any]], check: dict[str, Any], baseline: float, dmg: dict[str, Any],
                 decode: Any) -> dict[str, Any]:
    """superweights.json: settings, detection, candidates (ranks and damage), massive
    activations, the top-k check and the controls."""
    sp = params.superweights
    found = []
    for i, c in enumerate(candidates):
        entry = candidate_json(c, ranks[i], decode)
        entry["zeroed"], entry["restored"] = dmg["alone"][i], dmg["restored"][i]
        found.append(entry)
    base = loss_record(baseline, baseline)
    del base["loss_increase"], base["finite"]
    return {
        "model": {"name": params.model.name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "device": device.type},
        "settings": {**dataclasses.asdict(sp), "seed": params.seed, "rank_metric": params.rank.metric,
                     "rank_include": list(params.rank.include), "rank_exclude": list(params.rank.exclude)},
        "detection": {"n_sequences": len(detect), "n_tokens": sum(len(s) for s in detect),
                      "tokens": [decode(0, i) for i in range(len(detect[0]))] if sp.detect_on == "prompt" else None,
                      "n_projections": len({r.projection.parameter for r in records}), "n_records": len(records)},
        "n_candidates": len(candidates),
        "search_exhausted": len(candidates) < sp.max_candidates,  # false: max_candidates stopped it, more may remain
        "note": None if candidates else (f"no MLP output projection has |input| and |output| above {sp.threshold:g}; "
                                         "nothing to zero (see projections for the largest values)"),
        "candidates": found,
        "projections": [record_json(r, sp.threshold, decode) for r in records],
        "massive_activations": massive,
        "top_k_check": check,
        "baseline": {**base, "n_texts": len(measured), "n_tokens": sum(len(s) - 1 for s in measured)},
        "controls": {k: v for k, v in dmg.items() if k not in ("alone", "restored")},
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """superweights.json, the DVC metrics: a few flat, named numbers (the full report is beside it).

    `strongest` is the candidate whose zeroing raises the loss most (a non-finite loss counts
    as the most); the loss increases are over the unperturbed loss on the same texts."""
    found = report["candidates"]
    out: dict[str, Any] = {"n_candidates": len(found), "search_exhausted": report["search_exhausted"],
                           "loss_in_sample": report["baseline"]["loss"]}
    if found:
        metric = report["settings"]["rank_metric"]
        worst = max(found, key=lambda c: c["zeroed"]["loss_increase"] if c["zeroed"]["finite"] else float("inf"))
        where = f"{worst['parameter']} ({worst['row']}, {worst['col']})"
        controls = report["controls"]
        out.update({
            "strongest": where if worst["expert"] is None else f"{where} expert {worst['expert']}",
            "strongest_zeroed_loss_increase": worst["zeroed"]["loss_increase"],
            "strongest_restored_loss_increase": worst["restored"]["loss_increase"],
            f"strongest_rank_{metric}": worst["ranks"].get(metric, {}).get("rank_global"),
            "all_candidates_zeroed_loss_increase": controls["all_candidates"]["loss_increase"],
            f"top{len(found)}_{metric}_zeroed_loss_increase": controls["top_n"][-1]["loss_increase"],
            f"random{len(found)}_zeroed_loss_increase": controls["random"]["loss_increase"],
        })
    tops = [t["abs"] for layer in report["massive_activations"] for t in layer["top"]]
    out["max_massive_activation"] = max(tops) if tops else None
    return out

