"""The `validate` stage: are the critical weights critical, on texts the gradients never saw?

1. Plan from the shards alone (critical_weights.validation.selection): the global top-k of `rank.metric`
   for every k in `validate.k_values`, the exported set, and their controls.
2. Texts: `validate.holdout x validate.n_texts` source texts that `prepare` did not choose
   (held out) are the primary set; `validate.n_texts` prepared texts (in-sample) stand beside.
3. Load a fresh model and check it holds the weights the shards recorded.
4. Measure (critical_weights.validation.damage) and test each metric's predictions
   (critical_weights.validation.predictiveness); write the report (critical_weights.validation.report)
   and the figures (critical_weights.validation.figures).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from critical_weights.artifacts import prepared_texts, ranked_file, shards
from critical_weights.config.params import Params
from critical_weights.core.errors import NumericalError
from critical_weights.core.outputs import write_json, write_text
from critical_weights.core.progress import Timings, counted
from critical_weights.core.streams import STREAM_HOLDOUT
from critical_weights.model import loading
from critical_weights.reports.figures import save_png
from critical_weights.texts import sources
from critical_weights.validation import predictiveness, selection
from critical_weights.validation.checked import load_checked
from critical_weights.validation.damage import Context, TextSets, damage
from critical_weights.validation.figures import damage_figure, predictiveness_figure
from critical_weights.validation.perturbation import bit_index, digest
from critical_weights.validation.report import build_report, curve_csv, headline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """Where the stage writes (dvc.yaml spells the paths)."""

    metrics: Path  # validation.json, the headline DVC metrics
    report: Path  # validation_report.json, everything
    curve_png: Path
    curve_csv: Path
    predictiveness_png: Path


def text_sets(prepared: Path, source: Path, params: Params) -> TextSets:
    """The in-sample share of the prepared texts and the held-out texts (or why there are none)."""
    vp = params.validate
    input_ids, _ = prepared_texts.read_prepared(prepared)
    in_sample = sources.in_sample(input_ids, vp.n_texts, params.seed, "validate.n_texts")
    heldout, missing = [], "validate.holdout is 0"
    if vp.holdout > 0:
        heldout, missing = sources.unchosen_ids(source, prepared, max(1, round(vp.holdout * len(in_sample))),
                                              params.texts.max_length, params.seed, STREAM_HOLDOUT)
    if missing and vp.holdout > 0:
        log.warning("validate: no held-out texts (%s); every loss is measured in-sample", missing)
    return TextSets(in_sample, heldout, missing if not heldout else None,
                    params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)


def baselines(model: torch.nn.Module, sets: TextSets) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The unperturbed loss on each text set, and its top-1 predictions; a non-finite loss stops the stage."""
    measured = {"in_sample": sets.baseline(model, "in_sample")}
    if sets.heldout:
        measured["heldout"] = sets.baseline(model, "heldout")
    out = {key: loss for key, (loss, _) in measured.items()}
    for key, value in out.items():
        if not math.isfinite(value):
            raise NumericalError(f"the unperturbed {key.replace('_', '-')} loss is {value}; try model.dtype float32")
    log.info("baseline loss: %s", ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out, {key: top1 for key, (_, top1) in measured.items()}


def _predict(ctx: Context, sensitivity: Path, params: Params, order: list[str], dmg: dict[str, Any]) -> dict[str, Any]:
    """The metric-predictiveness tables; the rank metric's top-k increases are reused."""
    tables = predictiveness.candidates_by_metric(sensitivity, params.rank)
    known = {}
    if "zero" in dmg:
        known[params.rank.metric] = {k: dmg["zero"][f"k{k}"]["critical"][ctx.sets.primary]["loss_increase"]
                                     for k in params.validate.k_values}
    single = None
    if params.validate.single_weights:
        single = predictiveness.single_weights(ctx, tables, order)
    else:
        log.info("validate.single_weights is 0: no single-weight predictiveness table")
    return {"single_weights": single, "top_k": predictiveness.top_k(ctx, tables, order, known)}


def planned_evaluations(params: Params, sets: TextSets, n_groups: int, n_metrics: int) -> int:
    """How many forward loss evaluations the stage makes at most (a perturbation that changes no
    bit is not measured): the baselines; per perturbation and critical set, the set on each text
    set, each random draw and bottom_k; each single weight; each other metric's top-k per k."""
    vp = params.validate
    n_sets = 2 if sets.heldout else 1
    per_group = n_sets + (vp.random_draws if "random_k" in vp.controls else 0) + ("bottom_k" in vp.controls)
    reused = 1 if "zero" in vp.perturbations else 0  # the rank metric's top-k are the zero sets already measured
    return n_sets + len(vp.perturbations) * n_groups * per_group + vp.single_weights + (n_metrics - reused) * len(vp.k_values)


def run_validate(prepared: Path, sensitivity: Path, ranked: Path, source: Path, params: Params, out: Outputs,
                 timings: Timings) -> dict[str, Any]:
    """Measure the baselines, perturb every critical set and its controls, test the metrics'
    predictions, and write the metrics, the report, the damage-curve CSV and the figures."""
    vp = params.validate
    loading.resolve_device(params.model)  # a device or dtype this machine lacks fails here, before any work
    with timings.phase("plan"):
        exported = selection.exported_set(*ranked_file.read_ranked(ranked), params.rank) if vp.exported else None
        the_plan = selection.plan(sensitivity, params.rank, vp, params.seed, exported)
        sets = text_sets(prepared, source, params)
    with timings.phase("load model"):
        model, device = load_checked(params.model, {n: the_plan.sizes[n] for n in the_plan.touched}, the_plan.expected,
                                     sets.in_sample + sets.heldout)
        weights = dict(model.named_parameters())
        before = {name: digest(weights[name]) for name in weights}
    n_metrics = len(shards.read_meta(sensitivity)["metrics"])
    with counted("validate: loss evaluations", planned_evaluations(params, sets, len(the_plan.groups), n_metrics)) as step:
        sets = replace(sets, step=step)
        with timings.phase("baseline"):
            ctx = Context(model, before, sets, *baselines(model, sets), vp, params.seed)
        with timings.phase("perturb and measure"):
            dmg = damage(ctx, the_plan.groups)
        with timings.phase("metric predictiveness"):
            predict = _predict(ctx, sensitivity, params, list(the_plan.sizes), dmg)
    dtype = next(model.parameters()).dtype
    info = {"name": params.model.name, "dtype": str(dtype).removeprefix("torch."), "device": device.type,
            "vocab_size": model.get_output_embeddings().weight.shape[0]}
    bit = bit_index(dtype, vp.bit) if "bit_flip" in vp.perturbations else None
    report = build_report(params, info, sets, ctx.baseline, shards.read_meta(sensitivity).get("avg_loss"), dmg, predict, bit)
    with timings.phase("write"):
        write_json(out.report, report)
        write_json(out.metrics, headline(report))
        write_text(out.curve_csv, curve_csv(report))
        save_png(damage_figure(report), out.curve_png)
        save_png(predictiveness_figure(report), out.predictiveness_png)
    return report

