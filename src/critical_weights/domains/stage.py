"""The `domains` stage: which weights matter for which texts, from the groups' shards that
`domain_sensitivity` wrote (critical_weights.domains.gradients), with no gradient pass:

1. each group's critical sets by `rank.metric`, and the whole's where its shards hold that
   metric (critical_weights.domains.sets);
2. their overlap, and each group's specific weights;
3. the damage matrix (critical_weights.domains.damage) on a fresh model, checked against the
   shards: each group's top-N zeroed, every group's texts measured, with random controls;
4. the report, its DVC-metrics headline, the tables behind `dvc plots` and the figures
   (critical_weights.domains.report).

So changing `rank.metric`, `domains.top_n`, `domains.per_tensor_k` or `domains.random_draws`
reruns this stage alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from critical_weights.artifacts import shards
from critical_weights.config.params import Params
from critical_weights.core.progress import Timings
from critical_weights.domains import damage, groups, report, sets
from critical_weights.domains.gradients import NOT_RUN, folder_name
from critical_weights.domains.groups import WHOLE
from critical_weights.validation.checked import load_checked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """Where the stage writes (dvc.yaml spells the paths)."""

    metrics: Path  # domains.json, the DVC-metrics headline
    report: Path  # domains_report.json
    critical: Path  # domains_critical.csv: every group's top-N
    overlap_table: Path  # domain_overlap.csv, behind the DVC plot
    damage_table: Path  # domain_damage.csv, behind the DVC plot
    overlap_plot: Path
    damage_plot: Path
    specific_plot: Path


def run_domains(domain_shards: Path, params: Params, out: Outputs, timings: Timings) -> dict[str, Any]:
    """Sets, overlap, specific weights and the damage matrix; the report and figures."""
    if (domain_shards / NOT_RUN).exists():
        made = report.not_run(json.loads((domain_shards / NOT_RUN).read_text(encoding="utf-8"))["reason"])
        log.info("domains: no grouped run (%s)", made["reason"])
        report.write(out, made, [])
        return made
    dp, rank = params.domains, params.rank
    with timings.phase("sets and overlap"):
        shown, left_out = groups.read(domain_shards)
        critical = [sets.critical_of(g.name, domain_shards / folder_name(i, g.name), rank, dp.top_n, dp.per_tensor_k)
                    for i, g in enumerate(shown)]
        whole, no_whole = None, None
        whole_metrics = shards.read_meta(domain_shards / WHOLE)["metrics"] if (domain_shards / WHOLE).exists() else []
        if rank.metric in whole_metrics:
            whole = sets.critical_of(WHOLE, domain_shards / WHOLE, rank, dp.top_n, dp.per_tensor_k)
        else:
            no_whole = (f"the whole is not scored by {rank.metric}: its sums would need a second model-sized "
                        "accumulator (docs/domains.md)")
            log.info("domains: %s", no_whole)
        overlap = sets.overlap([*critical, *([whole] if whole is not None else [])])
        specific = sets.specific(critical)
        shared = sets.shared(critical)
    with timings.phase("load model"):
        meta = shards.read_meta(domain_shards / folder_name(0, shown[0].name))
        rows = pa.concat_tables([c.top.select(["parameter", "flat_index", "weight"]) for c in critical])
        sizes = {r["parameter"]: int(np.prod(r["shape"])) for r in
                 shards.read_stats(domain_shards / folder_name(0, shown[0].name)).select(["parameter", "shape"]).to_pylist()}
        model, _ = load_checked(params.model, {n: sizes[n] for n in set(rows["parameter"].to_pylist())}, rows,
                                [s for g in shown for s in g.in_sample + g.heldout])
    with timings.phase("damage matrix"):
        matrix = damage.damage_matrix(model, shown, critical, params)
    made = report.build(params, meta.get("model", {}), shown, left_out, critical, whole, no_whole, overlap, specific,
                        shared, matrix)
    with timings.phase("write"):
        report.write(out, made, critical)
    return made
