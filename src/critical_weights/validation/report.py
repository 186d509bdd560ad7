"""What validation writes: the full report, a dozen headline DVC metrics, and the damage-curve table.

- `validation_report.json`: everything measured (every draw, every sampled weight), not
  declared as DVC metrics;
- `validation.json` (DVC metrics): the headline numbers, flat and named for what they are;
- `damage_curve.csv` (behind the DVC plot): long format, one row per (perturbation, set, k),
  so DVC draws one colour per set.
"""

from __future__ import annotations

import math
from typing import Any

from critical_weights.config.params import Params
from critical_weights.core.outputs import csv_text
from critical_weights.validation.damage import NOISE_REL, TextSets
from critical_weights.validation.evaluation import loss_record
from critical_weights.validation.selection import EXPORTED

CURVE_COLUMNS = ("perturbation", "set", "k", "loss", "loss_increase", "spread")


def _text_summary(ids: list[list[int]], loss: float) -> dict[str, Any]:
    rec = loss_record(loss, loss)
    return {"n_texts": len(ids), "n_tokens": sum(len(s) - 1 for s in ids), "loss": rec["loss"],
            "perplexity": rec["perplexity"]}


def mark_saturated(node: Any, ln_vocab: float) -> None:
    """Beside every measured loss, `saturated`: above ln V (the loss of a uniform guess over the
    vocabulary) the model is confidently wrong and a larger loss no longer means more damage."""
    if isinstance(node, dict):
        if "loss" in node and "loss_increase" in node:
            node["saturated"] = node["loss"] is None or node["loss"] > ln_vocab
        for value in node.values():
            mark_saturated(value, ln_vocab)
    elif isinstance(node, list):
        for value in node:
            mark_saturated(value, ln_vocab)


def build_report(params: Params, model_info: dict[str, Any], sets: TextSets, baseline: dict[str, float],
                 sensitivity_loss: float | None, dmg: dict[str, Any], predict: dict[str, Any] | None,
                 bit: int | None) -> dict[str, Any]:
    """validation_report.json: what was measured, on which texts, and every result."""
    vp = params.validate
    texts: dict[str, Any] = {"primary": sets.primary,
                             "in_sample": {**_text_summary(sets.in_sample, baseline["in_sample"]),
                                           "sensitivity_loss_all_texts": sensitivity_loss}}
    texts["heldout"] = _text_summary(sets.heldout, baseline["heldout"]) if sets.heldout \
        else {"missing": sets.heldout_missing}
    texts["ln_vocab"] = math.log(model_info["vocab_size"])
    mark_saturated(dmg, texts["ln_vocab"])
    return {
        "model": model_info,
        "critical_set": {"metric": params.rank.metric, "include": list(params.rank.include),
                         "exclude": list(params.rank.exclude),
                         "exported": {"mode": params.rank.mode, "k": params.rank.k} if vp.exported else None},
        "settings": {"seed": params.seed, "perturbations": list(vp.perturbations), "controls": list(vp.controls),
                     "k_values": list(vp.k_values), "random_draws": vp.random_draws,
                     "single_weights": vp.single_weights, "noise_sigma": vp.noise_sigma, "bit": vp.bit,
                     "bit_index": bit, "noise_rel": NOISE_REL,
                     "noise_floor_nats": NOISE_REL * abs(baseline[sets.primary])},
        "texts": texts,
        "damage": dmg,
        "predictiveness": predict,
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics: a few flat, named numbers (null where not measured or within noise)."""
    primary = report["texts"]["primary"]
    out: dict[str, Any] = {"text_set_heldout": primary == "heldout", "ln_vocab": report["texts"]["ln_vocab"]}
    for which in ("heldout", "in_sample"):  # each unperturbed loss named by the texts it is on
        if "loss" in report["texts"].get(which, {}):
            out[f"loss_{which}"] = report["texts"][which]["loss"]
    for kind, by_set in report["damage"].items():
        for name, entry in by_set.items():
            label = "exported" if name == EXPORTED else f"top{name[1:]}"
            out[f"{kind}_{label}_loss_increase"] = entry["critical"][primary]["loss_increase"]
            out[f"{kind}_{label}_top1_agreement"] = entry["critical"][primary]["top1_agreement"]
            if "vs_random_k" in entry:  # the ratio is null within noise; the z-score says how far apart
                out[f"{kind}_{label}_vs_random"] = entry["vs_random_k"]["ratio"]
                out[f"{kind}_{label}_vs_random_z"] = entry["vs_random_k"]["z"]
    single = (report["predictiveness"] or {}).get("single_weights")
    for metric, row in (single or {}).get("metrics", {}).items():
        out[f"spearman_{metric}"] = row["spearman"]
    return out


def curve_csv(report: dict[str, Any]) -> str:
    """The damage curve, long format: the critical set, the random draws' mean (spread = their
    standard deviation) and bottom_k, per perturbation and k; empty where a loss is not finite."""
    primary = report["texts"]["primary"]
    rows = []
    base = report["texts"][primary]["loss"]
    for kind, by_set in report["damage"].items():
        ks = [(int(n[1:]), e) for n, e in by_set.items() if n != EXPORTED]
        for cond in ("critical", "random_k", "bottom_k"):
            for k, entry in ks:
                if cond not in entry:
                    continue
                if cond == "random_k":
                    inc, spread = entry[cond]["mean_increase"], entry[cond]["std_increase"]
                    loss = None if inc is None else base + inc
                else:
                    loss, inc, spread = entry[cond][primary]["loss"], entry[cond][primary]["loss_increase"], None
                rows.append([kind, f"{kind} {cond}", k, loss, inc, spread])
    return csv_text(CURVE_COLUMNS, rows)
