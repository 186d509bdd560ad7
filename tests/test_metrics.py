"""critical_weights.metrics: the registry is the one definition of a metric. The params choices,
the table in docs/loss-and-metrics.md and the accumulators a run fills all follow from it. (Each score against its
formula, written out by hand, is in sensitivity/test_scoring.py.)"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from critical_weights.config.params import RankParams, SensitivityParams
from critical_weights.metrics import ACCUMULATORS, METRICS, REGISTRY, accumulators_for
from critical_weights.sensitivity.accumulate import Accumulators, accumulate, scored_parameters

ROOT = Path(__file__).resolve().parents[1]


def docs_metric_table() -> list[tuple[str, str, str]]:
    """(name, score, meaning) of each row of the `| metric | score | meaning |` table in
    docs/loss-and-metrics.md."""
    text = (ROOT / "docs" / "loss-and-metrics.md").read_text(encoding="utf-8")
    table = text[text.index("| metric | score | meaning |"):].split("\n\n")[0].splitlines()[2:]
    rows = []
    for line in table:
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


def test_docs_table_is_the_registry():
    assert docs_metric_table() == [(m.name, m.formula, m.meaning) for m in REGISTRY.values()], (
        "the metric table of docs/loss-and-metrics.md and critical_weights.metrics.REGISTRY differ; change them together")


def test_params_choices_come_from_the_registry():
    fields = {f.name: f for f in dataclasses.fields(SensitivityParams)}
    assert fields["metrics"].metadata["rule"].allowed == METRICS == tuple(REGISTRY)
    assert {f.name: f for f in dataclasses.fields(RankParams)}["metric"].metadata["rule"].allowed == METRICS


def test_every_need_is_an_accumulator_the_pass_knows():
    stores = {f.name for f in dataclasses.fields(Accumulators)}
    assert set(ACCUMULATORS) <= stores
    for metric in REGISTRY.values():
        assert set(metric.needs) <= set(ACCUMULATORS), metric.name


@pytest.mark.parametrize("metrics, needs", [
    (["magnitude"], {"grad"}),
    (["grad_x_weight", "gradient"], {"grad"}),
    (["taylor2"], {"grad", "fisher"}),
    (["wanda", "fisher"], {"grad", "fisher", "act_sq"}),
    (list(METRICS), set(ACCUMULATORS)),
])
def test_accumulators_for(metrics, needs):
    assert accumulators_for(metrics) == needs


@pytest.mark.parametrize("metric", METRICS)
def test_a_pass_fills_exactly_what_the_metric_needs(metric, tiny_eager_model, tiny_ids):
    params = scored_parameters(tiny_eager_model, "weights")[:3]
    acc, _ = accumulate(tiny_eager_model, tiny_ids, params, [metric], micro_batch_size=3, hutchinson_probes=1)
    filled = {name for name in ACCUMULATORS if getattr(acc, name)}
    assert filled == accumulators_for([metric])
