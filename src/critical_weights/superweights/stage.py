"""The `superweights` stage: detect the super-weight candidates and the massive activations,
rank them against the gradients, zero them beside their controls, and write the report.

Detection is critical_weights.superweights.detect, the zeroing conditions
critical_weights.superweights.damage, and the report, table and figure
critical_weights.superweights.report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from critical_weights.artifacts import prepared_texts, shards
from critical_weights.config.params import Params
from critical_weights.core.errors import NumericalError, ShardError
from critical_weights.core.outputs import write_json, write_text
from critical_weights.core.progress import Timings, counted
from critical_weights.model import loading, tokenization
from critical_weights.model.projections import output_projections
from critical_weights.ranking import weight_ranks
from critical_weights.reports.figures import save_png
from critical_weights.superweights import report as rep
from critical_weights.superweights.damage import Meter, damage, planned
from critical_weights.superweights.detect import massive_activations, prompt_ids, search
from critical_weights.texts import sources
from critical_weights.validation.checked import load_checked


def run_superweights(prepared: Path, sensitivity: Path, params: Params, report_path: Path, plot_path: Path,
                     table_path: Path, timings: Timings, metrics_path: Path | None = None) -> dict[str, Any]:
    """Detect the candidates and the massive activations, rank them against the gradients,
    zero them and the controls, and write the JSON report, the per-block CSV and the PNG
    (and, with `metrics_path`, the short headline that DVC shows as metrics)."""
    sp = params.superweights
    loading.resolve_device(params.model)  # a device this machine lacks fails here, before any work
    with timings.phase("plan"):
        keep = shards.read_meta(sensitivity)["keep"]
        for key, value in (("top_k", sp.top_k), ("max_candidates", sp.max_candidates)):
            if value > keep:
                raise ShardError(f"superweights.{key}: {value} exceeds the shards' sensitivity.keep {keep}; "
                                 f"lower superweights.{key} or raise sensitivity.keep")
        top = weight_ranks.top_weights(sensitivity, params.rank, max(sp.top_k, sp.max_candidates))
        tokenizer = tokenization.load_saved(prepared / prepared_texts.TOKENIZER_DIR)
        prompt = prompt_ids(tokenizer, sp.prompt)
        input_ids, _ = prepared_texts.read_prepared(prepared)
        measured = sources.in_sample(input_ids, sp.n_texts, params.seed, "superweights.n_texts")
        detect = [prompt] if sp.detect_on == "prompt" else measured
        stats = shards.read_stats(sensitivity)
        sizes = {n: math.prod(s) for n, s in zip(stats["parameter"].to_pylist(), stats["shape"].to_pylist())}
        head = top.slice(0, sp.max_candidates)  # the weights measured: checked on the loaded model
        checked = {n: sizes[n] for n in dict.fromkeys(head["parameter"].to_pylist())}
    with timings.phase("load model"):
        model, device = load_checked(params.model, checked, head.select(["parameter", "flat_index", "weight"]),
                                     input_ids + [prompt])
        projections, skipped = output_projections(model)
    with timings.phase("detect"):
        candidates, records, hidden = search(model, projections, detect, sp)
        massive = massive_activations(hidden, sp.massive_top)

    def decode(text: int | None, position: int | None) -> str | None:
        return None if text is None or position is None else tokenizer.decode([detect[text][position]])

    for layer in massive:
        for t in layer["top"]:
            t["token"] = decode(t["text"], t["position"])
    with timings.phase("cross-check"):
        ranks = weight_ranks.ranks(sensitivity, params.rank, [c.key for c in candidates])
        top_pairs = list(zip(top["parameter"].to_pylist(), top["flat_index"].to_pylist()))
        check = rep.top_k_check(top.slice(0, sp.top_k), projections, records, sp.threshold, params.rank.metric)
    with timings.phase("measure"), counted("superweights: loss evaluations", planned(len(candidates))) as step:
        batching = (params.sensitivity.micro_batch_size, params.sensitivity.batch_tokens)
        weights = dict(model.named_parameters())
        touched = list(dict.fromkeys([c.projection.parameter for c in candidates] + [n for n, _ in top_pairs[:len(candidates)]]))
        meter = Meter(model, measured, batching, touched, step)
        baseline = meter.baseline
        if not math.isfinite(baseline):
            raise NumericalError(f"the unperturbed loss is {baseline}; try model.dtype float32")
        dmg = damage(meter, candidates, projections, top_pairs, {n: weights[n].numel() for n in touched}, params.seed)
    report = rep.build_report(params, model, device, detect, measured, candidates, ranks, records, massive, check,
                              baseline, dmg, decode)
    report["detection"]["skipped"] = skipped
    rows = rep.block_rows(records, massive)
    with timings.phase("write"):
        write_json(report_path, report)
        if metrics_path is not None:
            write_json(metrics_path, rep.headline(report))
        write_text(table_path, rep.blocks_csv(rows, sp.threshold))
        save_png(rep.figure(report, rows), plot_path)
    return report

