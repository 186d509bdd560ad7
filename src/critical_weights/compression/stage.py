"""The `compress` stage: prune by every metric, measure what each mask costs, export the masks.

1. Plan from the shards: the pruned tensors (by default every weight of ndim >= 2 inside the
   blocks, as the pruning papers do; `compress.include` globs instead), the sets (every
   computed metric, then magnitude and random as controls) and the configurations (each
   unstructured sparsity per comparison group, and each N:M).
2. Texts: `compress.n_texts` held-out source texts, drawn as validate draws its own (the same
   texts when the counts match); in-sample prepared texts when there are none, with a warning.
3. A fresh model, checked against the shards, and a copy of the pruned tensors' originals.
4. Per set and configuration: every tensor's scores rebuilt from the saved sums
   (critical_weights.compression.scores), its mask (critical_weights.compression.masks), the
   weights zeroed in place; one loss evaluation (validate's own loss code); the originals
   written back.
5. The exports folder: `masks.safetensors` for rank.metric, unstructured per row at
   `compress.mask_sparsity` (unless 0); `imatrix.gguf` (with `compress.imatrix`);
   `imatrix_fisher.gguf` (with `compress.imatrix_fisher`); `scores.safetensors`, rank.metric's
   scores in `compress.scores` precision (unless none). Then the report, the headline, the
   table behind the DVC plot and the figure (critical_weights.compression.report).

Wanda's activations are one pass of the dense model over the prepared texts (the sums of x²
the sensitivity stage saved), not the paper's block-by-block pass through the already-pruned
model; the report says so.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from critical_weights.artifacts import shards
from critical_weights.artifacts.sums import Sums, SumsWriter
from critical_weights.compression import experts, imatrix
from critical_weights.compression import report as rep
from critical_weights.compression.masks import n_m, pack, pruned_mask
from critical_weights.compression.measure import Measurer, TextSet, check_context, text_sets
from critical_weights.compression.scores import RANDOM, scores, to_stored
from critical_weights.config.params import Params
from critical_weights.core.errors import NumericalError, ParamsError, ShardError
from critical_weights.core.memory import unmap_large_blocks
from critical_weights.core.outputs import atomic_path, write_json, write_text
from critical_weights.core.progress import Timings, counted
from critical_weights.metrics import REGISTRY
from critical_weights.model import loading
from critical_weights.reports.figures import save_png
from critical_weights.validation.checked import load_checked

log = logging.getLogger(__name__)
MASKS, IMATRIX, IMATRIX_FISHER, SCORES = "masks.safetensors", "imatrix.gguf", "imatrix_fisher.gguf", "scores.safetensors"
SCORE_CODES = {"bfloat16": "BF16", "float16": "F16"}  # safetensors' names


@dataclass(frozen=True)
class Outputs:
    """Where the stage writes (dvc.yaml spells the paths)."""

    metrics: Path  # compression.json, the headline DVC metrics
    report: Path  # compression_report.json
    table: Path  # pruning.csv, behind the DVC plot
    plot: Path  # pruning.png
    exports: Path  # a folder: masks.safetensors and imatrix.gguf, each when its param asks for it


@dataclass(frozen=True)
class Target:
    """One pruned tensor: its name, layout kind and stored shape."""

    name: str
    kind: str
    shape: tuple[int, ...]


def targets(stats: Any, include: tuple[str, ...]) -> list[Target]:
    """The tensors to prune, in parameter order: with `include`, every scored tensor of ndim >= 2
    whose name matches a glob; else every one inside the blocks."""
    rows = stats.filter(pc.equal(stats["metric"], stats["metric"][0])).to_pylist()
    chosen = [r for r in rows if len(r["shape"]) >= 2
              and (any(fnmatch.fnmatchcase(r["parameter"], g) for g in include) if include else r["block"] is not None)]
    if not chosen:
        example = next((r["parameter"] for r in rows if len(r["shape"]) >= 2), "none")
        raise ParamsError([f"compress.include: {list(include)} matches no weight tensor of ndim >= 2 "
                           f"(parameter names look like {example})" if include else
                           "compress: the model has no weight tensor inside its blocks; name some with compress.include"])
    return [Target(r["parameter"], r["layout"], tuple(r["shape"])) for r in chosen]


def sets_of(metrics: list[str]) -> list[str]:
    """Every computed metric, then the controls magnitude and random."""
    return list(dict.fromkeys([*metrics, "magnitude", RANDOM]))


def configurations(params: Params) -> list[tuple[str, str, float]]:
    """(structure, group, sparsity) of every mask a set gets, in table order."""
    cp = params.compress
    out = []
    for structure in cp.structures:
        nm = n_m(structure)
        if nm is None:
            out += [(structure, group, s) for group in cp.groups for s in cp.sparsities]
        else:
            out.append((structure, "per_row", nm[0] / nm[1]))
    return out


class Originals:
    """The weights of the compressed tensors, and a copy of their originals to write back."""

    def __init__(self, model: torch.nn.Module, tensors: list[Target]):
        self.weights = dict(model.named_parameters())
        self.tensors = tensors
        self.originals = {t.name: self.weights[t.name].detach().clone() for t in tensors}
        self.n_weights = sum(self.weights[t.name].numel() for t in tensors)

    def restore(self) -> None:
        with torch.no_grad():
            for t in self.tensors:
                self.weights[t.name].copy_(self.originals[t.name])


class Pruner(Originals):
    """Zero the weights a set's masks choose, in place, and write the originals back."""

    def __init__(self, model: torch.nn.Module, tensors: list[Target], sums: Sums, seed: int):
        super().__init__(model, tensors)
        self.sums, self.seed = sums, seed
        self.already_zero = sum(int((self.originals[t.name] == 0).sum()) for t in tensors)
        self.mask_seconds = 0.0

    def masks(self, metric: str, structure: str, group: str, sparsity: float):
        """(target, pruned in the stored shape) per tensor, one tensor at a time."""
        for i, t in enumerate(self.tensors):
            start = time.perf_counter()
            w = self.weights[t.name]
            s = scores(metric, t.name, w, t.kind, self.sums, self.seed, i)
            pruned = to_stored(pruned_mask(s, sparsity, structure, group, t.name), t.kind, t.shape)
            self.mask_seconds += time.perf_counter() - start
            yield t, pruned

    def prune(self, metric: str, structure: str, group: str, sparsity: float) -> dict[str, int]:
        """Zero every tensor's pruned weights; how many were chosen and how many are now zero."""
        chosen = 0
        with torch.no_grad():
            for t, pruned in self.masks(metric, structure, group, sparsity):
                self.weights[t.name].masked_fill_(pruned, 0.0)
                chosen += int(pruned.sum())
            zeros = sum(int((self.weights[t.name] == 0).sum()) for t in self.tensors)
        return {"n_pruned": chosen, "n_zero": zeros}


@dataclass(frozen=True)
class Plan:
    """What a compression stage reads before it loads the model."""

    meta: dict[str, Any]  # the shards' meta.json
    stats: Any  # the shards' statistics table
    tensors: list[Target]  # the compressed tensors
    sums: Sums
    sets: list[str]  # every computed metric, then magnitude and random
    texts: list[TextSet]  # the primary texts every perplexity is measured on, then those beside them


def plan(prepared: Path, sensitivity: Path, source: Path, params: Params) -> Plan:
    """The tensors (`compress.include`), the sets with the sums each needs, and the texts."""
    stats = shards.read_stats(sensitivity)
    meta, tensors, sums = shards.read_meta(sensitivity), targets(stats, params.compress.include), Sums(sensitivity)
    sets = sets_of(list(meta["metrics"]))
    check_metrics(sets, sums, tensors)
    return Plan(meta, stats, tensors, sums, sets, text_sets(prepared, source, params))


def load_model(sensitivity: Path, planned: Plan, params: Params, metric: str) -> torch.nn.Module:
    """A fresh model, checked against the shards: each compressed tensor's top weight by `metric`."""
    candidates = shards.read_candidates(sensitivity, planned.stats, metric)
    firsts = candidates.filter(pc.equal(candidates["rank"], 1))
    expected = firsts.filter(pc.is_in(firsts["parameter"], value_set=pa.array([t.name for t in planned.tensors])))
    model, _ = load_checked(params.model, {t.name: int(np.prod(t.shape)) for t in planned.tensors},
                            expected.select(["parameter", "flat_index", "weight"]),
                            [s for texts in planned.texts for s in texts.ids])
    check_context(model, planned.texts)
    return model


def check_metrics(sets: list[str], sums: Sums, tensors: list[Target]) -> None:
    for metric in sets:
        if metric == RANDOM:
            continue
        for need in REGISTRY[metric].needs:
            lacking = [t.name for t in tensors if not sums.has(need, t.name)]
            if lacking:
                raise ShardError(f"compress: {metric} needs the {need} sum of {lacking[0]}"
                                 f"{f' and {len(lacking) - 1} more' if len(lacking) > 1 else ''}, which the sums lack; "
                                 f"rerun the sensitivity stage with {metric} in sensitivity.metrics (dvc repro)")


def run_compress(prepared: Path, sensitivity: Path, source: Path, params: Params, out: Outputs,
                 timings: Timings) -> dict[str, Any]:
    """Prune by every set and configuration, measure each, write the masks, report and figures."""
    cp = params.compress
    unmap_large_blocks()  # every mask is built tensor by tensor; freed temporaries go back at once (core.memory)
    loading.resolve_device(params.model)  # a device or dtype this machine lacks fails here, before any work
    with timings.phase("plan"):
        planned = plan(prepared, sensitivity, source, params)
        meta, stats, tensors, sums, sets = planned.meta, planned.stats, planned.tensors, planned.sums, planned.sets
        no_imatrix = None
        if cp.imatrix and "act_sq" not in sums.kinds:
            no_imatrix = ("not written: the importance matrix is wanda's sums of x^2, which this run did not compute; "
                          "add wanda to sensitivity.metrics, or set compress.imatrix false")
            log.warning("compress.imatrix: %s", no_imatrix)
        if cp.imatrix_fisher and "fisher" not in sums.kinds:
            raise ParamsError(["compress.imatrix_fisher: the gradient-weighted importance matrix needs the Fisher sums, "
                               "which this run did not compute; add fisher (or taylor2) to sensitivity.metrics, or set "
                               "compress.imatrix_fisher false"])
        configs = configurations(params)
        moe = experts.layers_of(meta, stats, params.rank.metric)
        experts.check_counts(moe, cp.drop_experts)
        no_drop = experts.unscored(moe)
        if no_drop:
            log.warning("compress.drop_experts: %s scores no expert tensor of %s; no expert is dropped",
                        params.rank.metric, ", ".join(no_drop))
        drops = [] if no_drop else experts.plan(moe, cp.drop_experts, cp.expert_draws, params.seed)
        if not moe and cp.drop_experts:
            log.info("compress.drop_experts: the model has no Mixture-of-Experts layer; no expert is dropped")
    with timings.phase("load model"):
        model = load_model(sensitivity, planned, params, params.rank.metric)
        pruner = Pruner(model, tensors, sums, params.seed)
    export = (params.rank.metric, "unstructured", "per_row", cp.mask_sparsity) if cp.mask_sparsity > 0 else None
    todo = [(m, *c) for m in sets for c in configs]
    if export is not None and export not in todo:
        todo.append(export)  # measured too, so the report holds the loss the exported masks give
    rows: list[dict[str, Any]] = []
    expert_rows: list[dict[str, Any]] = []
    n_states = 1 + len(todo) + len(drops)
    with timings.phase("prune and measure"), counted("compress: loss evaluations", n_states * len(planned.texts)) as step:
        measurer = Measurer(model, planned.texts, params, step)
        baseline = measurer.baseline
        if not np.isfinite(baseline):
            raise NumericalError(f"the unperturbed loss is {baseline}; try model.dtype float32")
        log.info("compress: baseline loss %.4f on %s; %d tensors, %d weights (%d already zero)", baseline,
                 " and ".join(f"{len(t.ids)} {t.name} sequences" for t in planned.texts), len(tensors),
                 pruner.n_weights, pruner.already_zero)
        for metric, structure, group, sparsity in todo:
            counts = pruner.prune(metric, structure, group, sparsity)
            measured = measurer.measure()
            pruner.restore()
            rows.append({"metric": metric, "structure": structure, "group": group, "sparsity": sparsity, **counts,
                         "sparsity_reached": counts["n_zero"] / pruner.n_weights, **measured})
            log.info("%s %s %s %.2f: loss %.4f (baseline %.4f)", metric, structure, group, sparsity,
                     measured["loss"] if measured["finite"] else float("nan"), baseline)
        if drops:
            dropper = experts.Dropper(model, moe)
            for drop in drops:
                dropper.drop(drop["dropped"])
                expert_rows.append({**drop, **measurer.measure()})
                dropper.restore()
                log.info("drop %d %s expert(s) per layer%s: loss %.4f (baseline %.4f)", drop["n"], drop["choice"],
                         f" (draw {drop['draw']})" if drop["choice"] == "random" else "",
                         expert_rows[-1]["loss"] if expert_rows[-1]["finite"] else float("nan"), baseline)
    eval_seconds = measurer.seconds
    log.info("compress: building masks took %.1f s, loss evaluations %.1f s (masks %.0f%% of both)",
             pruner.mask_seconds, eval_seconds, 100 * pruner.mask_seconds / max(1e-9, pruner.mask_seconds + eval_seconds))
    importance = fisher_importance = exported_scores = None
    with timings.phase("write exports"), atomic_path(out.exports) as tmp:
        tmp.mkdir()
        if export is not None:
            _write_masks(tmp / MASKS, pruner, export, meta)
        if cp.imatrix and no_imatrix is None:
            importance = _write_imatrix(tmp / IMATRIX, sums, stats, meta, params)
        elif no_imatrix is not None:
            importance = {"file": None, "reason": no_imatrix}
        if cp.imatrix_fisher:
            fisher_importance = _write_imatrix(tmp / IMATRIX_FISHER, sums, stats, meta, params, "fisher")
        if cp.scores != "none":
            exported_scores = _write_scores(tmp / SCORES, pruner, params.rank.metric, cp.scores, meta)
    report = rep.build_report(params, meta, tensors, pruner.n_weights, pruner.already_zero, planned.texts,
                              measurer.baselines, sets, rows, export)
    report["experts"] = rep.experts_section(params, moe, expert_rows, no_drop)
    report["imatrix"] = importance
    report["imatrix_fisher"] = fisher_importance
    report["exported_scores"] = exported_scores
    with timings.phase("write"):
        write_json(out.report, report)
        write_json(out.metrics, rep.headline(report))
        write_text(out.table, rep.table_csv(report))
        save_png(rep.figure(report), out.plot)
    return report


def _write_masks(path: Path, pruner: Pruner, export: tuple[str, str, str, float], meta: dict[str, Any]) -> None:
    """masks.safetensors: per pruned tensor, its kept weights as packed bits (1 = kept)."""
    metric, structure, group, sparsity = export
    shapes = {t.name: (*t.shape[:-1], -(-t.shape[-1] // 8)) for t in pruner.tensors}
    model = meta.get("model", {})
    header = {"format": "critical-weights/masks/1", "metric": metric, "structure": structure, "group": group,
              "sparsity": repr(sparsity), "bits": "1 = kept, 0 = pruned; little bit order along the last axis",
              "shapes": rep.json_text({t.name: list(t.shape) for t in pruner.tensors}),
              "text_sha256": str(meta.get("text_sha256")), "model": str(model.get("name")),
              "model_weight_sha256": rep.json_text(model.get("weight_sha256"))}
    writer = SumsWriter(path, shapes, header, dtype="U8")  # not safetensors' own writer: its metadata order varies
    try:
        for t, pruned in pruner.masks(metric, structure, group, sparsity):
            writer.write(t.name, pack(~pruned.cpu().numpy()))
    finally:
        writer.close()


def _write_imatrix(path: Path, sums: Sums, stats: Any, meta: dict[str, Any], params: Params,
                   statistic: str = "act_sq") -> dict[str, Any]:
    """imatrix.gguf or imatrix_fisher.gguf (critical_weights.compression.imatrix); what it holds
    and what it leaves out."""
    rows = stats.filter(pc.equal(stats["metric"], stats["metric"][0])).to_pylist()
    tensors, left_out = imatrix.build(sums, {r["parameter"]: r["layout"] for r in rows}, meta, statistic)
    for name, why in left_out.items():
        log.info("%s leaves out %s: %s", path.name, name, why)
    imatrix.write(path, tensors, [params.texts.source], int(meta["n_sequences"]), params.texts.max_length,
                  str(meta.get("model", {}).get("model_type")))
    counts = ("every real token of the prepared texts (per expert: the tokens its router sent it)" if statistic == "act_sq"
              else "the prepared texts; in_sum2 / counts is each input column's sum of the Fisher diagonal")
    return {"file": path.name, "statistic": statistic, "n_tensors": len(tensors) // 2, "left_out": left_out,
            "counts": counts}


def _write_scores(path: Path, pruner: Pruner, metric: str, dtype: str, meta: dict[str, Any]) -> dict[str, Any]:
    """scores.safetensors: `metric`'s score of every weight of the pruned tensors, stored shape."""
    model = meta.get("model", {})
    header = {"format": "critical-weights/scores/1", "metric": metric, "dtype": dtype,
              "text_sha256": str(meta.get("text_sha256")), "model": str(model.get("name")),
              "model_weight_sha256": rep.json_text(model.get("weight_sha256"))}
    torch_dtype = getattr(torch, dtype)
    writer = SumsWriter(path, {t.name: t.shape for t in pruner.tensors}, header, dtype=SCORE_CODES[dtype])
    try:
        for i, t in enumerate(pruner.tensors):
            s = to_stored(scores(metric, t.name, pruner.weights[t.name], t.kind, pruner.sums, pruner.seed, i), t.kind, t.shape)
            narrow = s.to(torch_dtype).cpu()
            writer.write(t.name, (narrow.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16"
                                  else narrow.numpy()))
    finally:
        writer.close()
    return {"file": SCORES, "metric": metric, "dtype": dtype, "n_tensors": len(pruner.tensors),
            "scores": "the metric's score of every weight, as the sensitivity stage computes it, rounded to nearest"}
